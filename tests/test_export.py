"""`jpeglm export`: a ZeRO-3 checkpoint of a real 2-process run -> one safetensors folder that plain torch and
trainer/model.py load (no DeepSpeed) and that reproduces the trainer's own validation loss."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jpeglm.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

RUN = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.ffn_dim=176", "model.max_seq_len=256",
       "train.seq_len=256", "train.micro_batch_size=2", "train.global_batch_size=8", "train.max_steps=6",
       "checkpoint.every_steps=3", "eval.every_steps=0", "eval.max_samples=12", "log.tensorboard=false",
       "optimizer.lr=1e-2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    """Random-token shards (helpers.write_dataset) with a real tokenizer; 6 steps on 2 processes."""
    from pipeline.tokenizer import Tokenizer
    from helpers import write_dataset

    data = str(tmp_path_factory.mktemp("data"))
    rng = np.random.default_rng(0)
    tokenizer = Tokenizer.train([rng.integers(0, 256, 4000, dtype=np.uint8).tobytes() for _ in range(30)])
    tokenizer.save(os.path.join(data, "tokenizer.model"))
    write_dataset(data, {"train": [5, 7, 4], "validation": [3, 3]}, row_len=512, fingerprint=tokenizer.fingerprint)
    run = str(tmp_path_factory.mktemp("run"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer.train",
           "--config", "tiny", "--data", data, "--run-dir", run, *RUN]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


# Runs in a fresh interpreter where `import deepspeed` fails: the exported folder must not need it.
_EVAL_WITHOUT_DEEPSPEED = r"""
import json, sys
sys.modules["deepspeed"] = None  # any import of deepspeed now raises ImportError
import torch, torch.nn.functional as F
from trainer.pretrained import load_pretrained
from trainer.data import Manifest, ValidationSet, IGNORE_INDEX
folder, data, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, meta = load_pretrained(folder)
val = ValidationSet(Manifest.load(data), seq_len=256, micro_batch=1, rank=0, world=1, max_samples=n)
total, count = 0.0, 0
with torch.no_grad():
    for b in val.batches:
        logits = model(torch.from_numpy(b.inputs))
        t = torch.from_numpy(b.targets)
        total += F.cross_entropy(logits.view(-1, logits.size(-1)), t.view(-1), ignore_index=IGNORE_INDEX,
                                 reduction="sum").item()
        count += int((t != IGNORE_INDEX).sum())
print(json.dumps({"loss": total / count, "samples": val.num_samples,
                  "deepspeed_loaded": bool(sys.modules.get("deepspeed"))}))
"""


def test_exported_model_loads_without_deepspeed_and_reproduces_the_validation_loss(run_dir, tmp_path, capfd):
    out = tmp_path / "model"
    assert main(["export", "--checkpoint", run_dir, "--out", str(out)]) == 0
    printed = capfd.readouterr()
    assert printed.out.strip().splitlines() == [f"exported {run_dir}/checkpoints/global_step6 (step 6, 0.14M "
                                                f"parameters, fp32) to {out} (native format)"]
    assert "Processing zero checkpoint" not in printed.err + printed.out and "Reconstructed" not in printed.err
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.model"]
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(out / "config.json") as f:
        config = json.load(f)
    assert config["source"]["step"] == 6 and config["model"]["n_layers"] == 2
    # The training images' codec travels from the manifest through the checkpoint into the export.
    assert config["codec"] == {"size": 256, "quality": 25, "subsampling": "4:2:0", "restart_interval_mcus": 1}
    assert (out / "tokenizer.model").read_bytes() == open(os.path.join(run_dir, "tokenizer.model"), "rb").read()
    data = config["source"]["data"]
    proc = subprocess.run([sys.executable, "-c", _EVAL_WITHOUT_DEEPSPEED, str(out), data,
                           str(summary["validation_samples"])], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["deepspeed_loaded"] is False and result["samples"] == summary["validation_samples"] == 12
    # The same weights and the same samples: DeepSpeed's forward during training and plain torch agree.
    assert result["loss"] == pytest.approx(summary["validation_loss"], abs=1e-5)


def test_consolidate_matches_export_and_picks_the_requested_checkpoint(run_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    from trainer.export import consolidate

    state, cfg, tokenizer_path, meta = consolidate(run_dir)
    assert meta["step"] == 6 and meta["checkpoint"].endswith("global_step6") and cfg.n_layers == 2
    assert tokenizer_path.endswith(os.path.join("global_step6", "tokenizer.model"))
    step3, _, _, meta3 = consolidate(os.path.join(run_dir, "checkpoints", "global_step3"))
    assert meta3["step"] == 3
    assert not torch.equal(state["output.weight"], step3["output.weight"])  # training moved the weights
    out = tmp_path / "bf16"
    assert main(["export", "--checkpoint", os.path.join(run_dir, "checkpoints", "global_step3"), "--out", str(out),
                 "--dtype", "bf16"]) == 0
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors.keys() == step3.keys()
    for name, t in tensors.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, step3[name].to(torch.bfloat16)), name


def test_export_explains_what_is_missing(run_dir, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    partial = tmp_path / "checkpoints" / "global_step9"
    partial.mkdir(parents=True)
    assert main(["export", "--checkpoint", str(partial), "--out", str(tmp_path / "o")]) == 2
    assert "incomplete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
