"""Plan: stream the input listing into work units (OUTPUT/_work/units/), and choose the BPE sample across them."""

from __future__ import annotations

import json
import logging
import math
import time

from pipeline import storage
from pipeline.preprocess.config import PreprocessError, canonical_json
from pipeline.preprocess.layout import Layout

log = logging.getLogger(__name__)

SAMPLE_MIN_PER_UNIT = 16  # the BPE sample takes at least this many images from each unit it visits


def plan_units(layout: Layout, config: dict) -> list[int | None]:
    """Work units -> _work/units/; returns each unit's image count (None for tars). Resumed if planned."""
    from pipeline import sources

    if storage.exists(layout.plan):
        plan = json.loads(storage.read_bytes(layout.plan))
        log.info("plan: %d work units (planned before)", len(plan["unit_sizes"]))
        return plan["unit_sizes"]
    counts = sources.PlanCounts()
    sizes: list[int | None] = []
    listing = sources.plan_units(sources.resolve_inputs(config["inputs"]), config["images_per_unit"],
                                 config["image_column"], counts)
    t0 = time.perf_counter()
    try:
        for i, unit in enumerate(listing):
            storage.write_bytes(layout.unit(i), canonical_json(unit))
            sizes.append(unit_size(unit))
    except sources.InputError as e:
        raise PreprocessError(str(e)) from None
    counts.units = len(sizes)
    log.info("plan: %d work units from %d image files, %d tars, %d Parquet files (%d rows); skipped %d other "
             "files and %d img2dataset metadata Parquet files (%.1f s)", counts.units, counts.image_files,
             counts.tars, counts.parquet_files, counts.parquet_rows, counts.skipped_files,
             counts.skipped_img2dataset_parquet, time.perf_counter() - t0)
    storage.write_bytes(layout.plan, canonical_json({"unit_sizes": sizes, "counts": counts.__dict__}))
    return sizes


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

