"""`jpeglm export`: consolidate a ZeRO-3 training checkpoint into one safetensors file, loadable without DeepSpeed.

    jpeglm export --checkpoint RUN_DIR --out model/                  (latest checkpoint of the run)
    jpeglm export --checkpoint RUN_DIR/checkpoints/global_step200 --out model/ --dtype bf16
    jpeglm export --checkpoint RUN_DIR --out hf-model/ --format hf   (Hugging Face Llama folder, trainer/hf.py)

The native format is trainer/pretrained.py's folder (model.safetensors, config.json, tokenizer.model), read by
`trainer.pretrained.load_pretrained` with plain torch and trainer/model.py. Consolidation gathers every rank's fp32
master partitions (DeepSpeed's zero_to_fp32, in this process, no GPU or process group), so it works for a
checkpoint saved on any number of processes; it needs the model's fp32 size in RAM (26 GB for 7b).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time

from trainer import checkpoint as ckpt

log = logging.getLogger(__name__)

def consolidate(checkpoint_dir: str):
    """(state_dict of fp32 CPU tensors named as in trainer/model.py, ModelConfig, tokenizer path or None, meta).

    checkpoint_dir: a training run dir (its latest checkpoint), its checkpoints/ folder, or one global_stepN folder.
    meta: {"checkpoint", "step", "tokenizer" (fingerprint, vocab_size, bos_id, eos_id, ...), "config" (the run's
    full config), "data", "codec" (the training images' size and quality; None in checkpoints from before it was recorded:
    trainer.pretrained.run_codec then reads the data's manifest)}. Raises trainer.checkpoint.CheckpointError if there is no complete checkpoint there."""
    import torch

    from trainer.model import ModelConfig, Transformer

    if "://" in checkpoint_dir:
        raise ckpt.CheckpointError(f"{checkpoint_dir}: training checkpoints are read from a filesystem path; copy it "
                                   "locally first (or export it where it was trained)")
    root, tag = ckpt.resolve(checkpoint_dir)
    state = ckpt.read_state(root, tag)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    t0 = time.perf_counter()
    # zero_to_fp32 prints a line per stage and draws progress bars: keep them unless it fails.
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            state_dict = get_fp32_state_dict_from_zero_checkpoint(root, tag)
    except BaseException:
        sys.stderr.write(out.getvalue() + err.getvalue())
        raise
    cfg = ModelConfig.from_dict(state["model"])
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    if got != expected:
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        wrong = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise ckpt.CheckpointError(f"{os.path.join(root, tag)} does not match its model config: missing {missing[:3]}, "
                                   f"unexpected {extra[:3]}, wrong shapes {wrong[:3]}")
    state_dict = {k: v.detach().float().contiguous() for k, v in state_dict.items()}
    tokenizer_path = os.path.join(root, tag, ckpt.TOKENIZER_FILE)
    if not os.path.isfile(tokenizer_path):
        tokenizer_path = None
    log.info("consolidated %s (step %d, %d tensors) in %.1f s", os.path.join(root, tag), state["step"],
             len(state_dict), time.perf_counter() - t0)
    meta = {"checkpoint": os.path.join(root, tag), "step": state["step"], "tokenizer": state["tokenizer"],
            "config": state["config"], "data": state["data"], "codec": state.get("codec")}
    return state_dict, cfg, tokenizer_path, meta


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="training run dir (exports its latest checkpoint), its checkpoints/ folder, or a "
                             "checkpoints/global_stepN folder")
    parser.add_argument("--out", required=True, help="output folder, local (created; existing files are overwritten)")
    parser.add_argument("--format", choices=("native", "hf"), default="native",
                        help="native: model.safetensors + config.json + tokenizer.model for trainer/pretrained.py "
                             "(default); hf: a Hugging Face Llama folder (transformers / vLLM)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="dtype of the stored weights (default fp32, the master weights exactly)")


def run(args: argparse.Namespace) -> int:
    from trainer.run_dir import check_output_folder

    out_dir = check_output_folder(args.out, "--out", local_only=True)  # before loading anything

    from trainer.devices import DTYPES
    from trainer.pretrained import run_codec, save_pretrained

    state_dict, cfg, tokenizer_path, meta = consolidate(args.checkpoint)
    if tokenizer_path is None:
        print(f"jpeglm export: warning: {meta['checkpoint']} has no {ckpt.TOKENIZER_FILE}; exporting weights and "
              "config only", file=sys.stderr)
    dtype = DTYPES[args.dtype]
    if args.format == "hf":
        from trainer.hf import save_hf

        save_hf(state_dict, cfg, out_dir, tokenizer_path, dtype=dtype, tokenizer_meta=meta["tokenizer"],
                codec=run_codec(meta))
    else:
        save_pretrained({k: v.to(dtype) for k, v in state_dict.items()}, cfg, out_dir, tokenizer_path=tokenizer_path,
                        tokenizer_meta=meta["tokenizer"], codec=run_codec(meta),
                        source={"checkpoint": meta["checkpoint"], "step": meta["step"], "data": meta["data"]["uri"]})
    n = sum(v.numel() for v in state_dict.values())
    print(f"exported {meta['checkpoint']} (step {meta['step']}, {n / 1e6:,.2f}M parameters, {args.dtype}) "
          f"to {out_dir} ({args.format} format)")
    return 0
