"""The write-time shuffle, the content-addressed split, exact dedup, the environment-failure threshold and Ctrl-C,
end to end on a local Ray (real photos derived from the bundled ones; an ImageNet-like layout of class folders)."""

from __future__ import annotations

import json
import os
import signal
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import shards, stats, storage
from pipeline.preprocess.faults import FAULT_ENV
from pipeline.preprocess.shuffle import adjacency

from helpers import parquet_bytes
from test_preprocess_e2e import _assert_same, _data_files, _run, _subprocess, _wait_for, ray_cluster  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CLASSES, PER_CLASS, COPIES = 10, 24, 40


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """class-0 .. class-9 with 24 different photos each, then `copies/` with 40 byte-identical copies of photos of
    the class folders, and a separate folder of 30 more photos. Returns (root, extra, {copy id: original id})."""
    from pipeline.sample_images import derive

    root = tmp_path_factory.mktemp("classes")
    images = list(derive(CLASSES * PER_CLASS, seed=1))
    ids = []
    for i, (name, data) in enumerate(images):
        (root / f"class-{i // PER_CLASS}").mkdir(exist_ok=True)
        (root / f"class-{i // PER_CLASS}" / name).write_bytes(data)
        ids.append(f"class-{i // PER_CLASS}/{name}")
    (root / "copies").mkdir()
    dup_of = {}
    for k in range(COPIES):
        i = k * 6
        name = f"copy-{k:02d}{os.path.splitext(images[i][0])[1]}"
        (root / "copies" / name).write_bytes(images[i][1])
        dup_of[f"copies/{name}"] = ids[i]
    extra = tmp_path_factory.mktemp("extra")
    for name, data in derive(30, seed=2):
        (extra / name).write_bytes(data)
    return root, extra, dup_of


@pytest.fixture(scope="module")
def classes_output(ray_cluster, class_folders, tmp_path_factory):
    root, _, _ = class_folders
    out = str(tmp_path_factory.mktemp("classes-out") / "out")
    # --dedup exact: this module is about exact copies; the derived photos hold a near pair (tests/test_neardup*.py)
    _run(str(root), out, "--images-per-bucket", "64", "--dedup", "exact")  # 280 images: 5 buckets
    return out


def _stats_rows(output: str) -> list[dict]:
    names = storage.listdir(storage.join(output, "stats"))
    return pa.concat_tables([stats.read(storage.join(output, "stats", n)) for n in names]).to_pylist()


def _packed_ids(output: str) -> dict[str, list[str]]:
    """Image ids in packed order, per split, read from the shards."""
    manifest = json.loads(storage.read_bytes(storage.join(output, "manifest.json")))
    order: dict[str, list[str]] = {"train": [], "validation": []}
    for entry in manifest["shards"]:
        for _, _, meta in shards.read_samples(storage.join(output, entry["path"])):
            order[entry["split"]] += [s["id"] for s in meta["images"] if s["bos"]]
    return order


def test_packed_stream_is_shuffled_and_copies_are_packed_once(classes_output, class_folders, tmp_path):
    root, _, dup_of = class_folders
    rows = _stats_rows(classes_output)
    assert len(rows) == CLASSES * PER_CLASS + COPIES
    duplicates = {r["id"]: r["duplicate_of"] for r in rows if r["status"] == "duplicate"}
    assert duplicates == dup_of  # each copy counted, with the id of the packed original (listed first)
    assert all(r["split"] is None for r in rows if r["status"] == "duplicate")
    manifest = json.loads(Path(classes_output, "manifest.json").read_text())
    assert manifest["images"] == {"total": 280, "ok": 240, "duplicate": 40, "failed": {}}

    packed = _packed_ids(classes_output)
    assert sorted(packed["train"] + packed["validation"]) == sorted(r["id"] for r in rows if r["status"] == "ok")
    assert not any(i.startswith("copies/") for i in packed["train"] + packed["validation"])
    # neighbours in the packed stream share a class folder about as often as in a random order (listing order:
    # almost always)
    same, expected = adjacency([i.split("/")[0] for i in packed["train"]])
    assert same <= 1.5 * expected, (same, expected)
    listing_same, listing_expected = adjacency(sorted(i.split("/")[0] for i in packed["train"]))
    assert listing_same > 5 * listing_expected

    again = str(tmp_path / "again")  # the same command into another folder: every byte the same
    _run(str(root), again, "--images-per-bucket", "64", "--dedup", "exact")
    _assert_same(_data_files(classes_output), _data_files(again))


def test_split_never_moves_when_an_input_is_added_and_the_seed_only_reorders(classes_output, class_folders, tmp_path):
    root, extra, _ = class_folders
    tok = str(Path(classes_output, "tokenizer.model"))

    def split_by_body(output):
        return {r["body_sha256"]: r["split"] for r in _stats_rows(output) if r["status"] == "ok"}

    before = split_by_body(classes_output)
    assert 0 < sum(s == "validation" for s in before.values()) < len(before)
    both = str(tmp_path / "both")  # a second --input: ids get a prefix, the split of every image stays
    _run([str(root), str(extra)], both, "--images-per-bucket", "64", "--tokenizer", tok, "--dedup", "exact")
    after = split_by_body(both)
    assert len(after) == len(before) + 30 and {h: after[h] for h in before} == before

    reseeded = str(tmp_path / "seed1")  # another seed: the same images in the same splits, in another order
    _run(str(root), reseeded, "--images-per-bucket", "64", "--tokenizer", tok, "--seed", "1", "--dedup", "exact")
    assert split_by_body(reseeded) == before
    a, b = _packed_ids(classes_output), _packed_ids(reseeded)
    assert all(sorted(a[s]) == sorted(b[s]) for s in a) and a["train"] != b["train"]
    same_seed = str(tmp_path / "seed0")  # the order is a function of content and seed only: not of the buckets
    _run(str(root), same_seed, "--images-per-bucket", "1000", "--tokenizer", tok, "--dedup", "exact")
    assert _packed_ids(same_seed) == a


def test_environment_failures_stop_before_the_shards_and_a_higher_threshold_continues(
        ray_cluster, sample_image_dir, tmp_path, capsys):
    inp = tmp_path / "in"
    inp.mkdir()
    for p in sorted(sample_image_dir.iterdir())[:10]:
        shutil.copy(p, inp / p.name)
    missing = [f"gone/{i}.jpg" for i in range(4)]  # a path column whose files are not there: read_error
    (inp / "refs.parquet").write_bytes(parquet_bytes(pa.table({"path": missing}), row_group_size=4))
    out = tmp_path / "out"
    capsys.readouterr()
    _run(str(inp), str(out), "--max-failed-fraction", "0.2", expect=1)
    err = capsys.readouterr().err
    assert "4 of 14 images (28.6%) failed for reasons that point at the environment" in err
    assert "most are read_error (4), e.g. refs.parquet#0: FileNotFoundError" in err and "Traceback" not in err
    assert not (out / "shards").exists() and not (out / "manifest.json").exists()

    _run(str(inp), str(out), "--max-failed-fraction", "0.5")  # accepted: continues from the encoded units
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_this_run"] == 0 and summary["failed_by_reason"] == {"read_error": 4}
    assert summary["images_ok"] == 10


def test_ctrl_c_keeps_finished_work_and_says_how_to_resume(sample_image_dir, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C, while an encode task hangs."""
    out = tmp_path / "out"
    proc = _subprocess(str(sample_image_dir), str(out), env_extra={FAULT_ENV: "encode:2:hang"})
    _wait_for(lambda: (out / "_work/faults/encode-2").exists(), "the encode phase", proc)
    time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    text = proc.communicate(timeout=90)[0].decode(errors="replace")
    assert proc.returncode == 130, text[-3000:]
    assert f"interrupted; finished work is kept in {out}: run the same command again to resume" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert "Token authentication" not in text and "Started a local Ray instance" not in text
    assert (out / "_work" / "config.json").exists() and not (out / "manifest.json").exists()


def test_a_run_that_failed_before_any_unit_finished_does_not_block_the_corrected_one(
        ray_cluster, sample_image_dir, tmp_path, capsys):
    """The plan fails on a Parquet file without a recognizable image column (after OUTPUT was claimed); the rerun
    with --image-column has another config, but OUTPUT holds no finished work: it starts over there."""
    inp = tmp_path / "in"
    inp.mkdir()
    names = sorted(p.name for p in sample_image_dir.iterdir())[:6]
    for n in names:
        shutil.copy(sample_image_dir / n, inp / n)
    (inp / "zz-index.parquet").write_bytes(parquet_bytes(pa.table({"name": names[:2]}), row_group_size=4))
    out = tmp_path / "out"
    capsys.readouterr()
    _run(str(inp), str(out), expect=2)
    assert "found no image column" in capsys.readouterr().err
    assert (out / "_work" / "config.json").exists() and not (out / "_work" / "encoded").exists()

    _run(str(inp), str(out), "--image-column", "name")
    rows = _stats_rows(str(out))
    assert sorted(r["status"] for r in rows) == ["duplicate"] * 2 + ["ok"] * 6  # the rows name the same files
