"""The run configuration of `jpeglm train`: one dataclass per section; each field's type, default and meaning here.

    cfg = load_config("tiny", ["optimizer.lr=1e-3", "train.max_steps=100"])   # a RunConfig, checked
    cfg.train.max_steps, cfg.optimizer.lr, cfg.model.n_layers                 # typed reads, no string keys
    cfg.to_dict()                                                             # config.yaml and checkpoints hold this

A preset is a YAML file of trainer/configs/ (`--config tiny`) or any YAML path, with the sections below; keys it
leaves out keep their defaults. Overrides are `section.key=value`, the value parsed as YAML. The loader walks the
dataclasses: an unknown section or key, a value of the wrong type or outside its choices is refused in one line
(ConfigError) that says where it came from; then `validate` checks what involves several fields. docs/training.md
lists every field (tests/test_config.py checks that it does).
"""

from __future__ import annotations

import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from typing import Literal

from jpeglm.errors import UserError


class ConfigError(UserError, ValueError):
    """A config or override that cannot be used; the message says what to fix."""


def setting(default, doc: str):
    """A config field: its default and its one-line meaning (docs/training.md shows both)."""
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    """The decoder's shapes (trainer/model.py builds it): the run config's `model` section, and "model" in an
    exported model's config.json."""

    vocab_size: int = setting(320, "token ids; at least the tokenizer's vocabulary")
    n_layers: int = setting(32, "decoder layers")
    d_model: int = setting(4096, "hidden size")
    n_heads: int = setting(32, "attention heads; d_model / n_heads (the head size) must be even, for RoPE")
    n_kv_heads: int | None = setting(None, "key/value heads; null = n_heads (multi-head), fewer = grouped-query")
    ffn_dim: int = setting(11008, "SwiGLU hidden size")
    max_seq_len: int = setting(12288, "the context: RoPE positions, and the sampling limit")
    rope_theta: float = setting(10000.0, "RoPE base")
    norm_eps: float = setting(1e-5, "RMSNorm epsilon")
    init_std: float = setting(0.02, "std of the normal initialization")
    activation_checkpointing: int = setting(0, "recompute every k-th layer's activations in backward (0 = off; pure "
                                            "PyTorch, with or without DeepSpeed)")

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("head dimension (d_model / n_heads) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count from the shapes alone (no model needed; works for 7B on a laptop)."""
        d, f, kv = self.d_model, self.ffn_dim, self.n_kv_heads * self.head_dim
        attn = d * d * 2 + d * kv * 2  # wq, wo, wk, wv
        mlp = 3 * d * f
        per_layer = attn + mlp + 2 * d  # + two RMSNorm weights
        n = self.n_layers * per_layer + d  # + final norm
        if not non_embedding:
            n += 2 * self.vocab_size * d  # untied embedding and output head
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, 6N + 12*L*d*T (N = non-embedding params; PaLM appendix B)."""
        t = seq_len or self.max_seq_len
        return 6.0 * self.num_params(non_embedding=True) + 12.0 * self.n_layers * self.d_model * t


@dataclass
class TrainConfig:
    seq_len: int = setting(12288, "tokens per training sample; data rows (the manifest's seq_len) are cut into "
                                  "row length / seq_len windows, so it must divide it")
    micro_batch_size: int = setting(1, "samples per forward/backward pass on each process")
    global_batch_size: int = setting(64, "samples per optimizer step over all processes; gradient accumulation = "
                                         "global / (micro x processes), whatever the number of processes")
    max_steps: int = setting(1000, "optimizer steps of the whole run (a resumed run continues up to it)")
    seed: int = setting(1234, "initial weights, the sample order and every micro-batch's RNG")
    precision: Literal["bf16", "fp32"] = setting("bf16", "bf16 (mixed precision, fp32 master weights) or fp32")
    device: Literal["auto", "cuda", "cpu"] = setting("auto", "auto: cuda when available, else cpu")
    init_from: str | None = setting(None, "fine-tune: start from this exported jpeglm or Hugging Face Llama folder "
                                          "(local or s3://); its config replaces the model section (except "
                                          "activation_checkpointing); same as --init-from")


@dataclass
class OptimizerConfig:
    lr: float = setting(3.0e-4, "peak learning rate (torch AdamW)")
    min_lr_ratio: float = setting(0.1, "the cosine decays to lr x min_lr_ratio at train.max_steps; in [0, 1]")
    warmup_steps: int = setting(100, "linear warmup from lr / warmup_steps to lr over this many steps")
    weight_decay: float = setting(0.1, "on matrices and embeddings only (not on RMSNorm weights)")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas, two numbers in [0, 1)")
    eps: float = setting(1.0e-8, "AdamW epsilon")
    grad_clip: float = setting(1.0, "max global gradient norm; 0 disables clipping")


@dataclass
class ZeroConfig:
    stage: Literal[0, 1, 2, 3] = setting(3, "DeepSpeed ZeRO stage")
    init: bool = setting(True, "build the model under deepspeed.zero.Init (partitioned at construction; stage 3)")
    overlap_comm: bool = setting(True, "overlap gradient reduction with backward (a separate stream; off on CPU)")
    reduce_bucket_size: int = setting(50_000_000, "elements per gradient reduce bucket")
    prefetch_bucket_size: int = setting(50_000_000, "stage 3: elements of parameters fetched ahead")
    param_persistence_threshold: int = setting(100_000, "stage 3: parameters smaller than this stay unpartitioned")
    max_live_parameters: int = setting(1_000_000_000, "stage 3: gathered parameters held at once")


@dataclass
class CheckpointConfig:
    every_steps: int = setting(500, "save every N steps (also at the end and on SIGTERM/SIGINT); 0 = only then")
    keep_last: int = setting(3, "complete checkpoints kept; older ones are deleted")


@dataclass
class EvalConfig:
    every_steps: int = setting(250, "validation loss every N steps on the manifest's validation split; 0 = only "
                                    "at the end")
    max_samples: int = setting(256, "validation samples (rows x windows) per evaluation, spread evenly over the "
                                    "split, the same on any number of processes")
    sample_grid: int = setting(3, "at each evaluation a grid of 4 samples from BOS and this many completions of the "
                                  "first validation images -> RUN/images/step-N.png; 0 = none (minutes at 1b/7b)")
    sample_constrain: Literal["jpeg", "none"] = setting("jpeg", "the grid's sampler: jpeg = the JPEG grammar keeps "
                                                                "every sample a whole image; none = unconstrained")


@dataclass
class LogConfig:
    every_steps: int = setting(10, "console line every N steps (metrics.jsonl and TensorBoard get every step)")
    tensorboard: bool = setting(True, "write RUN/tensorboard/")
    peak_tflops: float | None = setting(None, "per-device peak for MFU; null: look the GPU up in "
                                              "trainer.metrics.PEAK_TFLOPS")


@dataclass
class DataConfig:
    shuffle_block_shards: int = setting(4, "rows are shuffled within blocks of this many (permuted) shards")
    prefetch_micro_batches: int = setting(8, "micro-batches each process reads ahead of training (host memory: "
                                             "this x micro x a row's bytes)")
    read_threads: int = setting(4, "reads in flight per process (ranged reads of rows, row indexes)")


@dataclass
class DistributedConfig:
    startup_timeout_s: float = setting(7200.0, "process group creation, checkpoint loading, initial weights and "
                                               "waiting for rank 0's universal conversion (7B: tens of minutes)")
    collective_timeout_s: float = setting(1800.0, "every collective once training runs: a rank silent this long "
                                                  "fails the job (a 7B save to a shared filesystem takes minutes)")


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"doc": "the decoder's shape"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"doc": "batch, steps, seed, precision"})
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig,
                                       metadata={"doc": "AdamW, warmup + cosine schedule, clipping"})
    zero: ZeroConfig = field(default_factory=ZeroConfig, metadata={"doc": "DeepSpeed ZeRO stage and its knobs"})
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata={"doc": "saving"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"doc": "validation and the sample grid"})
    log: LogConfig = field(default_factory=LogConfig, metadata={"doc": "console, TensorBoard, MFU"})
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "the loader"})
    distributed: DistributedConfig = field(default_factory=DistributedConfig, metadata={"doc": "timeouts"})

    def to_dict(self) -> dict:
        """{section: {key: value}} of plain YAML/JSON types (config.yaml, checkpoints)."""
        return {f.name: {k: list(v) if isinstance(v, tuple) else v
                         for k, v in asdict(getattr(self, f.name)).items()}
                for f in fields(self)}


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in fields(RunConfig)}


def presets() -> tuple[str, ...]:
    """The names of trainer/configs/*.yaml."""
    folder = resources.files("trainer").joinpath("configs")
    return tuple(sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")))


def preset_path(name: str) -> str:
    return str(resources.files("trainer").joinpath("configs", f"{name}.yaml"))


def load_config(preset: str, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- preset (a name or a YAML path) <- overrides, checked. Raises ConfigError."""
    import yaml

    if preset in presets():
        path = preset_path(preset)
    elif os.path.isfile(preset):
        path = preset
    else:
        raise ConfigError(f"--config {preset!r} is neither a preset ({', '.join(presets())}) nor a YAML file")
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not YAML ({' '.join(str(e).split())})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
    values = {name: {} for name in SECTIONS}
    for section, entries in loaded.items():
        if not isinstance(entries, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        for key, value in entries.items():
            _set(values, f"{section}.{key}", value, origin=path)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. optimizer.lr=1e-3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: cannot parse value: {e}") from None
        _set(values, key.strip(), value, origin="command line")
    return build(values)


def build(values: dict[str, dict]) -> RunConfig:
    """A RunConfig from {section: {key: already checked value}} (missing keys: defaults), then `validate`d."""
    sections = {}
    for name, cls in SECTIONS.items():
        try:
            sections[name] = cls(**values.get(name, {}))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}: {e}") from None
    cfg = RunConfig(**sections)
    validate(cfg)
    return cfg


def _set(values: dict[str, dict], dotted: str, value, origin: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{origin}: key {dotted!r} must be section.key, one of the sections {sorted(SECTIONS)}")
    section, key = parts
    if section not in SECTIONS:
        raise ConfigError(f"{origin}: unknown section {section!r} in {dotted!r}; sections: {sorted(SECTIONS)}")
    types = field_types(SECTIONS[section])
    if key not in types:
        raise ConfigError(f"{origin}: unknown key {dotted!r}; keys of {section}: {sorted(types)}")
    values[section][key] = coerce(value, types[key], f"{origin}: {dotted}")


def field_types(cls: type) -> dict[str, object]:
    """{field name: its resolved type annotation} of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def coerce(value, expected, what: str):
    """`value` (from YAML) as the type `expected` (int, float, bool, str, a Literal, X | None, tuple[float, ...]),
    or ConfigError naming `what`."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(value, inner, what)
    if value is None:
        raise ConfigError(f"{what} needs a value")
    if origin is Literal:
        if isinstance(value, float) and value.is_integer() and all(type(a) is int for a in args):
            value = int(value)
        if value not in args or isinstance(value, bool) != isinstance(args[0], bool):
            raise ConfigError(f"{what}={value!r} is not one of {args}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{what} must be a list of {len(args)} numbers, got {value!r}")
        return tuple(coerce(v, a, what) for v, a in zip(value, args))
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


def validate(cfg: RunConfig) -> None:
    """What involves several fields, or ranges beyond the types. ConfigError names the field."""
    t, o = cfg.train, cfg.optimizer
    positive = [("train", "seq_len"), ("train", "micro_batch_size"), ("train", "global_batch_size"),
                ("optimizer", "lr"), ("data", "shuffle_block_shards"), ("data", "prefetch_micro_batches"),
                ("data", "read_threads"), ("checkpoint", "keep_last"), ("model", "n_layers"),
                ("distributed", "startup_timeout_s"), ("distributed", "collective_timeout_s")]
    for section, key in positive:
        if getattr(getattr(cfg, section), key) <= 0:
            raise ConfigError(f"{section}.{key} must be positive, got {getattr(getattr(cfg, section), key)!r}")
    non_negative = [("train", "max_steps"), ("optimizer", "warmup_steps"), ("optimizer", "weight_decay"),
                    ("optimizer", "grad_clip"), ("checkpoint", "every_steps"), ("eval", "every_steps"),
                    ("eval", "max_samples"), ("eval", "sample_grid"), ("log", "every_steps")]
    for section, key in non_negative:
        if getattr(getattr(cfg, section), key) < 0:
            raise ConfigError(f"{section}.{key} must be >= 0, got {getattr(getattr(cfg, section), key)!r}")
    if t.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError("optimizer.min_lr_ratio must be in [0, 1]")
    if not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {list(o.betas)!r}")
    if cfg.log.peak_tflops is not None and cfg.log.peak_tflops <= 0:
        raise ConfigError(f"log.peak_tflops must be a positive number or null, got {cfg.log.peak_tflops!r}")


def gradient_accumulation_steps(cfg: RunConfig, world_size: int) -> int:
    """Micro-batches per process per optimizer step; the global batch is fixed, whatever the world size."""
    t = cfg.train
    per_micro_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_micro_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x processes = "
            f"{t.micro_batch_size} x {world_size}; change the batch sizes or the number of processes"
        )
    return t.global_batch_size // per_micro_step


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML (`jpeglm train --print-config`, RUN/config.yaml)."""
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe_fields() -> str:
    """The config reference as Markdown: a table per section, every field with its type, default and meaning
    (docs/training.md holds it; tests/test_config.py keeps the two equal)."""
    lines = []
    for section, cls in SECTIONS.items():
        section_doc = next(f for f in fields(RunConfig) if f.name == section).metadata["doc"]
        lines += [f"`{section}`: {section_doc}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        types = field_types(cls)
        for f in fields(cls):
            default = f.default
            shown = "null" if default is None else str(list(default) if isinstance(default, tuple) else default)
            shown = shown.lower() if isinstance(default, bool) else shown
            lines.append(f"| `{f.name}` | {_type_name(types[f.name])} | `{shown}` | {f.metadata['doc']} |")
        lines.append("")
    return "\n".join(lines)


def _type_name(t) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is Literal:
        return " \\| ".join(str(a) for a in args)
    if type(None) in args:
        return " \\| ".join(_type_name(a) if a is not type(None) else "null" for a in args)
    if origin is tuple:
        return f"[{', '.join(_type_name(a) for a in args)}]"
    return t.__name__


if __name__ == "__main__":  # the reference in docs/training.md
    print(describe_fields(), end="")
