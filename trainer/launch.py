"""`python -m trainer.launch TORCHRUN_ARGS`: torchrun, in this process, without its noise on Ctrl-C or failures.

    python -m trainer.launch --standalone --nproc_per_node 2 -m trainer.train --config tiny ...   (make train)

The arguments are torchrun's (torch.distributed.run), unchanged. What differs is what the user sees:
- Ctrl-C / SIGTERM: torchrun's agent forwards the signal to the ranks, which finish their step, save a checkpoint,
  say so once and exit 128 + signal. torchrun then raises SignalException with a 30-line traceback; here the
  launch ends quietly with the same exit code (130 for Ctrl-C, 143 for SIGTERM).
- A rank that fails has printed its own error; instead of ChildFailedError's box, one line names the rank and
  its exit code (which is also this command's); none when rank 0 ended with exit 2, a refusal it explained (the
  other ranks refuse alike, silently); an error only another rank hit (a corrupt row only it reads) it prints itself.
- OMP_NUM_THREADS defaults to 1 (torchrun would set it too, with a banner); the agent's own logging is off.
"""

from __future__ import annotations

import logging
import os
import signal
import sys


def exit_code_of(failure) -> int:
    """A ProcessFailure's exit code as a shell reports it (a rank killed by signal N: 128 + N)."""
    code = int(failure.exitcode)
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from jpeglm.errors import UserError
    from jpeglm.logs import setup_logging

    setup_logging()
    # The agent's modules set their own loggers' levels (so a parent's level would not do): quiet each.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)  # a failed rank: our one line below says it
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except SignalException as e:
        # The ranks got the signal from the agent and said what they did with it.
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = exit_code_of(failure)
        if code == UserError.exit_code and 0 in e.failures and exit_code_of(e.failures[0]) == code:
            return code  # a refusal (bad flag, data, config): rank 0 printed `jpeglm train: error: ...`
        what = f"signal {signal.Signals(-failure.exitcode).name}" if failure.exitcode < 0 else f"exit code {code}"
        print(f"{e.name}: rank {rank} ended with {what} (its output above says why)", file=sys.stderr, flush=True)
        return code
    return 0


def _main() -> int:
    try:
        return main()
    except KeyboardInterrupt:  # before torchrun's agent handles signals (importing torch): nothing started yet
        print("\ninterrupted before the ranks started", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(_main())
