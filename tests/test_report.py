"""`jpeglm report`: an output written without Ray (tests/helpers.write_image_dataset) whose stats hold every kind of
row (ok, exact and near duplicates, an exclusion, filter and codec failures, columns of a newer jpeglm), rendered to
one HTML page; the page read back in a real headless browser (Debian's chromium) when it is installed."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jpeglm import cli
from pipeline import codec, report, stats, storage
from pipeline.inspect import Output

from helpers import write_image_dataset

INPUTS = ["/data/web", "/data/extra"]


def _write_stats(uri: str, rows: list[dict]) -> None:
    """Rows of the stats schema (phash, excluded_by included)."""
    schema = stats.SCHEMA
    full = [{name: r.get(name) for name in schema.names} for r in rows]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(full, schema=schema), buf)
    storage.write_bytes(uri, buf.getvalue())


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """(root, {id: body}): 10 packed images from two inputs; 'web/0' has 3 exact copies and a near copy, 'web/1'
    one exact copy; in a unit file: a truncated image, 2 not_an_image, a bad aspect ratio, a read_error and an
    image excluded as a match of an evaluation image."""
    from pipeline.sample_images import derive
    from pipeline.tokenizer import Tokenizer

    ids = [f"web/{i}" for i in range(6)] + [f"extra/{i}" for i in range(4)]
    bodies = [(i, codec.canonicalize(data, size=64)) for i, (_, data) in zip(ids, derive(10, seed=5))]
    tok = Tokenizer.train([b for _, b in bodies], 320)
    root = str(tmp_path_factory.mktemp("out"))
    write_image_dataset(root, {"train": bodies[:8], "validation": bodies[8:]}, tok, seq_len=256, size=64)
    manifest = json.loads(Path(root, "manifest.json").read_text())
    manifest["config"] = {"inputs": INPUTS}
    Path(root, "manifest.json").write_text(json.dumps(manifest))

    def src(image_id):
        base, n = image_id.split("/")
        return f"/data/{base}/{n}.jpg"

    def ok(image_id, body, split):
        return dict(id=image_id, source=src(image_id), status="ok", message="", source_bytes=10_000 + len(body),
                    source_format="PNG" if image_id.startswith("extra") else "JPEG", source_width=640,
                    source_height=480, jpeg_bytes=len(body), tokens=len(tok.encode(body)), split=split,
                    phash=2**63 + 5)

    def copy(image_id, of, status="duplicate"):
        return dict(id=image_id, source=src(image_id), status=status, message=f"same as {of}",
                    source_bytes=9_000, source_format="JPEG", source_width=320, source_height=240,
                    duplicate_of=of)

    train = [ok(i, b, "train") for i, b in bodies[:8]]
    rows = [train[0], copy("web/c1", "web/0"), copy("web/c2", "web/0"), copy("web/c3", "web/0"),
            copy("extra/n1", "web/0", "near_duplicate"), *train[1:2], copy("web/c4", "web/1"), *train[2:]]
    _write_stats(storage.join(root, "stats", "bucket-000000.parquet"), rows)
    _write_stats(storage.join(root, "stats", "bucket-000001.parquet"),
                 [ok(i, b, "validation") for i, b in bodies[8:]])
    failed = [
        dict(id="web/t", source="/data/web/t.jpg", status="truncated", message="image file is truncated",
             source_bytes=500),
        dict(id="web/x", source="/data/web/x.jpg", status="not_an_image", message="cannot identify image file",
             source_bytes=12),
        dict(id="extra/y", source="/data/extra/y.txt", status="not_an_image", message="cannot identify image file",
             source_bytes=40),
        dict(id="web/wide", source="/data/web/wide.jpg", status="bad_aspect_ratio", message="aspect ratio 5.2 > 3",
             source_bytes=8_000, source_format="JPEG", source_width=2600, source_height=500),
        dict(id="web/r", source="/data/web/r.jpg", status="read_error", message="Permission denied"),
        dict(id="web/leak", source="/data/web/leak.jpg", status="excluded", message="matches an --exclude image",
             source_bytes=7_000, source_format="JPEG", source_width=500, source_height=375,
             excluded_by="imagenet-val/ILSVRC2012_val_00000042.JPEG"),
    ]
    _write_stats(storage.join(root, "stats", "unit-000000.parquet"), failed)
    Path(root, "summary.json").write_text(json.dumps({"wall_time_s": 12.5, "images_per_s": 3.2, "cpus": 2,
                                                      "phase_seconds": {"plan": 0.4, "encode": 9.1, "shards": 1.0},
                                                      "storage_retries": {"throttled": 3}}))
    return root, dict(bodies)


def _page(root, tmp_path, name="report.html") -> str:
    out = tmp_path / name
    assert cli.main(["report", root, "--out", str(out)]) == 0
    return out.read_text()


def _cells(page: str, status: str) -> list[str]:
    """The cells of a status's row in the status table (tags stripped)."""
    row = re.search(rf"<tr><td><span class=\"dot\"[^>]*></span>{status}</td>(.*?)</tr>", page).group(1)
    return [re.sub("<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]


def test_counts_by_status_and_input_from_whatever_statuses_appear(output, tmp_path):
    root, _ = output
    page = _page(root, tmp_path)
    # status, images, share, then one column per input (web, extra)
    assert _cells(page, "ok") == ["10", "47.62%", "6", "4"]
    assert _cells(page, "duplicate") == ["4", "19.05%", "4", "0"]
    assert _cells(page, "near_duplicate") == ["1", "4.76%", "0", "1"]
    assert _cells(page, "not_an_image") == ["2", "9.52%", "1", "1"]
    for status in ("truncated", "bad_aspect_ratio", "read_error", "excluded"):
        assert _cells(page, status)[0] == "1"
    assert "<code>/data/web</code>" in page and "<code>/data/extra</code>" in page
    # examples: the message, and the matched image of an exclusion
    assert "aspect ratio 5.2 &gt; 3" in page and "imagenet-val/ILSVRC2012_val_00000042.JPEG" in page
    # timings from the summary
    assert "encode" in page and "throttled 3" in page
    # self-contained: no script, nothing fetched
    assert "<script" not in page and not re.search(r"(src|href)=\"(https?:)?//", page)


def test_largest_groups_show_the_kept_image_decoded_from_the_shards(output, tmp_path):
    root, bodies = output
    page = _page(root, tmp_path)
    figures = re.findall(r"<figure><img alt=\"([^\"]+)\" src=\"data:image/jpeg;base64,([^\"]+)\">.*?<b>([\d,]+) "
                         r"images</b>", page)
    assert [(kept, n) for kept, _, n in figures] == [("web/0", "5"), ("web/1", "2")]  # largest first
    for kept, data, _ in figures:
        assert base64.b64decode(data) == codec.assemble(bodies[kept])  # the image as the model sees it
    assert "duplicate:</span> web/c1" in page and "... 1 more" in page  # 3 members named, then a count


def test_page_does_not_depend_on_batch_size(output, tmp_path, monkeypatch):
    """Streaming: 3-row batches (a group's copies split over batches) give the same page as one batch per file."""
    root, _ = output
    whole = _page(root, tmp_path, "a.html")
    monkeypatch.setattr(report, "BATCH_ROWS", 3)
    assert _page(root, tmp_path, "b.html") == whole


def test_group_candidates_stay_capped_and_the_recount_is_exact(monkeypatch):
    """Over GROUP_CANDIDATES distinct groups, counts are lowered and small ones dropped (a group spread over
    batches, as near copies are over buckets, is undercounted); the second pass gives the largest their exact
    sizes."""
    monkeypatch.setattr(report, "GROUP_CANDIDATES", 4)

    def batch(copies: list[tuple[str, str]]):
        rows = [dict(id=i, source=f"/d/{i}", status="near_duplicate", message="", duplicate_of=of)
                for i, of in copies]
        return pa.Table.from_pylist(rows, schema=stats.SCHEMA).to_batches()[0]

    batches = [batch([(f"big-{k}", "big") for k in range(6)] + [(f"a{k}", f"single-a{k}") for k in range(5)]),
               batch([(f"big-{k}", "big") for k in range(6, 10)] + [(f"m{k}", "mid") for k in range(3)]
                     + [(f"b{k}", f"single-b{k}") for k in range(5)]),
               batch([("m3", "mid")] + [(f"c{k}", f"single-c{k}") for k in range(5)])]
    found = report.Scan(["/d"])
    for b in batches:
        found.add(b)
        assert len(found.groups) <= 4
    assert found.pruned and found.largest_groups(1)[0][0] == "big" and found.groups["big"] < 10
    found.recount(batches)
    assert found.largest_groups(2) == [("big", 10), ("mid", 4)]
    assert found.group_members["mid"] == [("near_duplicate", f"m{k}") for k in range(3)]
    assert found.status == {"near_duplicate": 29} and found.by_input[("/d", "near_duplicate")] == 29


def test_log_histogram_quantiles_within_a_bin():
    rng = np.random.default_rng(0)
    values = rng.lognormal(8, 0.6, 50_000)
    h = report.LogHistogram()
    for chunk in np.array_split(values, 7):
        h.add(chunk)
    h.add(np.array([0.0, -1.0, np.nan]))
    assert h.total() == values.size and h.other == 3
    width = 2 ** (1 / report.BINS_PER_OCTAVE)
    for q in (0.5, 0.9, 0.99):
        true = np.quantile(values, q)
        assert true <= h.quantile(q) <= true * width * 1.0001
    assert sum(c for _, _, c in h.bars(max_bars=10)) == values.size and len(h.bars(max_bars=10)) <= 10


def test_report_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jpeglm report: error: ") and "Traceback" not in err and err.count("\n") == 1


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-headless-shell")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make setup-browser installs it)")
def test_page_renders_in_headless_chromium_without_console_errors(output, tmp_path):
    root, _ = output
    path = tmp_path / "report.html"
    _page(root, tmp_path)
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
              f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for bad in ("Uncaught", "ERROR:CONSOLE", "Failed to load resource"):
        assert bad not in dom.stderr, dom.stderr[-2000:]
    assert "jpeglm preprocess report" in dom.stdout and "near_duplicate" in dom.stdout
    assert dom.stdout.count("data:image/jpeg;base64,") == 2
    shot = tmp_path / "shot.png"
    run = subprocess.run([*common, f"--screenshot={shot}", "--window-size=1000,1400", path.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1000, 1400)
    colors = img.getcolors(1 << 20) or []
    assert len(colors) > 50  # text, charts and thumbnails were drawn, not a blank page
