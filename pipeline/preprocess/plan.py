"""Plan: stream the input listing into work units (OUTPUT/_work/units/), fix the number of shuffle buckets, and
choose the BPE sample across the units. The driver holds one int per unit, never the listing."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

from pipeline import storage
from pipeline.preprocess.config import PreprocessError, canonical_json
from pipeline.preprocess.encode import TAR_IMAGES_ESTIMATE
from pipeline.preprocess.layout import Layout

log = logging.getLogger(__name__)

SAMPLE_MIN_PER_UNIT = 16  # the BPE sample takes at least this many images from each unit it visits


@dataclass(frozen=True)
class Plan:
    unit_sizes: list  # images per unit (None: a tar, known once read)
    buckets: int  # shuffle buckets R: a pure function of the plan and --images-per-bucket
    source_bytes: int = 0  # the most source bytes a unit's reader holds at once (Parquet image bytes; see sources)

    @property
    def units(self) -> int:
        return len(self.unit_sizes)


def bucket_count(unit_sizes: list[int | None], images_per_bucket: int) -> int:
    """ceil(planned images / images per bucket), a tar counted as TAR_IMAGES_ESTIMATE images."""
    planned = sum(TAR_IMAGES_ESTIMATE if n is None else n for n in unit_sizes)
    return max(1, math.ceil(planned / images_per_bucket))


def plan_units(layout: Layout, config: dict) -> Plan:
    """Work units -> _work/units/ (written as the listing streams by); resumed if planned before."""
    from pipeline import sources
    from pipeline.stats import plural

    if storage.exists(layout.plan):
        saved = json.loads(storage.read_bytes(layout.plan))
        plan = Plan(saved["unit_sizes"], saved["buckets"], saved["source_bytes"])
        log.info("plan: %s, %s (planned before)", plural(plan.units, "work unit"), plural(plan.buckets, "bucket"))
        return plan
    counts = sources.PlanCounts()
    sizes: list[int | None] = []
    source_bytes = 0
    listing = sources.plan_units(sources.resolve_inputs(config["inputs"]), config["images_per_unit"],
                                 config["image_column"], counts)
    t0 = time.perf_counter()
    try:
        for i, unit in enumerate(listing):
            storage.write_bytes(layout.unit(i), canonical_json(unit))
            sizes.append(unit_size(unit))
            source_bytes = max(source_bytes, unit.get("source_bytes", 0))
    except sources.InputError as e:
        raise PreprocessError(str(e)) from None
    counts.units = len(sizes)
    plan = Plan(sizes, bucket_count(sizes, config["images_per_bucket"]), source_bytes)
    found = [plural(n, noun) for n, noun in [(counts.image_files, "image file"), (counts.tars, "tar"),
                                             (counts.parquet_files, "Parquet file"), (counts.parquet_rows, "row")] if n]
    skipped = [plural(n, noun) for n, noun in [(counts.skipped_files, "other file"),
                                               (counts.skipped_img2dataset_parquet, "img2dataset metadata Parquet")] if n]
    log.info("plan: %s, %s from %s%s (%.1f s)", plural(counts.units, "work unit"),
             plural(plan.buckets, "shuffle bucket"), ", ".join(found), "; skipped " + ", ".join(skipped) if skipped else "",
             time.perf_counter() - t0)
    storage.write_bytes(layout.plan, canonical_json({"unit_sizes": sizes, "buckets": plan.buckets,
                                                     "source_bytes": source_bytes, "counts": counts.__dict__}))
    return plan


def unit_size(unit: dict) -> int | None:
    if unit["kind"] == "files":
        return len(unit["entries"])
    if unit["kind"] == "parquet":
        return unit["rows"][1] - unit["rows"][0]
    return None  # a tar: known once read


def bpe_sample_plan(unit_sizes: list[int | None], bpe_sample: int) -> tuple[list[int], int]:
    """(units to sample, images to take from each): about bpe_sample images from evenly spaced units, at least
    SAMPLE_MIN_PER_UNIT from each unit visited, so that the sample spans every part of every input. Small units
    give fewer: more units are visited until the known sizes add up (a tar counts as `take`)."""
    n = len(unit_sizes)
    m = min(n, max(1, math.ceil(bpe_sample / SAMPLE_MIN_PER_UNIT)))
    while True:
        chosen = sorted({j * n // m for j in range(m)})
        take = math.ceil(bpe_sample / len(chosen))
        expected = sum(take if unit_sizes[i] is None else min(take, unit_sizes[i]) for i in chosen)
        if expected >= bpe_sample or m == n:
            return chosen, take
        m = min(n, 2 * m)


def sample_positions(n: int | None, take: int) -> set[int] | int:
    """Which images of a unit go into the BPE sample: `take` evenly spaced positions when the unit's size n is
    known, else (a tar) the first `take` images (returned as an int limit)."""
    if n is None:
        return take
    if take >= n:
        return set(range(n))
    return {i * n // take for i in range(take)}

