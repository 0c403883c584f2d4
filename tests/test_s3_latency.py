"""Reading units from S3 behind the delay/fault proxy (jpeglm/devtools/s3proxy.py): requests overlap, one request per
image, throttling is retried and counted and changes no byte."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline import sources, storage
from pipeline.sample_images import derive

from helpers import parquet_bytes, tar_bytes

N = 24


@pytest.fixture(scope="module")
def images():
    return list(derive(N, seed=3))


@pytest.fixture
def s3_images(s3_bucket, images):
    for name, data in images:
        storage.write_bytes(f"{s3_bucket}/img/{name}", data)
    units = list(sources.plan_units(sources.resolve_inputs([f"{s3_bucket}/img"]), images_per_unit=N))
    assert len(units) == 1
    return units[0]


def test_unit_reads_overlap_one_get_per_image(s3_images, s3_proxy, images):
    s3_proxy.delay_s = 0.02  # S3-like round trip
    s3_proxy.reset_stats()
    got = list(sources.read_unit(s3_images))
    assert [g.data for g in got] == [d for _, d in images]  # same bytes, same order
    stats = s3_proxy.stats()
    assert stats["by_method"] == {"GET": N}  # no HEAD before each GET
    assert stats["max_in_flight"] > 1  # the reads overlap
    assert stats["max_in_flight"] <= sources.READ_WINDOW


def test_throttling_is_retried_counted_and_changes_no_byte(s3_bucket, s3_images, s3_proxy, images):
    s3_proxy.fault_fraction = 0.25  # deterministic: seeded by (seed, request, attempt)
    s3_proxy.reset_stats()
    storage.take_retry_counts()
    got = list(sources.read_unit(s3_images))
    assert [g.data for g in got] == [d for _, d in images] and all(g.error == "" for g in got)
    faults = s3_proxy.stats()["faults"]
    assert faults > 0
    assert storage.take_retry_counts() == {"throttled": faults}  # every 503 SlowDown was retried, and counted
    # a tar, streamed in ranged GETs by a read-ahead thread
    storage.write_bytes(f"{s3_bucket}/wds/00000.tar", tar_bytes(images))
    (unit,) = sources.plan_units(sources.resolve_inputs([f"{s3_bucket}/wds"]), images_per_unit=N)
    s3_proxy.reset_stats()
    storage.take_retry_counts()
    assert [g.data for g in sources.read_unit(unit)] == [d for _, d in images]
    counts = storage.take_retry_counts()  # a 503 to a HEAD (the tar's size) has no body to say SlowDown
    assert sum(counts.values()) == s3_proxy.stats()["faults"] and set(counts) <= {"throttled", "server_error"}
    # writes too (PutObject): retried, counted, content intact
    s3_proxy.reset_stats()
    storage.take_retry_counts()
    for i in range(10):
        storage.write_bytes(f"{s3_bucket}/out/{i}.bin", images[i][1])
    assert [storage.read_bytes(f"{s3_bucket}/out/{i}.bin") for i in range(10)] == [d for _, d in images[:10]]
    assert storage.take_retry_counts() == {"throttled": s3_proxy.stats()["faults"]}


def test_positions_read_only_those_objects(s3_bucket, s3_images, s3_proxy, images):
    s3_proxy.reset_stats()
    got = list(sources.read_unit(s3_images, positions={0, 7, N - 1}))
    assert [g.data for g in got] == [images[0][1], images[7][1], images[N - 1][1]]
    assert s3_proxy.stats()["by_method"] == {"GET": 3}

    # a Parquet path column: the column is read (footer + one column chunk), then only the chosen objects
    table = pa.table({"path": [f"img/{name}" for name, _ in images]})
    storage.write_bytes(f"{s3_bucket}/index.parquet", parquet_bytes(table, row_group_size=N))
    (unit,) = sources.plan_units(sources.resolve_inputs([f"{s3_bucket}/index.parquet"]), images_per_unit=N)
    s3_proxy.reset_stats()
    got = list(sources.read_unit(unit, positions={2, 5}))
    assert [g.data for g in got] == [images[2][1], images[5][1]]
    object_gets = s3_proxy.stats()["by_method"]["GET"]
    s3_proxy.reset_stats()
    list(sources.read_unit(unit))
    assert s3_proxy.stats()["by_method"]["GET"] - object_gets == N - 2  # the Parquet reads are the same
