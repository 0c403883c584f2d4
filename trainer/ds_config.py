"""Run configuration: a preset YAML plus `key=value` overrides -> a validated config -> the DeepSpeed config.

A preset (7b, 1b, 150m, tiny: trainer/configs/NAME.yaml) or any YAML path (e.g. trainer/configs/demo.yaml, what
`make demo` trains) has these sections; every key is listed with its default in DEFAULTS below, and an unknown
section or key is an error (a typo must never be silently ignored):

    model       trainer.model.ModelConfig fields
    train       seq_len, micro_batch_size, global_batch_size, max_steps, seed, precision, device
    optimizer   AdamW + warmup/cosine schedule + clipping
    zero        DeepSpeed ZeRO stage and its knobs
    checkpoint  every_steps, keep_last
    eval        every_steps, max_samples, sample_grid
    log         every_steps, tensorboard, peak_tflops
    data        shuffle_block_shards, prefetch_micro_batches, read_threads
    distributed startup_timeout_s, collective_timeout_s

Overrides use dotted keys, values parsed as YAML: `optimizer.lr=1e-3 model.n_layers=2 train.device=cpu`.
"""

from __future__ import annotations

import copy
import os
from importlib import resources

import yaml

from jpeglm.errors import UserError

PRESETS = ("7b", "1b", "150m", "tiny")

DEFAULTS: dict[str, dict] = {
    "model": {
        "vocab_size": 320,
        "n_layers": 32,
        "d_model": 4096,
        "n_heads": 32,
        "n_kv_heads": None,
        "ffn_dim": 11008,
        "max_seq_len": 12288,
        "rope_theta": 10000.0,
        "norm_eps": 1e-5,
        "init_std": 0.02,
        "activation_checkpointing": 0,
    },
    "train": {
        # Tokens per training sample. Data rows (the manifest's seq_len) are cut into seq_len_data / seq_len windows.
        "seq_len": 12288,
        "micro_batch_size": 1,
        # Samples per optimizer step over all processes; gradient accumulation = global / (micro * world size).
        "global_batch_size": 64,
        "max_steps": 1000,
        "seed": 1234,
        "precision": "bf16",  # bf16 | fp32
        "device": "auto",  # auto (cuda if available) | cuda | cpu
        # Fine-tune: start from this model instead of random weights (an exported jpeglm folder or a Hugging Face
        # Llama folder, local or s3://). Its config replaces the model section (except activation_checkpointing).
        "init_from": None,
    },
    "optimizer": {
        "lr": 3.0e-4,
        "min_lr_ratio": 0.1,  # cosine decays to lr * min_lr_ratio at max_steps
        "warmup_steps": 100,  # linear warmup from lr / warmup_steps
        "weight_decay": 0.1,  # on matrices and embeddings only (not on RMSNorm weights)
        "betas": [0.9, 0.95],
        "eps": 1.0e-8,
        "grad_clip": 1.0,  # max global gradient norm; 0 disables clipping
    },
    "zero": {
        "stage": 3,
        "init": True,  # build the model under deepspeed.zero.Init (partitioned at construction; stage 3 only)
        "overlap_comm": True,
        "reduce_bucket_size": 50_000_000,
        "prefetch_bucket_size": 50_000_000,
        "param_persistence_threshold": 100_000,
        "max_live_parameters": 1_000_000_000,
    },
    "checkpoint": {
        "every_steps": 500,  # also saved at the end and on SIGTERM/SIGINT
        "keep_last": 3,
    },
    "eval": {
        "every_steps": 250,  # validation loss on the manifest's validation split; 0 = only at the end
        # validation samples (rows x windows) per evaluation, spread evenly over the whole split, the same on any
        # number of processes (all of them when the split has fewer)
        "max_samples": 256,
        # at each evaluation, a grid of samples (4 from BOS + this many completions of the first validation images at
        # ratio 0.5) to RUN/images/step-N.png and TensorBoard; 0 = none. Every rank samples, one token at a time,
        # each a ZeRO-3 gather of all weights: minutes or more at 1b/7b, so 0 there (`jpeglm eval` on checkpoints).
        "sample_grid": 3,
    },
    "log": {
        "every_steps": 10,  # console line every N steps (metrics.jsonl and TensorBoard get every step)
        "tensorboard": True,
        "peak_tflops": None,  # per-device peak for MFU; None = look up the GPU in trainer.metrics.PEAK_TFLOPS
    },
    "data": {
        "shuffle_block_shards": 4,  # rows are shuffled within blocks of this many (permuted) shards
        # micro-batches of this process read ahead of training (host memory: this x micro x the row's bytes)
        "prefetch_micro_batches": 8,
        "read_threads": 4,  # reads in flight per process (ranged reads of rows, row indexes)
    },
    "distributed": {
        # Process-group creation, checkpoint loading, the initial weights and waiting for rank 0's universal
        # conversion (which runs before the group exists) may take long: a 7B state converts in tens of minutes.
        "startup_timeout_s": 7200.0,
        # Every collective once training runs (steps, saves, validation): a rank that stops answering for this
        # long fails the job (NCCL's default is 600 s; a 7B save to a shared filesystem can take minutes).
        "collective_timeout_s": 1800.0,
    },
}

_CHOICES = {
    ("train", "precision"): ("bf16", "fp32"),
    ("train", "device"): ("auto", "cuda", "cpu"),
    ("zero", "stage"): (0, 1, 2, 3),
}


class ConfigError(UserError, ValueError):
    """A config or override that cannot be used; the message says what to fix."""


def preset_path(name: str) -> str:
    return str(resources.files("trainer").joinpath("configs", f"{name}.yaml"))


def load_config(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Merge DEFAULTS <- preset (name or YAML path) <- overrides, then validate. Raises ConfigError."""
    if preset in PRESETS:
        path = preset_path(preset)
    elif os.path.isfile(preset):
        path = preset
    else:
        raise ConfigError(f"--config {preset!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    with open(path) as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
    cfg = copy.deepcopy(DEFAULTS)
    for section, values in loaded.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        for key, value in values.items():
            _set(cfg, f"{section}.{key}", value, origin=path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. optimizer.lr=1e-3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
        _set(cfg, key.strip(), value, origin="command line")
    validate(cfg)
    return cfg


# Keys of older jpeglm versions -> what replaced them (read-ahead is counted in micro-batches, not shard blocks).
_RENAMED = {("data", "prefetch_blocks"): "prefetch_micro_batches (read-ahead in micro-batches)"}
# Keys whose default is None: the type a non-null value must have.
_NULLABLE_TYPES = {("model", "n_kv_heads"): int, ("log", "peak_tflops"): float}


def _set(cfg: dict, dotted: str, value, origin: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{origin}: key {dotted!r} must be section.key, one of the sections {sorted(DEFAULTS)}")
    section, key = parts
    if section not in DEFAULTS:
        raise ConfigError(f"{origin}: unknown section {section!r} in {dotted!r}; sections: {sorted(DEFAULTS)}")
    if (section, key) in _RENAMED:
        raise ConfigError(f"{origin}: {dotted} was replaced by {section}.{_RENAMED[section, key]}")
    if key not in DEFAULTS[section]:
        raise ConfigError(f"{origin}: unknown key {dotted!r}; keys of {section}: {sorted(DEFAULTS[section])}")
    if value is not None:
        default = DEFAULTS[section][key]
        expected = _NULLABLE_TYPES.get((section, key), type(default))
        cfg[section][key] = _coerce(value, expected, f"{origin}: {dotted}")
    elif (section, key) in _NULLABLE_TYPES:
        cfg[section][key] = None
    else:
        raise ConfigError(f"{origin}: {dotted} needs a value (default {DEFAULTS[section][key]!r})")


def _coerce(value, expected: type, what: str):
    if expected in (int, float) and isinstance(value, str):
        # PyYAML reads "1e-3" (no dot) as a string; a number written that way is meant as a number.
        try:
            value = float(value)
        except ValueError:
            pass
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, float) and value.is_integer():
        return int(value)  # 5.0e+7 for a byte count
    if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
        raise ConfigError(f"{what} must be a {expected.__name__}, got {value!r}")
    return value


def validate(cfg: dict) -> None:
    from trainer.model import ModelConfig

    for (section, key), allowed in _CHOICES.items():
        if cfg[section][key] not in allowed:
            raise ConfigError(f"{section}.{key}={cfg[section][key]!r} is not one of {allowed}")
    try:
        model = ModelConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None
    t = cfg["train"]
    positive = [("train", "seq_len"), ("train", "micro_batch_size"), ("train", "global_batch_size"),
                ("optimizer", "lr"), ("data", "shuffle_block_shards"), ("data", "prefetch_micro_batches"),
                ("data", "read_threads"), ("checkpoint", "keep_last"), ("model", "n_layers"),
                ("distributed", "startup_timeout_s"), ("distributed", "collective_timeout_s")]
    for section, key in positive:
        if cfg[section][key] is None or cfg[section][key] <= 0:
            raise ConfigError(f"{section}.{key} must be positive, got {cfg[section][key]!r}")
    non_negative = [("train", "max_steps"), ("optimizer", "warmup_steps"), ("optimizer", "weight_decay"),
                    ("optimizer", "grad_clip"), ("checkpoint", "every_steps"), ("eval", "every_steps"),
                    ("eval", "max_samples"), ("eval", "sample_grid"), ("log", "every_steps")]
    for section, key in non_negative:
        if cfg[section][key] is None or cfg[section][key] < 0:
            raise ConfigError(f"{section}.{key} must be >= 0, got {cfg[section][key]!r}")
    if t["seq_len"] > model.max_seq_len:
        raise ConfigError(f"train.seq_len={t['seq_len']} exceeds model.max_seq_len={model.max_seq_len}")
    if t["global_batch_size"] % t["micro_batch_size"]:
        raise ConfigError(f"train.global_batch_size={t['global_batch_size']} is not a multiple of "
                          f"train.micro_batch_size={t['micro_batch_size']}")
    if not 0.0 <= cfg["optimizer"]["min_lr_ratio"] <= 1.0:
        raise ConfigError("optimizer.min_lr_ratio must be in [0, 1]")
    betas = cfg["optimizer"]["betas"]
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
        raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {betas!r}")
    if cfg["log"]["peak_tflops"] is not None and not (
        isinstance(cfg["log"]["peak_tflops"], (int, float)) and cfg["log"]["peak_tflops"] > 0
    ):
        raise ConfigError(f"log.peak_tflops must be a positive number or null, got {cfg['log']['peak_tflops']!r}")


def gradient_accumulation_steps(cfg: dict, world_size: int) -> int:
    """Micro-batches per process per optimizer step; the global batch is fixed, whatever the world size."""
    t = cfg["train"]
    per_micro_step = t["micro_batch_size"] * world_size
    if t["global_batch_size"] % per_micro_step:
        raise ConfigError(
            f"train.global_batch_size={t['global_batch_size']} is not divisible by micro_batch_size x processes = "
            f"{t['micro_batch_size']} x {world_size}; change the batch sizes or the number of processes"
        )
    return t["global_batch_size"] // per_micro_step


def deepspeed_config(cfg: dict, world_size: int, load_universal: bool = False) -> dict:
    """The DeepSpeed config dict for this run. The optimizer is a client torch AdamW and the learning rate a pure
    function of the step (trainer.train), so neither appears here."""
    t, z = cfg["train"], cfg["zero"]
    ds = {
        "train_batch_size": t["global_batch_size"],
        "train_micro_batch_size_per_gpu": t["micro_batch_size"],
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg, world_size),
        "gradient_clipping": float(cfg["optimizer"]["grad_clip"]),
        "bf16": {"enabled": t["precision"] == "bf16"},
        "zero_optimization": {
            "stage": z["stage"],
            "overlap_comm": bool(z["overlap_comm"]),
            "contiguous_gradients": True,
            "reduce_bucket_size": int(z["reduce_bucket_size"]),
        },
        # torch.optim.AdamW as the client optimizer: no JIT-compiled op, and bitwise-resumable (stack notes).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if z["stage"] == 3:
        ds["zero_optimization"].update(
            {
                "stage3_prefetch_bucket_size": int(z["prefetch_bucket_size"]),
                "stage3_param_persistence_threshold": int(z["param_persistence_threshold"]),
                "stage3_max_live_parameters": int(z["max_live_parameters"]),
                # Export consolidates the fp32 shards itself (trainer/export.py); no 16-bit copy at save time.
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds
