"""Loading a trained model for inference: whatever a checkpoint folder holds -> model + tokenizer + codec.

    loaded = load_checkpoint("model/", torch.device("cpu"), torch.float32)     # LoadedModel
    codec = checkpoint_codec("RUN")                                            # {"size", "quality", ...}, no weights

A checkpoint is any of: an exported jpeglm folder (trainer/pretrained.py), a Hugging Face Llama folder
(trainer/hf.py; e.g. the authors' released weights), or a training run dir / DeepSpeed checkpoint
(trainer/export.py consolidates it); a local path or s3:// (training runs: local only). The image size and JPEG
quality the model was trained on come from the checkpoint (its "codec" record; 256 / 25 when it has none).
Used by `jpeglm sample`, `jpeglm eval` and fine-tuning (trainer/init_from.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass, field

import torch

from jpeglm.errors import UserError
from trainer.model import Transformer
from trainer.pretrained import DEFAULT_CODEC

log = logging.getLogger("jpeglm.loading")


class LoadError(UserError):
    """A checkpoint that cannot be loaded (missing, unreadable, tokenizer mismatch); the message says why."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object  # pipeline.tokenizer.Tokenizer
    kind: str  # "jpeglm", "huggingface" or "training-run"
    source: str
    codec: dict = field(default_factory=lambda: dict(DEFAULT_CODEC))  # image size, quality, ...
    revision: str | None = None  # a training run's resolved checkpoint (a run dir's latest moves as it trains)


def read_checkpoint_config(uri: str) -> dict | None:
    """The config.json of a checkpoint folder (local or s3://), or None if it has none."""
    from pipeline import storage

    cfg_uri = storage.join(uri, "config.json")
    if not storage.exists(cfg_uri):
        return None
    return json.loads(storage.read_bytes(cfg_uri))


def require_checkpoint(uri: str) -> None:
    """LoadError unless `uri` (local or s3://) exists."""
    from pipeline import storage

    if not storage.exists(uri):
        raise LoadError(f"--checkpoint {uri}: no such folder")


def checkpoint_codec(uri: str) -> dict:
    """The codec record (image size, quality) of a checkpoint, read without loading its weights."""
    from trainer import checkpoint as ckpt, hf, pretrained

    require_checkpoint(uri)
    config = read_checkpoint_config(uri)
    if config is not None and config.get("format") == pretrained.FORMAT:
        return pretrained.with_codec_defaults(config.get("codec"))
    if config is not None and hf.is_llama_config(config):
        return pretrained.with_codec_defaults((config.get("jpeglm") or {}).get("codec"))
    if "://" in uri:
        raise LoadError(f"--checkpoint {uri}: training checkpoints are read from a filesystem path; copy it "
                        "locally first (or export it where it was trained)")
    state = ckpt.read_state(*ckpt.resolve(uri))
    return pretrained.run_codec({"codec": state.get("codec"), "data": state.get("data")})


def load_checkpoint(
    uri: str, device: torch.device, dtype: torch.dtype, tokenizer_uri: str | None = None
) -> LoadedModel:
    """Detect what `uri` holds and load model + tokenizer + codec from it (see the module docstring). LoadError
    names what is wrong with it."""
    try:
        return _load(os.fspath(uri), device, dtype, tokenizer_uri)
    except (ValueError, FileNotFoundError) as e:
        # Refusals of the loaders (trainer.pretrained, trainer.hf, pipeline.tokenizer) name the problem.
        raise LoadError(str(e)) from None


def _load(uri: str, device: torch.device, dtype: torch.dtype, tokenizer_uri: str | None) -> LoadedModel:
    from pipeline import storage
    from pipeline.tokenizer import Tokenizer
    from trainer import hf, pretrained

    require_checkpoint(uri)
    config = read_checkpoint_config(uri)
    revision = None
    with contextlib.ExitStack() as stack:
        if config is not None and config.get("format") == pretrained.FORMAT:
            kind = "jpeglm"
            path = stack.enter_context(storage.local_folder(uri))
            model, meta = pretrained.load_pretrained(path, device=device, dtype=dtype)
            tok_path, tok_meta = os.path.join(path, "tokenizer.model"), meta.get("tokenizer") or {}
            codec = meta["codec"]
        elif config is not None and hf.is_llama_config(config):
            kind = "huggingface"
            path = stack.enter_context(storage.local_folder(uri))
            model, info = hf.load_hf_local(path, device=device, dtype=dtype)
            tok_path, tok_meta = info["tokenizer_path"], (config.get("jpeglm") or {}).get("tokenizer") or {}
            codec = info["codec"]
        else:
            kind = "training-run"
            try:
                from trainer.export import consolidate
            except ImportError as e:
                raise LoadError(f"--checkpoint {uri}: not an exported or Hugging Face folder, and training runs "
                                f"cannot be read here ({e})") from None
            state, cfg, tok_path, meta = consolidate(uri)  # quiet: DeepSpeed's print-out only if it fails
            tok_meta, codec = meta.get("tokenizer") or {}, pretrained.run_codec(meta)
            revision = f"{os.path.basename(os.path.normpath(meta['checkpoint']))} (step {meta['step']})"
            with torch.device("meta"):
                model = Transformer(cfg)
            model.load_state_dict(state, strict=True, assign=True)
        log.info("checkpoint %s: %s, %.1fM parameters, %dx%d images at quality %d", uri,
                 {"jpeglm": "exported jpeglm folder", "huggingface": "Hugging Face Llama folder",
                  "training-run": "training run (DeepSpeed checkpoint, consolidated)"}[kind],
                 sum(p.numel() for p in model.parameters()) / 1e6, codec["size"], codec["size"], codec["quality"])
        tok_path = tokenizer_uri or tok_path
        if not tok_path:
            raise LoadError(f"{uri}: no tokenizer.model found; pass --tokenizer PATH")
        tokenizer = Tokenizer.load(tok_path)  # read into memory: the temporary copy may go now
    expected = tok_meta.get("fingerprint")
    if expected and expected != tokenizer.fingerprint:
        log.warning("tokenizer %s is not the one the model was trained with (fingerprint %s, expected %s): "
                    "samples will be garbage unless the two are equivalent", tok_path, tokenizer.fingerprint[:12],
                    expected[:12])
    model = model.to(device=device, dtype=dtype).eval()
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise LoadError(f"tokenizer vocab_size {tokenizer.vocab_size} != model vocab_size {model.cfg.vocab_size}")
    return LoadedModel(model, tokenizer, kind, uri, codec, revision)
