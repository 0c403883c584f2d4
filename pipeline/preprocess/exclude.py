"""--exclude: the images that must not be trained on (the paper's evaluation sets: ImageNet-1K validation, FFHQ).

A small stage of its own, before the near-duplicate phase: the exclude inputs (any input kind, via
pipeline/sources.py) are planned into work units under `_work/exclude/units/`, and one task per unit canonicalizes
each image exactly as the training images are (same size and quality; no --min-side / --max-aspect-ratio filter:
an evaluation image is excluded whatever its shape) and writes `_work/exclude/hashes/NNNNNN.parquet` (the hashes
file of neardup.py: position, pHash, body sha256, id) and `NNNNNN.bands.u64` (its bands file), then its done
record. The near-duplicate phase then marks every training image within --near-radius of one of them
`excluded`: an exact copy has the same body, hence the same pHash (distance 0), so exact matches need nothing more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

from pipeline import storage
from pipeline.phash import phash_body
from pipeline.preprocess.config import PreprocessError, canonical_json
from pipeline.preprocess.layout import Layout
from pipeline.preprocess.neardup import write_hashes
from pipeline.preprocess.results import retry_counts, write_record

log = logging.getLogger(__name__)


def plan_exclude(layout: Layout, config: dict) -> int:
    """The exclude inputs' work units -> _work/exclude/units/ (once); returns their number."""
    from pipeline import sources

    if storage.exists(layout.exclude_plan):
        return json.loads(storage.read_bytes(layout.exclude_plan))["units"]
    units = 0
    try:
        listing = sources.plan_units(sources.resolve_inputs(config["exclude"]), config["images_per_unit"],
                                     config["image_column"])
        for i, unit in enumerate(listing):
            storage.write_bytes(layout.exclude_unit(i), canonical_json(unit))
            units += 1
    except sources.InputError as e:
        raise PreprocessError(f"--exclude: {e}") from None
    storage.write_bytes(layout.exclude_plan, canonical_json({"units": units}))
    return units


def exclude_unit_task(output: str, index: int, config: dict) -> dict:
    """Canonicalize and hash one exclude unit; returns its done record (images, ok, failures by reason)."""
    from pipeline import codec, sources

    layout = Layout(output)
    retry_counts()
    start = time.perf_counter()
    unit = json.loads(storage.read_bytes(layout.exclude_unit(index)))
    c = config["codec"]
    rows, failed, images = [], {}, 0
    for position, src in enumerate(sources.read_unit(unit)):
        images += 1
        if src.data is None:
            failed["read_error"] = failed.get("read_error", 0) + 1
            continue
        try:
            body = codec.canonicalize(src.data, c["size"], c["quality"], max_pixels=config["max_pixels"])
        except codec.CodecError as e:
            failed[e.reason] = failed.get(e.reason, 0) + 1
            continue
        rows.append((position, phash_body(body, c["quality"]), hashlib.sha256(body).digest(), src.id, 0))
    write_hashes(layout.exclude_hashes(index), layout.exclude_bands(index), rows, config["near_radius"])
    record = {"unit": index, "images": images, "ok": len(rows), "failed": dict(sorted(failed.items())),
              "seconds": round(time.perf_counter() - start, 3), "retries": retry_counts()}
    write_record(layout.exclude_done, index, record)
    return record


def exclude_phase(layout: Layout, config: dict, in_flight: int) -> dict:
    """Hash every --exclude image not hashed before; returns {"units", "images", "hashed", "failed"}."""
    from pipeline.preprocess import executor
    from pipeline.preprocess.encode import encode_memory
    from pipeline.preprocess.results import ResultLog

    units = plan_exclude(layout, config)
    totals = {"units": units, "images": 0, "hashed": 0, "failed": {}}

    def add(record: dict) -> None:
        totals["images"] += record["images"]
        totals["hashed"] += record["ok"]
        for reason, n in record["failed"].items():
            totals["failed"][reason] = totals["failed"].get(reason, 0) + n

    results = ResultLog(layout.exclude_done, units)
    for _, record in results.load():
        add(record)
    todo = results.todo()
    task = executor.remote(exclude_unit_task, encode_memory(config["images_per_unit"], config["codec"]["size"]))
    for i, record in executor.run_bounded(((i, lambda i=i: task.remote(layout.output, i, config)) for i in todo),
                                          in_flight, len(todo), "exclude (units)"):
        results.add(i, record)
        add(record)
    totals["failed"] = dict(sorted(totals["failed"].items()))
    if totals["failed"]:
        log.warning("--exclude: %d of %d images could not be read or decoded (%s): they cannot be excluded",
                    sum(totals["failed"].values()), totals["images"],
                    ", ".join(f"{k} {v}" for k, v in totals["failed"].items()))
    return totals
