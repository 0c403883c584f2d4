"""The typed run config (trainer/config.py): presets, overrides, refusals, --print-config and its reference doc."""

from __future__ import annotations

import os
import subprocess
import sys
import typing

import pytest
import yaml

from jpeglm.cli import main
from trainer.config import (SECTIONS, ConfigError, RunConfig, describe_fields, field_types, load_config, presets,
                            to_yaml)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_preset_is_a_yaml_file_the_loader_checks():
    assert presets() == ("150m", "1b", "7b", "demo", "tiny")
    for name in presets():
        with open(os.path.join(ROOT, "trainer", "configs", f"{name}.yaml")) as f:
            raw = yaml.safe_load(f)
        cfg = load_config(name)
        for section, values in raw.items():  # every key the file sets is what the config holds
            for key, value in values.items():
                got = getattr(getattr(cfg, section), key)
                assert (list(got) if isinstance(got, tuple) else got) == value, (name, section, key)


@pytest.mark.parametrize("preset", ["7b", "1b", "150m", "tiny", "demo"])
def test_presets_describe_real_models(preset):
    cfg = load_config(preset)
    model = cfg.model
    assert cfg.train.seq_len <= model.max_seq_len
    expected_params = {"7b": 6.48e9, "1b": 1.21e9, "150m": 1.54e8, "tiny": 8.0e5, "demo": 8.0e5}[preset]
    assert model.num_params() == pytest.approx(expected_params, rel=0.01)
    if preset in ("7b", "1b", "150m"):
        assert cfg.train.seq_len == 12288 and cfg.train.precision == "bf16"
    if preset in ("7b", "1b"):
        assert cfg.eval.sample_grid == 0  # a grid there costs minutes per evaluation (docs/training.md)
    if preset == "7b":
        assert (model.n_layers, model.d_model, model.n_heads, model.ffn_dim) == (32, 4096, 32, 11008)
    if preset == "demo":  # 64x64 images of ~420 tokens: the context holds whole images, and the grid is drawn
        assert cfg.train.seq_len == model.max_seq_len == 768 and cfg.eval.sample_grid == 3


def test_overrides_are_typed_and_typos_rejected():
    cfg = load_config("tiny", ["optimizer.lr=1e-3", "model.n_kv_heads=2", "zero.reduce_bucket_size=5.0e+7",
                               "log.peak_tflops=989", "train.precision=bf16", "zero.stage=2.0",
                               "optimizer.betas=[0.8, 0.9]"])
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.lr, float)  # YAML reads 1e-3 as a string
    assert cfg.model.n_kv_heads == 2 and cfg.zero.reduce_bucket_size == 50_000_000
    assert cfg.log.peak_tflops == 989.0 and cfg.train.precision == "bf16"
    assert cfg.zero.stage == 2 and isinstance(cfg.zero.stage, int) and cfg.optimizer.betas == (0.8, 0.9)
    bad = {
        "model.n_layerz=2": "unknown key 'model.n_layerz'",
        "modle.n_layers=2": "unknown section 'modle'",
        "optimizer.lr=fast": "optimizer.lr must be a float",
        "train.max_steps=1.5": "train.max_steps must be a int",
        "zero.init=yes please": "zero.init must be a bool",
        "zero.stage=true": "zero.stage=True is not one of (0, 1, 2, 3)",
        "train.precision=fp16": "train.precision='fp16' is not one of",
        "train.seq_len=4096": "exceeds model.max_seq_len=1024",
        "train.global_batch_size=6": "not a multiple of train.micro_batch_size=4",
        "model.n_heads=3": "divisible by n_heads",
        "optimizer.betas=[0.9]": "optimizer.betas must be a list of 2 numbers",
        "optimizer.betas=[0.9, 1.5]": "optimizer.betas must be two numbers in [0, 1)",
        "optimizer.min_lr_ratio=2": "optimizer.min_lr_ratio must be in [0, 1]",
        "log.peak_tflops=-1": "log.peak_tflops must be a positive number or null",
        "lr": "not of the form section.key=value",
        "train.device=": "needs a value",
        "data.prefetch_blocks=2": "unknown key 'data.prefetch_blocks'",
        "train.init_from=3": "train.init_from must be a str",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[").replace(")", r"\)")):
            load_config("tiny", [override])
    for key in ("prefetch_micro_batches", "read_threads", "shuffle_block_shards"):
        with pytest.raises(ConfigError, match=f"data.{key} must be positive"):
            load_config("tiny", [f"data.{key}=0"])
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("13b")


def test_a_yaml_file_is_checked_like_a_preset(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model: {n_layers: 2}\ntrain: {max_steps: 7, seq_len: 512}\n")
    cfg = load_config(str(path))
    assert (cfg.model.n_layers, cfg.train.max_steps, cfg.train.seq_len) == (2, 7, 512)
    assert cfg.optimizer.lr == RunConfig().optimizer.lr  # what the file leaves out keeps its default
    path.write_text("train: {max_stepz: 7}\n")
    with pytest.raises(ConfigError, match=f"{path}: unknown key 'train.max_stepz'"):
        load_config(str(path))
    path.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(str(path))


def test_print_config_prints_the_resolved_config_as_yaml(tmp_path, capsys):
    assert main(["train", "--config", "demo", "--print-config", "optimizer.lr=1e-3", "train.max_steps=5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = load_config("demo", ["optimizer.lr=1e-3", "train.max_steps=5"])
    assert printed == expected.to_dict() and printed["optimizer"]["lr"] == 1e-3 and printed["train"]["max_steps"] == 5
    # What it prints loads back to the same config (a run's config.yaml is this text).
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(expected))
    assert load_config(str(path)) == expected
    assert main(["train", "--config", "tiny", "--print-config", "model.n_layerz=1"]) == 2
    assert "unknown key 'model.n_layerz'" in capsys.readouterr().err
    # A question about the config never waits for torch to import.
    code = ("import sys; from jpeglm.cli import main; rc = main(sys.argv[1:]); "
            "print('imported:', [m for m in ('torch', 'deepspeed') if m in sys.modules]); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "train", "--config", "1b", "--print-config"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("imported: []"), proc.stderr
    assert yaml.safe_load(proc.stdout.rsplit("imported:", 1)[0]) == load_config("1b").to_dict()


def test_every_field_has_a_type_a_default_and_a_doc():
    for section, cls in SECTIONS.items():
        for name, annotation in field_types(cls).items():
            field = cls.__dataclass_fields__[name]
            assert field.metadata.get("doc"), f"{section}.{name} has no doc"
            assert annotation in (int, float, bool, str) or typing.get_origin(annotation) is not None, (section, name)


def test_the_docs_reference_lists_every_field_as_the_code_defines_it():
    with open(os.path.join(ROOT, "docs", "training.md")) as f:
        text = f.read()
    start = text.index("<!-- generated by `python -m trainer.config`")
    start = text.index("\n", start) + 1
    end = text.index("<!-- end of the generated reference -->")
    assert text[start:end].strip() == describe_fields().strip(), (
        "docs/training.md's config reference is out of date: regenerate it with `.venv/bin/python -m trainer.config`")
    for section, cls in SECTIONS.items():
        for name in field_types(cls):
            assert f"| `{name}` |" in text[start:end], f"{section}.{name}"
