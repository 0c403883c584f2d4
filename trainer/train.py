"""`jpeglm train`: the Llama decoder under DeepSpeed ZeRO-3 on preprocessed shards; setup -> fit -> validate.

    torchrun --standalone --nproc_per_node 2 -m trainer.train --config tiny --data out/preprocess --run-dir RUN
    deepspeed --num_gpus 8 --module trainer.train --config 7b --data s3://bucket/out --run-dir /shared/run
    jpeglm train --config tiny --data out/preprocess --run-dir RUN            (one process)

Every process runs this module; DeepSpeed's launcher, torchrun (single node with --standalone, several with
--nnodes/--rdzv-endpoint) or a scheduler sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT. Without them it runs as
a single process. See docs/training.md for multi-node launches, the metrics and the checkpoint layout.

Determinism (what makes a killed-and-resumed run bitwise equal to an uninterrupted one): the samples of each step
are a pure function of (seed, consumed samples) (trainer/data.py); the learning rate is a pure function of the step
(set on the optimizer before each step, so there is no scheduler state to restore or to lose in a universal
checkpoint); the RNG is re-seeded for every micro-batch from (seed, position of its first sample), which does not
depend on the world size; the optimizer is torch AdamW, whose state DeepSpeed checkpoints exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import signal
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from trainer import checkpoint as ckpt
from trainer.data import (IGNORE_INDEX, DataError, Manifest, SampleOrder, SampleRecord, TrainStream, ValidationSet,
                          windows_per_row)
from trainer.ds_config import ConfigError, deepspeed_config, gradient_accumulation_steps, load_config

log = logging.getLogger("trainer.train")

CHECKPOINT_FORMAT = "jpeglm-train-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="preset name (7b, 1b, 150m, tiny) or path to a YAML config")
    parser.add_argument("--data", required=True,
                        help="output folder of `jpeglm preprocess` (local path or s3://bucket/prefix) "
                             "or its manifest.json")
    parser.add_argument("--run-dir", required=True,
                        help="folder for checkpoints, metrics.jsonl, tensorboard/, loss.png, summary.json "
                             "(a filesystem every process can reach)")
    parser.add_argument("--resume", default="auto",
                        help="'auto' (default): continue from the run dir's latest checkpoint if there is one; "
                             "'none': start fresh (refused if the run dir has checkpoints); or a checkpoint path")
    parser.add_argument("--init-from", default=None, metavar="DIR",
                        help="fine-tune: start from the weights of an exported jpeglm folder or a Hugging Face Llama "
                             "folder (e.g. the authors' released JPEG-LM weights), local or s3://; the model shape "
                             "comes from it and its tokenizer.model must be the one the data was made with "
                             "(same as train.init_from=DIR)")
    # The DeepSpeed launcher passes --local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                        help="config overrides, e.g. optimizer.lr=1e-3 train.max_steps=100 model.n_layers=2")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        if args.init_from:
            cfg["train"]["init_from"] = args.init_from
        if cfg["train"]["init_from"]:
            cfg = with_init_model(cfg)
    except (ConfigError, DataError) as e:
        return _fail(str(e))
    try:
        return train(cfg, args.data, args.run_dir, args.resume)
    except (ConfigError, DataError, ckpt.CheckpointError) as e:
        return _fail(str(e))


def _fail(message: str) -> int:
    print(f"jpeglm train: error: {message}", file=sys.stderr, flush=True)
    return 2


def train(cfg: dict, data: str, run_dir: str, resume: str = "auto") -> int:
    ctx = setup(cfg, data, run_dir, resume)
    try:
        summary = fit(ctx)
    finally:
        ctx.close()
    return summary["exit_code"]


# ---- setup -----------------------------------------------------------------------------------------------------


@dataclass
class Context:
    cfg: dict
    run_dir: str
    manifest: Manifest
    device: str
    rank: int
    world: int
    gas: int
    engine: object
    model_cfg: object
    stream: TrainStream
    val: ValidationSet
    record: SampleRecord
    logger: object
    byte_lengths: object  # torch tensor: bytes spelled by each token id
    tokenizer_bytes: bytes
    start_step: int
    attempt: int
    resumed_from: str | None
    weight_decays: list[float]
    peak: float | None
    stop_signal: list[int] = field(default_factory=list)

    def close(self) -> None:
        self.stream.close()
        self.logger.close()


def with_init_model(cfg: dict) -> dict:
    """The config with its model section taken from train.init_from's config.json: a checkpoint's shapes are fixed.
    Only activation_checkpointing (a training choice) is kept from the preset and overrides."""
    from trainer import hf, pretrained
    from trainer.ds_config import validate
    from trainer.model import ModelConfig
    from trainer.sample import read_checkpoint_config

    uri = cfg["train"]["init_from"]
    meta = read_checkpoint_config(uri)
    if meta is None:
        raise ConfigError(f"train.init_from={uri}: no config.json there (expected an exported jpeglm folder or a "
                          "Hugging Face Llama folder)")
    if meta.get("format") == pretrained.FORMAT:
        model = ModelConfig.from_dict(meta["model"])
    elif hf.is_llama_config(meta):
        model = hf.model_config_from_hf(meta)
    else:
        raise ConfigError(f"train.init_from={uri}: config.json is neither an exported jpeglm model nor a Llama config")
    model.activation_checkpointing = cfg["model"]["activation_checkpointing"]
    cfg = {**cfg, "model": model.to_dict()}
    validate(cfg)
    return cfg


def check_init_tokenizer(uri: str, manifest: Manifest) -> None:
    """The initial model's token ids mean the bytes of its own tokenizer: the data must use the same one."""
    from pipeline import storage
    from pipeline.tokenizer import Tokenizer

    path = storage.join(uri, "tokenizer.model")
    if not storage.exists(path):
        raise ConfigError(f"train.init_from={uri}: no tokenizer.model there, so its token ids cannot be checked "
                          "against the data's")
    fingerprint = Tokenizer.load(path).fingerprint
    if fingerprint != manifest.fingerprint:
        raise ConfigError(f"train.init_from={uri} was trained with tokenizer {fingerprint[:12]}, but the data was "
                          f"made with {manifest.fingerprint[:12]}: preprocess with --tokenizer {path}")


def load_initial_weights(model, uri: str, rank: int) -> None:
    """Copy train.init_from's weights into `model`. Under zero.Init each parameter is partitioned: rank 0 reads the
    checkpoint and GatheredParameters(modifier_rank=0) scatters each tensor into every rank's partition."""
    import deepspeed
    import torch

    from trainer.sample import load_checkpoint  # the one loader that tells exported, Hugging Face and run folders apart

    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    state = None
    if rank == 0 or not partitioned:
        state = load_checkpoint(uri, device=torch.device("cpu"), dtype=torch.float32).model.state_dict()
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=partitioned):
            if state is not None:
                p.data.copy_(state[name])


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is available (torch.cuda.is_available() is False)")
    return requested


def check_resume_state(state: dict, cfg: dict, manifest: Manifest, order_fingerprint: str, where: str) -> None:
    """Refuse to continue a run on different data or a different model (before any process group exists)."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ckpt.CheckpointError(f"{where} is not a jpeglm training checkpoint")
    theirs, ours = state["tokenizer"]["fingerprint"], manifest.fingerprint
    if theirs != ours:
        raise ckpt.CheckpointError(
            f"refusing to resume {where}: it was trained on data tokenized with tokenizer {theirs[:12]}, but "
            f"{manifest.root} was made with tokenizer {ours[:12]}. Token ids would mean different bytes; "
            "use data preprocessed with the run's tokenizer (preprocess --tokenizer RUN/tokenizer.model) "
            "or a new --run-dir"
        )
    # Activation checkpointing only trades memory for recomputation (same math): it may change between attempts.
    diff = {k: (state["config"]["model"].get(k), v) for k, v in cfg["model"].items()
            if state["config"]["model"].get(k) != v and k != "activation_checkpointing"}
    if diff:
        raise ckpt.CheckpointError(f"refusing to resume {where}: model config differs (checkpoint, now): {diff}")
    if state["data"]["order_fingerprint"] != order_fingerprint:
        raise ckpt.CheckpointError(
            f"refusing to resume {where}: the sample order changed (other shards, train.seq_len, train.seed or "
            "data.shuffle_block_shards than the run used), so the loader position would point at other samples"
        )


def _read_tokenizer(manifest: Manifest):
    from pipeline import storage
    from pipeline.tokenizer import Tokenizer

    try:
        model_bytes = storage.read_bytes(manifest.tokenizer_uri)
    except FileNotFoundError:
        raise DataError(f"{manifest.tokenizer_uri} is missing: the run needs the data's tokenizer "
                        "(bits per byte, export)") from None
    tokenizer = Tokenizer.from_bytes(model_bytes)
    if tokenizer.fingerprint != manifest.fingerprint:
        raise DataError(f"{manifest.tokenizer_uri} has fingerprint {tokenizer.fingerprint[:12]}, but the manifest says "
                        f"{manifest.fingerprint[:12]}: the data folder is inconsistent")
    return model_bytes, tokenizer


def single_process_env() -> None:
    """Without a launcher, run as a one-process world (DeepSpeed would otherwise try MPI discovery)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def skip_shm_comm_op() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce op (~35 s) at init_distributed. Only
    inference tensor parallelism uses it (inference_all_reduce); training collectives go through gloo. Marking it
    incompatible makes build_shm_op() return None, so init takes ~0.1 s."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False


def init_deepspeed(device: str) -> None:
    """Initialize torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPUs (with or without a launcher)."""
    single_process_env()
    if device == "cpu":
        skip_shm_comm_op()
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls torch.distributed's deprecated *_tensor collectives: one warning per call.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.")
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo")


def setup(cfg: dict, data: str, run_dir: str, resume: str = "auto") -> Context:
    run_dir = os.path.abspath(run_dir)
    if "://" in run_dir:
        raise ConfigError("--run-dir must be a filesystem path every process can reach (checkpoints are written there)")
    device = resolve_device(cfg["train"]["device"])
    os.environ["DS_ACCELERATOR"] = device  # before deepspeed is imported: picks its accelerator

    # Everything that can be refused is checked before any process group exists.
    manifest = Manifest.load(data)
    t = cfg["train"]
    windows = windows_per_row(manifest.seq_len, t["seq_len"])
    if manifest.tokenizer.get("vocab_size", cfg["model"]["vocab_size"]) > cfg["model"]["vocab_size"]:
        raise ConfigError(f"the data's tokenizer has {manifest.tokenizer['vocab_size']} tokens but model.vocab_size="
                          f"{cfg['model']['vocab_size']}")
    order_fingerprint = SampleOrder(manifest.split("train"), windows, t["seed"],
                                    cfg["data"]["shuffle_block_shards"]).fingerprint()
    tokenizer_bytes, tokenizer = _read_tokenizer(manifest)
    if t["init_from"]:
        check_init_tokenizer(t["init_from"], manifest)
    resume_from = ckpt.find_resume(resume, run_dir)
    state = None
    if resume_from:
        state = ckpt.read_state(*resume_from)
        check_resume_state(state, cfg, manifest, order_fingerprint, os.path.join(*resume_from))

    import torch
    import torch.distributed as dist

    import deepspeed
    from trainer.metrics import MetricsLogger, peak_tflops
    from trainer.model import ModelConfig, Transformer

    init_deepspeed(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    gas = gradient_accumulation_steps(cfg, world)

    universal = bool(resume_from) and state["world_size"] != world
    load_tag = resume_from[1] if resume_from else None
    if universal:
        # Rank 0 converts; the others must learn if it failed rather than wait at a barrier forever.
        outcome = [None]
        if rank == 0:
            try:
                ckpt.universal_tag(*resume_from)
            except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                outcome[0] = f"{type(e).__name__}: {e}"
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise ckpt.CheckpointError(f"cannot resume {os.path.join(*resume_from)} on {world} processes: {outcome[0]}")
        load_tag = resume_from[1] + ckpt.UNIVERSAL_SUFFIX
    ds_cfg = deepspeed_config(cfg, world, load_universal=universal)

    model_cfg = ModelConfig.from_dict(cfg["model"])
    _seed_all(t["seed"])  # identical initial weights on every rank and in every run with this seed
    with deepspeed.zero.Init(config_dict_or_path=ds_cfg, enabled=cfg["zero"]["stage"] == 3 and cfg["zero"]["init"]):
        # Transformer initializes through self.apply, which zero.Init intercepts: each partitioned parameter is
        # gathered, initialized and re-partitioned (tests/test_train_distributed.py checks the statistics).
        model = Transformer(model_cfg)
    if t["init_from"] and not resume_from:
        load_initial_weights(model, t["init_from"], rank)
    groups, weight_decays = param_groups(model, cfg["optimizer"]["weight_decay"])
    o = cfg["optimizer"]
    optimizer = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]), eps=o["eps"],
                                  fused=True if device == "cuda" else None)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)

    start_step, consumed, attempt = 0, 0, 0
    if resume_from:
        load_path, client_state = engine.load_checkpoint(resume_from[0], tag=load_tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=False)
        if load_path is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load {os.path.join(resume_from[0], load_tag)}")
        if universal:
            ckpt.fix_universal_load(engine.optimizer, weight_decays)
        start_step = int(client_state["step"])
        consumed = int(client_state["loader"]["consumed"])
        if not universal:
            _set_rng_state(client_state["rng"])  # per rank; a universal load hands every rank rank 0's
    attempt = _next_attempt(run_dir, rank)

    stream = TrainStream(manifest, t["seq_len"], t["seed"], t["global_batch_size"], t["micro_batch_size"], rank, world,
                         consumed=consumed, block_shards=cfg["data"]["shuffle_block_shards"],
                         prefetch_micro_batches=cfg["data"]["prefetch_micro_batches"],
                         read_threads=cfg["data"]["read_threads"])
    val = ValidationSet(manifest, t["seq_len"], t["micro_batch_size"], rank, world, cfg["eval"]["max_samples"],
                        read_threads=cfg["data"]["read_threads"])
    byte_lengths = torch.tensor([len(b) for b in tokenizer.token_bytes()], dtype=torch.float64, device=engine.device)
    device_name = torch.cuda.get_device_name() if device == "cuda" else None
    peak = peak_tflops(device_name, cfg["log"]["peak_tflops"])

    logger = MetricsLogger(run_dir, rank == 0, t["max_steps"], start_step, cfg["log"]["tensorboard"])
    ctx = Context(cfg=cfg, run_dir=run_dir, manifest=manifest, device=device, rank=rank, world=world, gas=gas,
                  engine=engine, model_cfg=model_cfg, stream=stream, val=val,
                  record=SampleRecord(run_dir, rank, world, attempt), logger=logger, byte_lengths=byte_lengths,
                  tokenizer_bytes=tokenizer_bytes,
                  start_step=start_step, attempt=attempt,
                  resumed_from=os.path.join(resume_from[0], load_tag) if resume_from else None,
                  weight_decays=weight_decays, peak=peak)
    if rank == 0:
        _write_run_files(ctx)
        _print_header(ctx, device_name)
    _install_signal_handlers(ctx)
    return ctx


def _seed_all(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def micro_batch_seed(seed: int, position: int) -> int:
    """RNG seed of a micro-batch, from its first sample's stream position: the same on any world size."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1, dtype=np.uint64)[0] >> 1)


def param_groups(model, weight_decay: float) -> tuple[list[dict], list[float]]:
    """Weight decay on matrices (linear and embedding weights), none on RMSNorm gains. Under zero.Init parameters
    are partitioned and report dim() == 1, so the shape comes from p.ds_shape."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        shape = getattr(p, "ds_shape", p.shape)
        (decay if len(shape) >= 2 else no_decay).append(p)
    return ([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            [weight_decay, 0.0])


def _rng_state() -> dict:
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _next_attempt(run_dir: str, rank: int) -> int:
    """This start's number (0 for the first), agreed by all ranks: sample records are keyed by it."""
    import torch.distributed as dist

    path = os.path.join(run_dir, "attempts.jsonl")
    box = [0]
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        if os.path.exists(path):
            with open(path) as f:
                box[0] = sum(1 for _ in f)
        with open(path, "a") as f:
            f.write(json.dumps({"attempt": box[0], "time": time.time(), "world_size": dist.get_world_size()}) + "\n")
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_run_files(ctx: Context) -> None:
    import yaml

    from pipeline import storage

    with open(os.path.join(ctx.run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(ctx.cfg, f, sort_keys=False)
    # The run keeps its own copy of the tokenizer (also in every checkpoint): export and sampling must not depend
    # on the data staying around.
    storage.write_bytes(os.path.join(ctx.run_dir, "tokenizer.model"), ctx.tokenizer_bytes)


def _print_header(ctx: Context, device_name: str | None) -> None:
    t = ctx.cfg["train"]
    n = ctx.model_cfg.num_params(non_embedding=True)
    total = ctx.model_cfg.num_params(non_embedding=False)
    fpt = ctx.model_cfg.flops_per_token(t["seq_len"])
    lines = [
        f"model: {n / 1e6:,.2f}M non-embedding parameters ({total / 1e6:,.2f}M with embeddings), "
        f"{ctx.model_cfg.n_layers} layers, d {ctx.model_cfg.d_model}, {ctx.model_cfg.n_heads} heads",
        f"training FLOPs per token: 6N + 12*L*d*T = {6 * n / 1e9:,.3f} + "
        f"{12 * ctx.model_cfg.n_layers * ctx.model_cfg.d_model * t['seq_len'] / 1e9:,.3f} = {fpt / 1e9:,.3f} GFLOP "
        f"(T={t['seq_len']})",
        f"processes: {ctx.world} x {device_name or ctx.device} ({t['precision']}), "
        f"ZeRO stage {ctx.cfg['zero']['stage']}; micro-batch {t['micro_batch_size']} x accumulation {ctx.gas} "
        f"x {ctx.world} = {t['global_batch_size']} samples "
        f"= {t['global_batch_size'] * t['seq_len']:,} tokens per step",
        f"data: {ctx.manifest.root}: {ctx.stream.order.num_samples:,} train samples per epoch "
        f"({ctx.stream.windows} windows of {t['seq_len']} per {ctx.manifest.seq_len}-token row), "
        f"{ctx.val.num_samples} validation samples; tokenizer {ctx.manifest.fingerprint[:12]}",
        f"peak for MFU: {f'{ctx.peak:g} TFLOP/s per device' if ctx.peak else 'unknown (set log.peak_tflops)'}",
        (f"resumed from {ctx.resumed_from} at step {ctx.start_step} (attempt {ctx.attempt})" if ctx.resumed_from
         else f"starting fresh in {ctx.run_dir}"),
    ]
    for line in lines:
        ctx.logger.write(line)


def _install_signal_handlers(ctx: Context) -> None:
    def handler(signum, frame):
        if ctx.stop_signal:  # a second signal: stop now, without the checkpoint (e.g. stuck in a collective)
            raise SystemExit(128 + signum)
        # Only note it: the step finishes, every rank agrees (all-reduce), then all save together.
        ctx.stop_signal.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


# ---- fit ---------------------------------------------------------------------------------------------------------


def lr_at(step: int, o: dict, max_steps: int) -> float:
    """Learning rate of the update that takes the model from `step` to step + 1: linear warmup from lr/warmup,
    then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < o["warmup_steps"]:
        return o["lr"] * (step + 1) / o["warmup_steps"]
    progress = min(1.0, (step - o["warmup_steps"]) / max(1, max_steps - o["warmup_steps"]))
    return o["lr"] * (o["min_lr_ratio"] + (1 - o["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def fit(ctx: Context) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    cfg, engine = ctx.cfg, ctx.engine
    t, o = cfg["train"], cfg["optimizer"]
    seq_len, max_steps = t["seq_len"], t["max_steps"]
    flops_per_token = ctx.model_cfg.flops_per_token(seq_len)
    tokens_per_step = t["global_batch_size"] * seq_len
    step, last_saved = ctx.start_step, ctx.start_step if ctx.resumed_from else None
    step_times: list[float] = []
    last_val: dict = {}
    started = time.perf_counter()
    engine.train()

    from trainer.metrics import bits_per_byte, throughput

    while step < max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, o, max_steps)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        sums = torch.zeros(4, dtype=torch.float64, device=engine.device)  # loss*tokens, tokens, bytes, stop
        for _ in range(ctx.gas):
            batch = ctx.stream.next_batch()
            ctx.record.add(batch)
            torch.manual_seed(micro_batch_seed(t["seed"], batch.positions[0]))
            inputs = torch.from_numpy(batch.inputs).to(engine.device)
            targets = torch.from_numpy(batch.targets).to(engine.device)
            logits = engine(inputs)
            valid = targets != IGNORE_INDEX
            n = valid.sum()
            # Mean over the valid tokens; a micro-batch of padding only (windows past the last row's valid_tokens)
            # gives loss 0 and no gradient, where a plain mean would be 0/0 = NaN and poison the weights.
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=IGNORE_INDEX,
                                   reduction="sum") / n.clamp(min=1)
            engine.backward(loss)
            engine.step()  # DeepSpeed updates only at the accumulation boundary (the last micro-batch)
            sums[0] += loss.detach().double() * n
            sums[1] += n
            sums[2] += ctx.byte_lengths[targets.clamp(min=0)][valid].sum()
        step += 1
        ctx.record.end_step(step)
        sums[3] = 1.0 if ctx.stop_signal else 0.0
        dist.all_reduce(sums)  # also a step barrier: the time below is the slowest rank's
        if ctx.device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step_times.append(dt)
        loss_sum, tokens, n_bytes, stop = sums.tolist()
        rec = {
            "step": step,
            "loss": loss_sum / tokens if tokens else float("nan"),  # nan: this step saw padding only
            "bits_per_byte": bits_per_byte(loss_sum, n_bytes),
            "lr": lr,
            "grad_norm": _grad_norm(engine),
            "step_time_s": dt,
            "samples_seen": ctx.stream.consumed,
            "epoch": ctx.stream.consumed / ctx.stream.order.num_samples,
            **throughput(tokens_per_step, dt, flops_per_token, ctx.world, ctx.peak),
        }
        ctx.logger.log(rec)
        ctx.logger.progress(step, {"loss": f"{rec['loss']:.3f}", "bpb": f"{rec['bits_per_byte']:.3f}",
                                   "lr": f"{lr:.2e}", "tok/s": f"{rec['tokens_per_s']:,.0f}"})
        if cfg["log"]["every_steps"] and step % cfg["log"]["every_steps"] == 0:
            mfu = f", MFU {rec['mfu']:.1%}" if rec["mfu"] is not None else ""
            ctx.logger.write(f"step {step}/{max_steps}: loss {rec['loss']:.4f} ({rec['bits_per_byte']:.3f} bits/byte), "
                             f"lr {lr:.2e}, grad norm {rec['grad_norm']:.3f}, {rec['tokens_per_s']:,.0f} tokens/s, "
                             f"{rec['tflops_per_device']:.2f} TFLOP/s per device{mfu}")
        if cfg["eval"]["every_steps"] and step % cfg["eval"]["every_steps"] == 0 and step < max_steps:
            last_val = validate(ctx, step)
        if stop:
            signum = (ctx.stop_signal or [signal.SIGTERM])[0]
            save_checkpoint(ctx, step)
            ctx.logger.write(f"stopping on signal {signal.Signals(signum).name}: checkpoint saved at step {step}; "
                             "resume with --resume auto")
            return _finish(ctx, step, step_times, last_val, started, exit_code=128 + int(signum), preempted=True)
        if cfg["checkpoint"]["every_steps"] and step % cfg["checkpoint"]["every_steps"] == 0:
            save_checkpoint(ctx, step)
            last_saved = step
    if last_saved != step:
        save_checkpoint(ctx, step)
    last_val = validate(ctx, step) or last_val
    return _finish(ctx, step, step_times, last_val, started, exit_code=0, preempted=False)


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if hasattr(norm, "item") else norm)


def validate(ctx: Context, step: int) -> dict:
    """Token-weighted validation loss over the fixed validation samples; every rank runs the same passes."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from trainer.metrics import bits_per_byte

    if not ctx.val.batches:
        return {}
    engine = ctx.engine
    engine.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=engine.device)
    with torch.no_grad():
        for batch in ctx.val.batches:
            inputs = torch.from_numpy(batch.inputs).to(engine.device)
            targets = torch.from_numpy(batch.targets).to(engine.device)
            logits = engine(inputs)
            sums[0] += F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=IGNORE_INDEX,
                                       reduction="sum").double()
            valid = targets != IGNORE_INDEX
            sums[1] += valid.sum()
            sums[2] += ctx.byte_lengths[targets.clamp(min=0)][valid].sum()
    engine.train()
    dist.all_reduce(sums)
    loss_sum, tokens, n_bytes = sums.tolist()
    rec = {"step": step, "loss": loss_sum / tokens if tokens else float("nan"), "bits_per_byte": bits_per_byte(loss_sum, n_bytes),
           "tokens": int(tokens), "samples": ctx.val.num_samples}
    ctx.logger.log(rec, prefix="validation")
    ctx.logger.write(f"step {step}: validation loss {rec['loss']:.4f} ({rec['bits_per_byte']:.3f} bits/byte) "
                     f"on {ctx.val.num_samples} samples")
    return rec


def save_checkpoint(ctx: Context, step: int) -> str:
    t0 = time.perf_counter()
    root = ckpt.checkpoints_dir(ctx.run_dir)
    loader = ctx.stream.state()
    client_state = {"step": step, "loader": loader, "rng": _rng_state()}
    state = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "step": step,
        "world_size": ctx.world,
        "attempt": ctx.attempt,
        "time": time.time(),
        "config": ctx.cfg,
        "model": ctx.model_cfg.to_dict(),
        "tokenizer": dict(ctx.manifest.tokenizer),
        "data": {"uri": ctx.manifest.root, "order_fingerprint": loader["order_fingerprint"],
                 "samples_per_epoch": loader["samples_per_epoch"]},
        "loader": loader,
    }
    tag = ckpt.save(ctx.engine, root, step, client_state, state, ctx.cfg["checkpoint"]["keep_last"],
                    tokenizer_bytes=ctx.tokenizer_bytes if ctx.rank == 0 else None)
    ctx.logger.write(f"step {step}: checkpoint {os.path.join(root, tag)} ({time.perf_counter() - t0:.1f} s)")
    return tag


def _finish(ctx: Context, step: int, step_times: list[float], last_val: dict, started: float, exit_code: int,
            preempted: bool) -> dict:
    from trainer.metrics import read_metrics, throughput

    t = ctx.cfg["train"]
    steps_run = len(step_times)
    # The first step includes warm-up (allocations, first gathers): leave it out of the throughput.
    timed = step_times[1:] or step_times
    tokens_per_step = t["global_batch_size"] * t["seq_len"]
    perf = throughput(tokens_per_step * len(timed), sum(timed), ctx.model_cfg.flops_per_token(t["seq_len"]),
                      ctx.world, ctx.peak) if timed else {}
    summary = {
        "exit_code": exit_code,
        "preempted": preempted,
        "step": step,
        "max_steps": t["max_steps"],
        "steps_this_attempt": steps_run,
        "attempt": ctx.attempt,
        "resumed_from": ctx.resumed_from,
        "world_size": ctx.world,
        "device": ctx.device,
        "precision": t["precision"],
        "params_non_embedding": ctx.model_cfg.num_params(non_embedding=True),
        "flops_per_token": ctx.model_cfg.flops_per_token(t["seq_len"]),
        "tokens_this_attempt": tokens_per_step * steps_run,
        "wall_s": time.perf_counter() - started,
        **{k: v for k, v in perf.items()},
        "validation_loss": last_val.get("loss"),
        "validation_bits_per_byte": last_val.get("bits_per_byte"),
        "validation_samples": last_val.get("samples"),
        "checkpoint": ckpt.latest_tag(ckpt.checkpoints_dir(ctx.run_dir)),
    }
    if ctx.rank == 0:
        records = read_metrics(os.path.join(ctx.run_dir, "metrics.jsonl"))
        train_losses = [r["loss"] for r in records if r["kind"] == "train"]
        summary["train_loss_last10"] = float(np.mean(train_losses[-10:])) if train_losses else None
        summary["loss_plot"] = plot_losses(ctx.run_dir, records)
        with open(os.path.join(ctx.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        ctx.logger.close()
        print("summary: " + json.dumps(summary, indent=2), flush=True)
    return summary


def plot_losses(run_dir: str, records: list[dict]) -> str | None:
    from jpeglm.plots import line_plot

    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["step"], r["loss"]) for r in records if r["kind"] == "validation"]
    if not train:
        return None
    series = {"train": tuple(zip(*train))}
    if val:
        series["validation"] = tuple(zip(*val))
    return line_plot(series, os.path.join(run_dir, "loss.png"), title="JPEG-LM training loss", xlabel="step",
                     ylabel="loss (nats/token)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.splitlines()[0])
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
