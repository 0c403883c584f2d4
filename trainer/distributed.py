"""The process group of a training run: launcher environment, DeepSpeed's init_distributed.

Launchers (torchrun, the DeepSpeed launcher, Slurm/Kubernetes through torchrun) set RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; without them the run is a one-process world. NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import logging
import os
import socket
import warnings



def launch_env(device: str) -> tuple[int, int]:
    """Complete the launcher's environment before DeepSpeed is imported and return (rank, world size), known before
    any process group exists. Without a launcher: a one-process world (DeepSpeed would otherwise try MPI discovery).
    DS_ACCELERATOR picks DeepSpeed's accelerator when it is imported. Idempotent."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    os.environ["DS_ACCELERATOR"] = device
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def skip_shm_comm_op() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (~35 s) at init_distributed. Only
    inference tensor parallelism uses it (inference_all_reduce); training collectives go through gloo. Marking it
    incompatible makes build_shm_op() return None, so init takes ~0.1 s."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def init_deepspeed(device: str, timeout_s: float | None = None) -> None:
    """Initialize torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPUs (with or without a launcher).
    timeout_s: the group's timeout until set_collective_timeout (None: DeepSpeed's default, 10 minutes)."""
    from datetime import timedelta

    launch_env(device)  # a no-op after the trainer's own call
    if device == "cpu":
        skip_shm_comm_op()
    import deepspeed

    # DeepSpeed logs through its own stdout handler and format: route its warnings through ours (jpeglm.logs).
    ds_log = logging.getLogger("DeepSpeed")
    ds_log.handlers.clear()
    ds_log.propagate = True
    ds_log.setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls torch.distributed's deprecated *_tensor collectives: one warning per call.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.")
    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", **kwargs)


def set_collective_timeout(timeout_s: float) -> list:
    """Set the timeout of every process group that exists (the default one and DeepSpeed's) for the collectives
    that follow: the start-up phase runs under a long timeout, training under this one. Returns the groups set."""
    from datetime import timedelta

    from torch.distributed import distributed_c10d as c10d

    if not hasattr(c10d, "_set_pg_timeout"):  # torch < 2.3: the start-up timeout stays in force
        logging.getLogger(__name__).warning("this torch cannot change a process group's timeout; collectives keep "
                                            "distributed.startup_timeout_s")
        return []
    groups = list(c10d._world.pg_map)
    for group in groups:
        c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)  # NCCL and gloo
    return groups


def lost_a_peer(error: BaseException) -> bool:
    """Whether a collective failed because another rank's process ended (gloo: its sockets closed). That rank says
    why itself; this one's traceback would only bury its message."""
    return isinstance(error, RuntimeError) and any(
        what in str(error) for what in ("Connection closed by peer", "Connection reset by peer"))
