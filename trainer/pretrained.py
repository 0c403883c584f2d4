"""The exported model format: a folder any tool can load without DeepSpeed.

    DIR/model.safetensors   state_dict of trainer.model.Transformer (names as in model.py)
    DIR/config.json         {"format": "jpeglm", "format_version": 1, "model": ModelConfig fields,
                             "tokenizer": {"fingerprint", "vocab_size", "bos_id", "eos_id"}, "source": {...}}
    DIR/tokenizer.model     the SentencePiece model the weights were trained with

`jpeglm export` writes it from a DeepSpeed checkpoint; `jpeglm sample` reads it (and Hugging Face Llama
folders, via trainer/hf.py).
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from trainer.model import ModelConfig, Transformer

FORMAT = "jpeglm"
FORMAT_VERSION = 1


def save_pretrained(
    state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str,
    tokenizer_path: str | None = None,
    tokenizer_meta: dict | None = None,
    source: dict | None = None,
    codec: dict | None = None,
) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "tokenizer": tokenizer_meta or {},
        "source": source or {},
    }
    if codec:
        meta["codec"] = dict(codec)  # the training images' size and quality (evaluation and sampling read it)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.model"))


def is_pretrained_dir(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not (os.path.isfile(cfg) and os.path.isfile(os.path.join(path, "model.safetensors"))):
        return False
    with open(cfg) as f:
        return json.load(f).get("format") == FORMAT


def load_pretrained(path: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> tuple[Transformer, dict]:
    """(model in eval mode, config.json contents). Raises ValueError naming what is wrong with the folder."""
    from safetensors.torch import load_file

    if not is_pretrained_dir(path):
        raise ValueError(f"{path} is not an exported jpeglm model (expected config.json with format 'jpeglm' and model.safetensors)")
    with open(os.path.join(path, "config.json")) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} is not supported (expected {FORMAT_VERSION})")
    cfg = ModelConfig.from_dict(meta["model"])
    with torch.device("meta"):
        model = Transformer(cfg)
    state = load_file(os.path.join(path, "model.safetensors"), device=str(device))
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval(), meta
