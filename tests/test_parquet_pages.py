"""Parquet inputs whose row groups are larger than a unit: each unit reads only the pages that hold its rows
(pipeline/parquet_pages.py), with the values a full read gives."""

from __future__ import annotations

import io
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import parquet_pages, sources, storage

ROWS = 240
UNIT = 30


def _values(seed: int) -> list[bytes | None]:
    rng = random.Random(seed)  # incompressible "images" of varied sizes, a few nulls
    return [None if i % 37 == 5 else rng.randbytes(rng.randint(2_000, 12_000)) for i in range(ROWS)]


def _one_row_group(table: pa.Table, page_index: bool) -> bytes:
    buf = io.BytesIO()
    # One row group for the whole file (pyarrow's default for < 1Mi rows); pages of ~16 rows; a dictionary page
    # for the first values, as pyarrow writes (its first 1,024 values of a large file: here ~5% of it, too).
    pq.write_table(table, buf, row_group_size=ROWS, write_batch_size=16, data_page_size=32 << 10,
                   dictionary_pagesize_limit=64 << 10, write_page_index=page_index)
    data = buf.getvalue()
    assert pq.ParquetFile(io.BytesIO(data)).metadata.num_row_groups == 1
    return data


@pytest.mark.parametrize("page_index", [False, True], ids=["header-walk", "offset-index"])
def test_each_unit_reads_about_its_share_from_s3(s3_bucket, s3_proxy, page_index):
    values = _values(1)
    data = _one_row_group(pa.table({"key": list(range(ROWS)), "jpg": values}), page_index)
    uri = f"{s3_bucket}/big.parquet"
    storage.write_bytes(uri, data)
    units = list(sources.plan_units(sources.resolve_inputs([uri]), images_per_unit=UNIT))
    assert len(units) == ROWS // UNIT and all("pages" in u for u in units)
    share = len(data) / len(units)
    got = []
    for unit in units:
        s3_proxy.reset_stats()
        got += [img.data for img in sources.read_unit(unit)]
        read = s3_proxy.stats()["response_bytes"]
        # its rows' pages, at most a page more on each side, the footer (and for the first units the
        # dictionary page): about its share, never the whole row group
        assert read < 2.2 * share, (unit["rows"], read, share)
    assert got == values
    s3_proxy.reset_stats()  # for scale: the same unit read by row groups reads the whole file
    list(sources.read_unit({k: v for k, v in units[-1].items() if k != "pages"}))
    assert s3_proxy.stats()["response_bytes"] > 0.9 * len(data)


def test_input_check_reads_only_the_footer(tmp_path, monkeypatch):
    """checks.check_inputs_hold_images on a one-row-group file of many pages without a page index: the footer only,
    not one read per page as planning its units does."""
    from pipeline.preprocess import checks
    from pipeline.preprocess.config import PreprocessError

    path = tmp_path / "big.parquet"
    path.write_bytes(_one_row_group(pa.table({"key": list(range(ROWS)), "jpg": _values(4)}), page_index=False))
    reads = []
    read_range = storage.read_range
    monkeypatch.setattr(storage, "read_range", lambda *a, **k: reads.append(a) or read_range(*a, **k))
    next(sources.plan_units(sources.resolve_inputs([path]), UNIT))
    assert len(reads) > ROWS // 16  # for scale: planning walks every page header
    reads.clear()
    checks.check_inputs_hold_images([str(path)], None)
    assert reads == []
    with pytest.raises(PreprocessError, match="no column 'nope'"):
        checks.check_inputs_hold_images([str(path)], "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    pq.write_table(pa.table({"jpg": pa.array([], pa.binary())}), empty / "none.parquet")  # a usable column, no rows
    with pytest.raises(PreprocessError, match="holds no images"):
        checks.check_inputs_hold_images([str(empty)], None)


def test_parquet_units_declare_the_image_bytes_their_reader_holds(tmp_path):
    """A unit of a Parquet column of image bytes holds its images (not a window of them): planning estimates that
    from the footer (~2x its share when read by pages; by row groups, the largest row group read whole plus its
    share), the plan keeps the largest, and the encode task declares it."""
    from pipeline.preprocess import encode, plan
    from pipeline.preprocess.layout import Layout

    values = _values(5)
    table = pa.table({"key": list(range(ROWS)), "jpg": values})
    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "a.parquet").write_bytes(_one_row_group(table, page_index=True))
    (tmp_path / "groups").mkdir()
    pq.write_table(table, tmp_path / "groups" / "a.parquet", row_group_size=UNIT * 2 // 3)  # smaller than a unit
    units = {}
    for kind, low, high in [("pages", 1.8, 2.3), ("groups", 1.5, 2.3)]:
        units[kind] = list(sources.plan_units(sources.resolve_inputs([tmp_path / kind]), UNIT))
        assert all(("pages" in u) == (kind == "pages") for u in units[kind])
        for u in units[kind]:
            share = sum(len(v or b"") for v in values[u["rows"][0] : u["rows"][1]])
            assert low * share < u["source_bytes"] < high * share, (kind, u["rows"], u["source_bytes"], share)
    config = {"inputs": [str(tmp_path / "pages")], "images_per_unit": UNIT, "image_column": None,
              "images_per_bucket": 1000}
    planned = plan.plan_units(Layout(str(tmp_path / "out")), config)
    assert planned.source_bytes == max(u["source_bytes"] for u in units["pages"]) > 0
    assert encode.encode_memory(UNIT, 256, planned.source_bytes) == encode.encode_memory(UNIT, 256) + planned.source_bytes
    assert plan.plan_units(Layout(str(tmp_path / "out")), config) == planned  # resumed from plan.json


def test_struct_column_with_nulls_and_positions_match_a_full_read(tmp_path):
    values = _values(2)
    structs = [None if i % 41 == 7 else {"bytes": v, "path": f"img/{i}.jpg"} for i, v in enumerate(values)]
    path = tmp_path / "hf.parquet"
    path.write_bytes(_one_row_group(pa.table({"image": structs, "label": list(range(ROWS))}), page_index=False))
    os.makedirs(tmp_path / "img")
    for i in (3, 19):  # path-only images (bytes null) are read from their path
        (tmp_path / "img" / f"{i}.jpg").write_bytes(b"from-path-%d" % i)
        structs[i] = {"bytes": None, "path": f"img/{i}.jpg"}
    path.write_bytes(_one_row_group(pa.table({"image": structs, "label": list(range(ROWS))}), page_index=False))
    units = list(sources.plan_units(sources.resolve_inputs([path]), images_per_unit=UNIT))
    by_pages = [img for u in units for img in sources.read_unit(u)]
    by_groups = [img for u in units for img in sources.read_unit({k: v for k, v in u.items() if k != "pages"})]
    assert all("pages" in u for u in units) and by_pages == by_groups
    assert by_pages[3].data == b"from-path-3" and by_pages[19].data == b"from-path-19"
    assert by_pages[7].data is None and by_pages[7].error == "null image path"
    assert [img.data for img in by_pages if img.error == ""][:3] == [s["bytes"] for s in structs[:3]]
    some = list(sources.read_unit(units[1], positions={0, 29}))
    assert [img.id for img in some] == [f"hf.parquet#{UNIT}", f"hf.parquet#{2 * UNIT - 1}"]


def test_thrift_footer_round_trip(tmp_path):
    """The compact-protocol reader/writer reproduce pyarrow's footer byte for byte."""
    path = tmp_path / "x.parquet"
    path.write_bytes(_one_row_group(pa.table({"jpg": _values(3), "n": list(range(ROWS))}), page_index=True))
    footer = parquet_pages.read_footer(str(path))
    out = bytearray()
    parquet_pages._write_struct(out, footer.metadata())
    assert bytes(out) == footer.data


def test_pages_that_do_not_decode_fall_back_to_row_groups(tmp_path, caplog):
    values = _values(4)
    path = tmp_path / "x.parquet"
    path.write_bytes(_one_row_group(pa.table({"jpg": values}), page_index=False))
    unit = list(sources.plan_units(sources.resolve_inputs([path]), images_per_unit=UNIT))[2]
    span = unit["pages"]["segments"][0]["columns"][0]
    span["data"] = [span["data"][0] + 7, span["data"][1]]  # not where a page starts
    assert [img.data for img in sources.read_unit(unit)] == values[2 * UNIT : 3 * UNIT]
    assert "reading by pages failed" in caplog.text
