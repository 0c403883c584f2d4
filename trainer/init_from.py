"""Fine-tuning: start from another model's weights (train.init_from / --init-from) instead of random ones.

The model section of the config comes from the checkpoint (its shapes are fixed); its tokenizer must be the
data's; under ZeRO-3 rank 0 reads the weights and scatters them into every rank's partition.
"""

from __future__ import annotations

import dataclasses

from trainer.config import ConfigError, RunConfig


def with_init_model(cfg: RunConfig) -> RunConfig:
    """The config with its model section taken from train.init_from's config.json: a checkpoint's shapes are fixed.
    Only activation_checkpointing (a training choice) is kept from the preset and overrides."""
    from trainer import hf, pretrained
    from trainer.config import validate
    from trainer.loading import read_checkpoint_config
    from trainer.model import ModelConfig

    uri = cfg.train.init_from
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
    model.activation_checkpointing = cfg.model.activation_checkpointing
    cfg = dataclasses.replace(cfg, model=model)
    validate(cfg)
    return cfg


def check_init_tokenizer(uri: str, manifest) -> None:
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

    from trainer.loading import load_checkpoint  # tells exported, Hugging Face and run folders apart

    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    state = None
    if rank == 0 or not partitioned:
        state = load_checkpoint(uri, device=torch.device("cpu"), dtype=torch.float32).model.state_dict()
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=partitioned):
            if state is not None:
                p.data.copy_(state[name])
