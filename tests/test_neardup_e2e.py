"""Curation end to end on a local Ray: `jpeglm preprocess --dedup near --exclude ... --max-aspect-ratio ...` on the
bundled photos and near-copies of them: every near-copy counted, the kept image a function of content, exclusion
matches (folder and tar), filters counted, and the same bytes after a different work split or a killed driver."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from PIL import Image

from jpeglm import cli
from pipeline import sample_images
from pipeline.preprocess.faults import FAULT_ENV

from helpers import tar_bytes
from test_preprocess_e2e import _assert_same, _data_files, _kill, _wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--seq-len", "1024", "--images-per-unit", "6", "--shard-size", "200KB", "--bpe-sample", "30",
        "--images-per-bucket", "10", "--dedup", "near", "--max-aspect-ratio", "3"]


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def curation_inputs(tmp_path_factory):
    """inputs/: each photo (PNG) with a downscaled JPEG q60 copy and a JPEG q40 copy, a 4:1 banner, 12 derived
    images; exclude/: a q90 copy of coffee (folder) and a tar holding a 0.8x copy of rocket."""
    root = tmp_path_factory.mktemp("curation")
    inputs, exclude = root / "inputs", root / "exclude"
    (inputs / "photos").mkdir(parents=True)
    exclude.mkdir()
    for name in sample_images.photo_names():
        stem = name.rsplit(".", 1)[0]
        im = Image.open(io.BytesIO(sample_images.photo_bytes(name))).convert("RGB")
        im.thumbnail((480, 480))
        w, h = im.size
        im.save(inputs / "photos" / f"{stem}.png")
        im.resize((int(w * 0.7), int(h * 0.7))).save(inputs / "photos" / f"{stem}-small.jpg", quality=60)
        im.save(inputs / "photos" / f"{stem}-q40.jpg", quality=40)
        if stem == "coffee":
            im.save(exclude / "coffee-eval.jpg", quality=90)
        if stem == "rocket":
            buf = io.BytesIO()
            im.resize((int(w * 0.8), int(h * 0.8))).save(buf, "JPEG", quality=85)
            (exclude / "eval.tar").write_bytes(tar_bytes([("000001.jpg", buf.getvalue())]))
    Image.new("RGB", (800, 200), (200, 30, 30)).save(inputs / "banner.png")
    for n, data in sample_images.derive(12):
        (inputs / n).write_bytes(data)
    return str(inputs), str(exclude)


def _run(inputs: str, exclude: str, output: str, *extra: str) -> None:
    assert cli.main(["preprocess", "--input", inputs, "--exclude", exclude, "--output", output, *ARGS, *extra]) == 0


def _stats(output: str) -> list[dict]:
    return ds.dataset(os.path.join(output, "stats")).to_table().to_pylist()


@pytest.fixture(scope="module")
def curated(ray_local, curation_inputs, tmp_path_factory):
    inputs, exclude = curation_inputs
    out = str(tmp_path_factory.mktemp("curated") / "out")
    _run(inputs, exclude, out)
    return out


def test_near_copies_are_counted_and_the_smallest_body_is_kept(curated):
    rows = {r["id"]: r for r in _stats(curated)}
    stems = [n.rsplit(".", 1)[0] for n in sample_images.photo_names()]
    for stem in stems:
        if stem in ("coffee", "rocket"):
            continue  # excluded below
        group = [rows[f"photos/{stem}{v}"] for v in (".png", "-small.jpg", "-q40.jpg")]
        kept = min(group, key=lambda r: r["body_sha256"])
        assert kept["status"] == "ok", stem
        for r in group:
            if r is not kept:
                assert (r["status"], r["duplicate_of"]) == ("near_duplicate", kept["id"]), r
    derived = [r for i, r in rows.items() if i.startswith("img-")]
    assert len(derived) == 12 and all(r["status"] == "ok" for r in derived)  # distinct crops stay
    assert all(r["phash"] is not None for r in rows.values() if r["status"] != "bad_aspect_ratio")
    summary = json.loads(Path(curated, "summary.json").read_text())
    assert summary["images_near_duplicate"] == 2 * (len(stems) - 2)
    assert summary["near_duplicates"]["groups"] == len(stems) - 2


def test_images_matching_an_excluded_image_go_into_neither_split(curated):
    rows = {r["id"]: r for r in _stats(curated)}
    for v in (".png", "-small.jpg", "-q40.jpg"):
        assert (rows[f"photos/coffee{v}"]["status"], rows[f"photos/coffee{v}"]["excluded_by"]) == \
               ("excluded", "coffee-eval.jpg")
        assert (rows[f"photos/rocket{v}"]["status"], rows[f"photos/rocket{v}"]["excluded_by"]) == \
               ("excluded", "eval.tar/000001.jpg")
        assert rows[f"photos/rocket{v}"]["split"] is None
    manifest = json.loads(Path(curated, "manifest.json").read_text())
    assert manifest["images"]["excluded"] == 6
    assert manifest["exclude"]["images"] == 2 and manifest["exclude"]["matched"] == 6


def test_filters_are_counted(curated):
    rows = {r["id"]: r for r in _stats(curated)}
    assert rows["banner.png"]["status"] == "bad_aspect_ratio"
    summary = json.loads(Path(curated, "summary.json").read_text())
    assert summary["failed_by_reason"] == {"bad_aspect_ratio": 1}


def test_another_work_split_gives_the_same_shards_and_bucket_stats(curated, curation_inputs, tmp_path):
    inputs, exclude = curation_inputs
    out = str(tmp_path / "out")
    # other units (and the same tokenizer: the BPE sample is drawn across units): only the unit files may differ
    _run(inputs, exclude, out, "--images-per-unit", "11", "--tokenizer", os.path.join(curated, "tokenizer.model"))
    a, b = _data_files(curated), _data_files(out)
    same = [n for n in a if n.startswith(("shards/", "stats/bucket-"))]
    assert same and all(a[n] == b[n] for n in same)


def test_a_killed_driver_resumes_to_identical_bytes(curated, curation_inputs, tmp_path):
    inputs, exclude = curation_inputs
    out = tmp_path / "out"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", FAULT_ENV: "near:2:exit,groups:0:exit,place:0:hang"}
    proc = subprocess.Popen([sys.executable, "-m", "jpeglm", "preprocess", "--input", inputs, "--exclude", exclude,
                             "--output", str(out), *ARGS], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for(lambda: (out / "_work/faults/place-0").exists(), "the place task", proc, timeout=300)
    _kill(proc)
    assert (out / "_work/faults/near-2").exists()  # a band task died once and was retried
    assert (out / "_work/faults/groups-0").exists()  # so did the components task
    assert not (out / "_work/neardup/groups.json").exists()
    _run(inputs, exclude, str(out))
    _assert_same(_data_files(curated), _data_files(str(out)))
