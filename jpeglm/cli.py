"""The `jpeglm` command: a thin dispatcher over subcommand modules.

Each subcommand lives in its own module exposing `configure_parser(parser)` and `run(args) -> int`.
Only the chosen subcommand's module is imported, so `jpeglm --help` stays instant and
`jpeglm preprocess` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from jpeglm.errors import UserError

# name -> (module, one-line help). Order is the order `jpeglm --help` lists them.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "preprocess": ("pipeline.preprocess.cli", "images -> canonical JPEG -> BPE tokens -> packed WebDataset shards (Ray)"),
    "inspect": ("pipeline.inspect", "summarize a preprocess output; dump an image back from the shards"),
    "report": ("pipeline.report", "a preprocess output as one HTML page: statuses, histograms, duplicates, failures"),
    "train": ("trainer.train", "train the Llama decoder with DeepSpeed ZeRO-3 on preprocessed shards"),
    "checkpoint": ("trainer.convert", "prepare a run's checkpoint to resume on another number of processes (convert)"),
    "export": ("trainer.export", "consolidate a checkpoint into safetensors (native or Hugging Face Llama format)"),
    "sample": ("trainer.sample", "generate or complete images with a trained checkpoint"),
    "eval": ("evaluation.cli", "FID/KID of completions and samples, decode validity, bits per byte"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jpeglm",
        description="JPEG-LM: generate images by predicting the bytes of their JPEG files.",
    )
    from jpeglm import __version__

    parser.add_argument("--version", action="version", version=f"jpeglm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            module = importlib.import_module(module_name)
            module.configure_parser(p)
            p.set_defaults(_run=module.run)
    return parser


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher passes `--local_rank=N` before our subcommand; torchrun and DeepSpeed itself read
    LOCAL_RANK from the environment, so move it there instead of making every subcommand accept it."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `jpeglm ... | head`: the reader left; stop quietly as cat does (Python docs, "Note on SIGPIPE").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        # Ctrl-C before a command runs (build_parser imports its module, e.g. torch for several seconds).
        print("\njpeglm: interrupted", file=sys.stderr, flush=True)
        return 130


def _main(argv: list[str] | None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"jpeglm {args.command}: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        # Commands that can resume say how themselves (and return 130); this is the fallback: no traceback.
        print(f"\njpeglm {args.command}: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
