"""What determines a preprocess output's bytes: the config (from the flags), its hash, and canonical JSON."""

from __future__ import annotations

import argparse
import hashlib
import json

from jpeglm.errors import UserError

SPLITS = ("train", "validation")
DEFAULTS = dict(bpe_sample=10_000, vocab_size=320, seq_len=12_288, images_per_unit=1000, shard_size="1GB",
                val_fraction=0.01, min_side=0, last_row="pad", image_size=256, seed=0, dedup="near",
                images_per_bucket=20_000, max_failed_fraction=0.01, near_radius=4, max_aspect_ratio=0.0)
DEDUP_MODES = ("exact", "near", "none")
MAX_NEAR_RADIUS = 12  # 13 bands of ~5 bits; beyond ~8 unrelated images match (bench/bench_neardup.py)


class PreprocessError(UserError):
    """A refused configuration or output: the message says what to do."""


def config_from_args(args: argparse.Namespace, inputs: list[str], excludes: list[str] | None = None) -> dict:
    """Everything that determines the output's bytes (and nothing else: not --num-cpus, --address,
    --max-failed-fraction, ...). `inputs`, `excludes`: the resolved input and --exclude URIs
    (checks.resolve_inputs / checks.resolve_excludes)."""
    from pipeline import codec
    from pipeline.tokenizer import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE

    if args.tokenizer is None and not MIN_VOCAB_SIZE <= args.vocab_size <= MAX_VOCAB_SIZE:
        raise PreprocessError(f"--vocab-size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] (256 bytes + <unk>, <s>, "
                              f"</s>; uint16 token ids), got {args.vocab_size}")
    if args.min_side < 0:
        raise PreprocessError(f"--min-side must be >= 0, got {args.min_side}")
    if args.seq_len < 2:
        raise PreprocessError("--seq-len must be >= 2")
    if not 0 <= args.near_radius <= MAX_NEAR_RADIUS:
        raise PreprocessError(f"--near-radius must be in [0, {MAX_NEAR_RADIUS}], got {args.near_radius}")
    if args.max_aspect_ratio and args.max_aspect_ratio < 1:
        raise PreprocessError(f"--max-aspect-ratio must be >= 1 (longer side / shorter side), got "
                              f"{args.max_aspect_ratio}")
    config = {
        "inputs": inputs,
        "image_column": args.image_column,
        "tokenizer": None,  # filled in with the given tokenizer's fingerprint (None: fitted here)
        "bpe_sample": args.bpe_sample,
        "vocab_size": args.vocab_size,
        "seq_len": args.seq_len,
        "images_per_unit": args.images_per_unit,
        "images_per_bucket": args.images_per_bucket,
        "shard_size": args.shard_size,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "dedup": args.dedup,
        "last_row": args.last_row,
        "min_side": args.min_side,
        "max_pixels": args.max_pixels or codec.DEFAULT_MAX_PIXELS,
        "codec": codec_params(args.image_size),
    }
    # Curation keys only when used: outputs made without them keep their config hash (and resume).
    excludes = excludes or []
    if args.dedup == "near" or excludes:
        config["near_radius"] = args.near_radius
    if excludes:
        config["exclude"] = excludes
    if args.max_aspect_ratio:
        config["max_aspect_ratio"] = args.max_aspect_ratio
    return config


def codec_params(size: int | None = None) -> dict:
    from pipeline import codec

    return {"size": size or codec.SIZE, "quality": codec.QUALITY, "subsampling": "4:2:0", "restart_interval_mcus": 1}


def config_hash(config: dict) -> str:
    return hashlib.sha256(canonical_json(config)).hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def pretty_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def config_difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not old:
        return "its config is unknown"
    shown = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" if k != "tokenizer" else "tokenizer fingerprint differs"
             for k in keys[:4]]
    return "differs in " + "; ".join(shown) if shown else "differs"
