"""The exported model format: a folder any tool can load without DeepSpeed.

    DIR/model.safetensors   state_dict of trainer.model.Transformer (names as in model.py)
    DIR/config.json         {"format": "jpeglm", "format_version": 1, "model": ModelConfig fields,
                             "tokenizer": {"fingerprint", "vocab_size", "bos_id", "eos_id"},
                             "codec": {"size", "quality", ...}, "source": {...}}
    DIR/tokenizer.model     the SentencePiece model the weights were trained with

`jpeglm export` writes it from a DeepSpeed checkpoint; `jpeglm sample` reads it (and Hugging Face Llama
folders, via trainer/hf.py).

"codec" is the canonical JPEG form the model was trained on (the preprocess manifest's `codec`: image size,
quality, ...); a folder without it means the paper's 256x256 at quality 25 (`with_codec_defaults`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch

from trainer.model import ModelConfig, Transformer

FORMAT = "jpeglm"
FORMAT_VERSION = 1
DEFAULT_CODEC = {"size": 256, "quality": 25}  # the paper's; what a checkpoint without a "codec" record means

log = logging.getLogger(__name__)


def with_codec_defaults(record: dict | None) -> dict:
    """A checkpoint's codec record with the defaults filled in: at least {"size": int, "quality": int}."""
    out = dict(DEFAULT_CODEC)
    out.update({k: v for k, v in (record or {}).items() if v is not None})
    out["size"], out["quality"] = int(out["size"]), int(out["quality"])
    return out


def run_codec(meta: dict) -> dict:
    """The codec of a training checkpoint from trainer.export.consolidate's meta: its own "codec" record, else
    (checkpoints written before the trainer recorded it) the manifest of the data it was trained on."""
    if meta.get("codec"):
        return with_codec_defaults(meta["codec"])
    data_uri = (meta.get("data") or {}).get("uri")
    if data_uri:
        from pipeline.manifest import read_manifest

        try:
            return with_codec_defaults(read_manifest(data_uri).get("codec"))
        except (OSError, ValueError) as e:  # DataError is a ValueError
            log.warning("the checkpoint does not record its image size and its data %s is not readable (%s): "
                        "assuming %s", data_uri, e, DEFAULT_CODEC)
    return with_codec_defaults(None)


def save_pretrained(
    state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    tokenizer_meta: dict | None = None,
    source: dict | None = None,
    codec: dict | None = None,
) -> None:
    """Write the folder (see the module docstring). codec: the training data's codec record (size, quality, ...);
    None means the defaults."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": cfg.to_dict(),
        "tokenizer": tokenizer_meta or {},
        # The training data's record as it is (size, quality, subsampling, ...): evaluation and sampling read it.
        "codec": dict(codec) if codec else with_codec_defaults(None),
        "source": source or {},
    }
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
    if tokenizer_path:
        shutil.copyfile(tokenizer_path, os.path.join(out_dir, "tokenizer.model"))


def is_pretrained_dir(path: str | os.PathLike) -> bool:
    cfg = os.path.join(path, "config.json")
    if not (os.path.isfile(cfg) and os.path.isfile(os.path.join(path, "model.safetensors"))):
        return False
    with open(cfg) as f:
        return json.load(f).get("format") == FORMAT


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[Transformer, dict]:
    """(model in eval mode, config.json contents; its "codec" is `with_codec_defaults(...)` of the stored record).
    Raises ValueError naming what is wrong with the folder."""
    from safetensors.torch import load_file

    if not is_pretrained_dir(path):
        raise ValueError(f"{path} is not an exported jpeglm model (expected config.json with format 'jpeglm' and "
                         "model.safetensors)")
    with open(os.path.join(path, "config.json")) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} is not supported "
                         f"(expected {FORMAT_VERSION})")
    cfg = ModelConfig.from_dict(meta["model"])
    with torch.device("meta"):
        model = Transformer(cfg)
    state = load_file(os.path.join(path, "model.safetensors"), device=str(device))
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    meta["codec"] = with_codec_defaults(meta.get("codec"))
    return model.to(device).eval(), meta
