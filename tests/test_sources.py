"""pipeline/sources.py: listing inputs (folders, tars, Parquet; local and S3) into work units, reading them back."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from pipeline import sources, storage
from pipeline.sample_images import derive

from helpers import parquet_bytes, tar_bytes


@pytest.fixture(scope="module")
def images():
    return list(derive(12, seed=7))  # (name, bytes): real derived photos, JPEG and PNG


def _make_inputs(root: str, images) -> None:
    """A folder with image files (nested), an img2dataset tar (+ its metadata parquet and sidecars), a Hugging
    Face style Parquet, a path-column Parquet and an unrelated text file."""
    for name, data in images[:5]:
        sub = "files/sub" if name.endswith("3.jpg") else "files"
        storage.write_bytes(storage.join(root, sub, name), data)
    members = []
    for i, (name, data) in enumerate(images[5:8]):
        members += [(f"{i:09d}.{name.rsplit('.', 1)[1]}", data), (f"{i:09d}.json", b"{}"), (f"{i:09d}.txt", b"a cat")]
    storage.write_bytes(storage.join(root, "wds", "00000.tar"), tar_bytes(members))
    storage.write_bytes(storage.join(root, "wds", "00000.parquet"),
                        parquet_bytes(pa.table({"key": ["0", "1", "2"],
                                                 "url": ["http://x/a", "http://x/b", "http://x/c"]}), row_group_size=3))
    storage.write_bytes(storage.join(root, "wds", "00000_stats.json"), b"{}")
    hf = pa.table({"image": [{"bytes": d, "path": n} for n, d in images[8:11]], "label": [0, 1, 2]})
    storage.write_bytes(storage.join(root, "hf", "train-00000.parquet"), parquet_bytes(hf, row_group_size=3))
    storage.write_bytes(storage.join(root, "paths", "img", images[11][0]), images[11][1])
    paths = pa.table({"path": [f"img/{images[11][0]}", storage.join(root, "files", images[0][0]), "img/missing.jpg"]})
    storage.write_bytes(storage.join(root, "paths", "index.parquet"), parquet_bytes(paths, row_group_size=3))
    storage.write_bytes(storage.join(root, "notes.txt"), b"not an image")


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "inputs")
    return request.getfixturevalue("s3_bucket") + "/inputs"


def test_all_three_kinds_are_listed_and_read(root, images):
    _make_inputs(root, images)
    counts = sources.PlanCounts()
    units = list(sources.plan_units(sources.resolve_inputs([root]), images_per_unit=2, counts=counts))
    # image files batch up across folders in walk order; tars and Parquet row ranges are units of their own
    assert [u["kind"] for u in units] == ["files", "files", "parquet", "parquet", "files", "parquet", "parquet", "tar"]
    assert (counts.image_files, counts.tars, counts.parquet_files, counts.parquet_rows) == (6, 1, 2, 6)
    # skipped: notes.txt and the tar's _stats.json; the tar's sibling Parquet is img2dataset metadata
    assert (counts.skipped_files, counts.skipped_img2dataset_parquet) == (2, 1)

    got = [img for u in units for img in sources.read_unit(u)]
    by_id = {g.id: g for g in got}
    assert len(by_id) == len(got) == 6 + 3 + 3 + 3  # ids are unique
    names = [n for n, _ in images]
    assert by_id[f"files/{names[0]}"].data == images[0][1]
    assert by_id[f"files/sub/{names[3]}"].data == images[3][1]
    assert by_id[f"paths/img/{names[11]}"].data == images[11][1]  # an image file next to the Parquet that names it
    for i in range(3):
        ext = names[5 + i].rsplit(".", 1)[1]
        assert by_id[f"wds/00000.tar/{i:09d}.{ext}"].data == images[5 + i][1]
        assert by_id[f"hf/train-00000.parquet#{i}"].data == images[8 + i][1]
    assert by_id["paths/index.parquet#0"].data == images[11][1]  # relative to the Parquet's folder
    assert by_id["paths/index.parquet#1"].data == images[0][1]  # absolute path / URI
    missing = by_id["paths/index.parquet#2"]
    assert missing.data is None and "FileNotFoundError" in missing.error


def test_units_are_a_pure_function_of_the_listing(tmp_path, images):
    root = str(tmp_path / "in")
    _make_inputs(root, images)
    a = list(sources.plan_units(sources.resolve_inputs([root]), images_per_unit=3))
    b = list(sources.plan_units(sources.resolve_inputs([root + "/"]), images_per_unit=3))
    assert a == b
    assert [len(u["entries"]) for u in a if u["kind"] == "files"] == [3, 3]
    assert [u["rows"] for u in a if u["kind"] == "parquet"] == [[0, 3], [0, 3]]


def test_several_inputs_get_prefixed_ids_and_single_files_work(tmp_path, images):
    for d in ("a/photos", "b/photos"):
        for name, data in images[:2]:
            storage.write_bytes(str(tmp_path / d / name), data)
    single = tmp_path / "one.jpg"
    single.write_bytes(images[0][1])
    inputs = sources.resolve_inputs([str(tmp_path / "a/photos"), str(tmp_path / "b/photos"), str(single)])
    assert [i.id_prefix for i in inputs] == ["0-photos/", "1-photos/", "one.jpg/"]
    ids = [e[0] for u in sources.plan_units(inputs, 10) for e in u["entries"]]
    assert ids == [f"0-photos/{images[0][0]}", f"0-photos/{images[1][0]}", f"1-photos/{images[0][0]}",
                   f"1-photos/{images[1][0]}", "one.jpg/one.jpg"]


@pytest.mark.parametrize("where", ["in a member", "at a header"])
def test_truncated_tar_keeps_images_before_the_damage(tmp_path, images, where):
    data = tar_bytes([(n, d) for n, d in images[:3]])
    second_header = 512 + -(-len(images[0][1]) // 512) * 512
    cut = second_header + 512 + 100 if where == "in a member" else second_header
    (tmp_path / "bad.tar").write_bytes(data[:cut])
    units = list(sources.plan_units(sources.resolve_inputs([str(tmp_path)]), 10))
    got = list(sources.read_unit(units[0]))
    assert [g.id for g in got] == ["bad.tar/" + images[0][0], "bad.tar#error"]
    assert got[0].data == images[0][1]
    assert got[1].data is None and "unreadable tar after 1 images" in got[1].error
    (tmp_path / "bad.tar").write_bytes(data)  # the intact tar has no error entry
    assert [g.id for g in sources.read_unit(units[0])] == ["bad.tar/" + n for n, _ in images[:3]]


def test_parquet_column_choice_and_errors(tmp_path, images):
    p = tmp_path / "x.parquet"
    p.write_bytes(parquet_bytes(pa.table({"jpg": [images[0][1]], "caption": ["c"]}), row_group_size=3))
    for column, expected in [(None, (1, "jpg", "bytes")), ("caption", (1, "caption", "path"))]:
        layout = sources._parquet_layout(str(p), column)
        assert (layout.rows, layout.column, layout.mode) == expected
    with pytest.raises(sources.InputError, match="no column 'nope'"):
        sources._parquet_layout(str(p), "nope")
    q = tmp_path / "y.parquet"
    q.write_bytes(parquet_bytes(pa.table({"label": [1]}), row_group_size=3))
    with pytest.raises(sources.InputError, match="--image-column"):
        sources._parquet_layout(str(q), None)


def test_bad_inputs_fail_at_planning_with_a_clear_message(tmp_path):
    with pytest.raises(sources.InputError, match="does not exist"):
        list(sources.plan_units(sources.resolve_inputs([str(tmp_path / "nope")]), 10))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(sources.InputError, match="no images"):
        list(sources.plan_units(sources.resolve_inputs([str(tmp_path / "empty")]), 10))
    with pytest.raises(sources.InputError, match="twice"):
        sources.resolve_inputs([str(tmp_path), str(tmp_path) + "/"])


def test_unknown_web_formats_are_listed_not_skipped(tmp_path):
    (tmp_path / "a.webp").write_bytes(b"RIFF....WEBP")
    units = list(sources.plan_units(sources.resolve_inputs([str(tmp_path)]), 10))
    assert units == [{"kind": "files", "entries": [["a.webp", os.path.join(str(tmp_path), "a.webp")]]}]


def test_tar_positions_stop_after_the_last_wanted_member(tmp_path, images):
    (tmp_path / "a.tar").write_bytes(tar_bytes([(n, d) for n, d in images[:5]]))
    (unit,) = sources.plan_units(sources.resolve_inputs([tmp_path / "a.tar"]), 10)
    got = list(sources.read_unit(unit, positions={1, 3}))
    assert [g.id for g in got] == [f"a.tar/{images[1][0]}", f"a.tar/{images[3][0]}"]
    assert [g.data for g in got] == [images[1][1], images[3][1]]


def test_read_ahead_is_ordered_and_bounded():
    import threading
    import time

    from pipeline import prefetch

    lock, state = threading.Lock(), {"started": 0, "consumed": 0, "most_ahead": 0}

    def fetch(i):
        with lock:
            state["started"] += 1
            state["most_ahead"] = max(state["most_ahead"], state["started"] - state["consumed"])
        time.sleep(0.001 * (i % 3))  # finish out of order
        return i

    out = []
    for value in prefetch.ordered(fetch, range(100), window=8):
        out.append(value)
        with lock:
            state["consumed"] += 1
    assert out == list(range(100))
    assert 1 < state["most_ahead"] <= 8  # fetched ahead, never more than the window

    def boom(i):
        if i == 5:
            raise ConnectionResetError("transient, after retries")
        return i

    with pytest.raises(ConnectionResetError):
        list(prefetch.ordered(boom, range(20), window=4))


def test_webp_photo_decodes_and_canonicalizes(tmp_path, photo_names):
    """make setup builds pillow-simd with libwebp: a WebP photo is an image like any other (10% of web images)."""
    import io

    from PIL import Image

    from pipeline import codec
    from pipeline.sample_images import photo_bytes

    photo = Image.open(io.BytesIO(photo_bytes(photo_names[0]))).convert("RGB")
    (tmp_path / "photo.webp").write_bytes(_encode(photo, "WEBP"))
    (unit,) = sources.plan_units(sources.resolve_inputs([tmp_path]), 10)
    (src,) = sources.read_unit(unit)
    jpeg = codec.canonicalize(src.data)
    decoded = Image.open(io.BytesIO(jpeg))
    assert decoded.format == "JPEG" and decoded.size == (256, 256)
    readable, missing = sources.readable_formats()
    assert "WEBP" in readable and "JPEG" in readable and "WEBP" not in missing
    assert sources.readable_formats_line().startswith("reads JPEG, PNG, WEBP")


def _encode(image, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, fmt, quality=80)
    return buf.getvalue()
