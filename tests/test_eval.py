"""`jpeglm eval completion|unconditional`, validation images of a preprocess output, bits per byte, and the sample
grid written during training (plain model, and 2 ranks under ZeRO-3).

Data: real photos (derived from the bundled ones) canonicalized at 64x64, tokenized and packed into shards as
`jpeglm preprocess` does (tests/helpers.write_image_dataset). Models: random weights (their samples are noise, which
is what the plumbing needs); whether a trained model beats the references is what `make demo` shows."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import write_image_dataset
from jpeglm.cli import main
from trainer.model import ModelConfig, Transformer

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from pipeline import codec
    from pipeline.sample_images import derive
    from pipeline.tokenizer import Tokenizer

    bodies = [(name, codec.canonicalize(data, size=64)) for name, data in derive(36, seed=5)]
    tok = Tokenizer.train([b for _, b in bodies], 320)
    root = str(tmp_path_factory.mktemp("data64"))
    write_image_dataset(root, {"train": bodies[:6], "validation": bodies[6:]}, tok, seq_len=4096, size=64)
    return {"root": root, "validation": bodies[6:], "tokenizer": tok}


def _export(path, tok, size: int, seed: int = 3, max_seq_len: int = 2048) -> str:
    from trainer.pretrained import save_pretrained

    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=320, n_layers=2, d_model=64, n_heads=4, ffn_dim=128,
                                    max_seq_len=max_seq_len))
    tok_path = str(path) + ".tokenizer.model"
    tok.save(tok_path)
    save_pretrained(model.state_dict(), model.cfg, str(path), tok_path, tok.metadata(), codec={"size": size})
    return str(path)


@pytest.fixture(scope="module")
def random_export(dataset, tmp_path_factory):
    return _export(tmp_path_factory.mktemp("random64"), dataset["tokenizer"], 64)


def test_validation_images_are_spread_over_the_split_and_exact(dataset):
    from evaluation.images import validation_images
    from pipeline import codec

    picked = validation_images(dataset["root"], 5)
    assert [v.index for v in picked] == [3, 9, 15, 21, 27]  # floor((i + 1/2) * 30 / 5)
    for v in picked:
        name, body = dataset["validation"][v.index]
        assert v.id == name and v.body == body and v.jpeg == codec.assemble(body)
    assert [v.index for v in validation_images(dataset["root"])] == list(range(30))


def test_bits_per_byte_counts_every_validation_token(dataset, random_export):
    from evaluation.bpb import context_window, validation_bits_per_byte
    from pipeline.manifest import read_manifest
    from pipeline.shards import read_samples
    from trainer.pretrained import load_pretrained

    model, _ = load_pretrained(random_export)
    tok, manifest = dataset["tokenizer"], read_manifest(dataset["root"])
    got = validation_bits_per_byte(model, tok, dataset["root"], manifest, max_tokens=10**9, batch=3)
    assert got["window"] == context_window(4096, 2048) == 2048
    # Independently: each row scored in 2,048-token windows, every valid next token once.
    lengths = [len(b) for b in tok.token_bytes()]
    loss, count, n_bytes = 0.0, 0, 0
    for shard in manifest["shards"]:
        if shard["split"] != "validation":
            continue
        for _, row, meta in read_samples(os.path.join(dataset["root"], shard["path"])):
            seq = torch.from_numpy(row[: meta["valid_tokens"]].astype(np.int64))
            for lo in range(0, len(seq) - 1, 2048):
                chunk = seq[lo : lo + 2049]
                with torch.no_grad():
                    logits = model(chunk[None, :-1])[0]
                loss += float(torch.nn.functional.cross_entropy(logits, chunk[1:], reduction="sum"))
                count += len(chunk) - 1
                n_bytes += sum(lengths[t] for t in chunk[1:].tolist())
    assert got["tokens"] == count and got["bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(loss / math.log(2) / n_bytes, rel=1e-6)
    assert 6 < got["bits_per_byte"] < 9  # random weights: ~log2(320) bits per token, ~1.2 bytes per token


def test_completion_and_unconditional_end_to_end(dataset, random_export, tmp_path, capsys):
    from pipeline import codec
    from pipeline.repair import prompt_prefix

    out = tmp_path / "eval"
    common = ["--checkpoint", random_export, "--data", dataset["root"], "--out", str(out), "--num", "4",
              "--batch", "3", "--max-tokens", "600", "--grid", "3", "--seed", "1"]
    assert main(["eval", "unconditional", *common, "--untrained", "--bpb-tokens", "3000"]) == 0
    first = capsys.readouterr().out
    assert "unconditional (model)" in first and "unconditional (untrained)" in first and "bits per byte" in first
    assert "unconditional (model, constrained)" in first and "strict" in first
    features = sorted(p.name for p in out.glob("features-real-*.npy"))
    assert len(features) == 1
    mtime = (out / features[0]).stat().st_mtime_ns
    assert main(["eval", "completion", *common, "--ratios", "0.5,0.75", "--bpb-tokens", "3000"]) == 0
    assert (out / features[0]).stat().st_mtime_ns == mtime  # the real images' features were reused
    table = capsys.readouterr().out
    assert "completion 0.5 (prompt-only)" in table and "completion 0.75 (model)" in table

    result = json.loads((out / "eval.json").read_text())
    assert result["codec"]["size"] == 64 and result["num"] == 4 and result["max_tokens"] == 600
    unc = result["unconditional"]
    sets = {"model", "model_constrained", "untrained", "untrained_constrained"}
    assert set(unc) == sets | {"complete_fraction", "strict_fraction"}
    assert set(result["completion"]["0.5"]) == {"model", "model_constrained", "prompt_only", "prompt_tokens"}
    for section in [unc[s] for s in sets] + [result["completion"]["0.5"]["model"],
                                             result["completion"]["0.5"]["model_constrained"]]:
        assert {"fid", "kid", "kid_std", "num_real", "num_fake", "complete_fraction", "repaired_fraction",
                "cut_fraction", "strict_fraction", "mcu_fraction", "mean_tokens"} <= set(section)
        assert section["num_real"] == section["num_fake"] == 4
        total = section["complete_fraction"] + section["repaired_fraction"] + section["cut_fraction"]
        assert total == pytest.approx(1.0) and 0 <= section["mcu_fraction"] <= 1
    assert unc["complete_fraction"] == unc["model"]["complete_fraction"]
    # A random model never closes an image by itself; with the JPEG grammar in the sampler every sample is whole
    # and passes the strict decoder.
    for section in (unc["model_constrained"], unc["untrained_constrained"],
                    result["completion"]["0.5"]["model_constrained"]):
        assert section["complete_fraction"] == section["strict_fraction"] == section["mcu_fraction"] == 1.0
    assert unc["untrained"]["strict_fraction"] < 1.0 and unc["strict_fraction"] == 1.0
    assert {"fid", "kid", "kid_std"} <= set(result["completion"]["0.75"]["prompt_only"])
    assert result["bits_per_byte"]["tokens"] >= 3000
    for name in ("grid-unconditional.png", "grid-completion-0.5.png", "grid-completion-0.75.png"):
        assert (out / name).stat().st_size > 0
    # Completions keep their prompt byte for byte (the tables spliced after SOI).
    picked = [(2 * i + 1) * 30 // 8 for i in range(4)]  # spread: 3, 11, 18, 26
    files = sorted((out / "samples" / "completion-0.5-model").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.jpg" for i in picked]
    for f, i in zip(files, picked):
        assert f.read_bytes().startswith(codec.assemble(prompt_prefix(dataset["validation"][i][1], 0.5)))
    assert len(list((out / "samples" / "unconditional-untrained").iterdir())) == 4


def test_mismatched_inputs_are_refused_in_one_line(dataset, random_export, tmp_path, capsys):
    from pipeline.tokenizer import Tokenizer

    other_tok = Tokenizer.train([b for _, b in dataset["validation"][:10]], 320)  # same size, other merges
    cases = [
        (["--checkpoint", _export(tmp_path / "at256", dataset["tokenizer"], 256)], "trained on image size 256"),
        (["--checkpoint", _export(tmp_path / "othertok", other_tok, 64)], "another tokenizer"),
        (["--checkpoint", random_export, "--ratios", "0.5,1.5"], "each ratio must be in (0, 1)"),
        (["--checkpoint", random_export, "--ratios", "0.1"], "0.25 <= ratio < 1"),
        (["--checkpoint", random_export, "--inception", str(tmp_path / "none.pt")], "make eval-weights"),
        (["--checkpoint", random_export, "--num", "1"], "--num must be at least 2"),  # the last --num wins
        (["--checkpoint", random_export, "--max-tokens", "250", "--ratios", "0.75"], "use ratios up to 0."),
    ]
    for extra, says in cases:
        args = ["eval", "completion", "--data", dataset["root"], "--out", str(tmp_path / "o"), "--num", "4", *extra]
        assert main(args) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("jpeglm eval: error:") and says in err, err
    assert not (tmp_path / "o" / "eval.json").exists()


def test_sample_grid_during_training(dataset, random_export, tmp_path):
    from PIL import Image

    from trainer.sample_grid import sample_grid, validation_bodies
    from trainer.pretrained import load_pretrained

    model, meta = load_pretrained(random_export)
    model.train()
    bodies = validation_bodies(dataset["root"], 2)
    assert bodies == [dataset["validation"][0][1], dataset["validation"][1][1]]
    grid = sample_grid(model, dataset["tokenizer"], meta["codec"], bodies, 7, str(tmp_path), num_unconditional=3,
                       max_len=600)
    assert model.training  # put back as found
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    # 3 rows (unconditional, then prompt | completion | original per image), 3 columns of 128-pixel cells + labels.
    assert grid.shape[:2] == (3 * (128 + 4 + 14) + 4, 3 * (128 + 4) + 4)
    saved = np.asarray(Image.open(tmp_path / "images" / "step-000007.png"))
    assert np.array_equal(saved, grid)
    again = sample_grid(model, dataset["tokenizer"], meta["codec"], bodies, 8, None, num_unconditional=3, max_len=600)
    assert np.array_equal(again, grid)  # the same seed at every step: grids differ by the model only
    assert not (tmp_path / "images" / "step-000008.png").exists()


def test_grid_bodies_are_read_from_the_first_validation_rows_only(dataset, monkeypatch):
    """The grid's images are the split's first: reading stops at the row where the last of them ends (the packed
    order is a hash shuffle already), instead of streaming most of the split to reach images spread over it."""
    import json as json_

    from trainer.sample_grid import validation_bodies
    from pipeline import shards, storage

    manifest = json_.loads(storage.read_bytes(storage.join(dataset["root"], "manifest.json")))
    ends, index = {}, -1  # image index -> the split row holding its EOS
    for shard in (s for s in manifest["shards"] if s["split"] == "validation"):
        for _, _, meta in shards.read_samples(storage.join(dataset["root"], shard["path"])):
            for span in meta["images"]:
                index += span["bos"]
                if span["eos"]:
                    ends[index] = meta["row"]
    rows_read = []
    real = shards.read_samples

    def counting(uri, *args, **kwargs):
        for sample in real(uri, *args, **kwargs):
            rows_read.append(sample[2]["row"])
            yield sample

    monkeypatch.setattr(shards, "read_samples", counting)
    bodies = validation_bodies(dataset["root"], 3, manifest, dataset["tokenizer"])
    assert bodies == [body for _, body in dataset["validation"][:3]]
    assert rows_read == list(range(ends[2] + 1)) and len(rows_read) < max(ends.values()) + 1, (rows_read, ends)


@pytest.mark.slow
@pytest.mark.distributed
def test_sample_grid_under_zero3_on_two_ranks(dataset, random_export, tmp_path):
    """Both ranks call it with ZeRO-3-partitioned parameters; tokens are broadcast from rank 0, so both run the
    same forward passes (no deadlock) and get the same grid; only rank 0 writes the PNG."""
    script = os.path.join(os.path.dirname(__file__), "zero3_sample_grid.py")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                          os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           script, dataset["root"], random_export, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["sha256"] == results[1]["sha256"] and results[0]["partitioned"]
    assert (tmp_path / "images" / "step-000003.png").exists()
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["step-000003.png"]


def test_eval_json_of_another_checkpoint_revision_is_replaced_not_merged(tmp_path, caplog):
    """DIR/eval.json keeps the sections of the same checkpoint and images; a run dir trained further (another
    resolved checkpoint) starts a fresh file, so no figure of the earlier step (bits per byte included) survives."""
    from evaluation.completion import load_result

    def identity(revision):
        return {"checkpoint": "out/run", "data": "out/data", "num": 8, "seed": 0,
                "sampling": {"temperature": 1.0, "top_k": 50, "top_p": 0.9}, "revision": revision,
                "codec": {"size": 64, "quality": 25}, "max_tokens": 1366}

    first = load_result(str(tmp_path), identity("global_step800 (step 800)"))
    first |= {"unconditional": {"fid": 1.0}, "bits_per_byte": {"bits_per_byte": 5.8, "max_tokens": 100}}
    (tmp_path / "eval.json").write_text(json.dumps(first))
    assert load_result(str(tmp_path), identity("global_step800 (step 800)")) == first  # same step: sections kept
    fresh = load_result(str(tmp_path), identity("global_step1600 (step 1600)"))
    assert "unconditional" not in fresh and "bits_per_byte" not in fresh
    assert fresh["revision"] == "global_step1600 (step 1600)"
    assert "another revision" in caplog.text
