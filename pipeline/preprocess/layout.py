"""Where everything of a job lives under OUTPUT (formats: schemas/README.md; `_work/` is the job's private state).

    _work/config.json                 the job's config and hash (which job this OUTPUT belongs to)
    _work/plan.json                   unit sizes, bucket count, listing counts (the plan is done)
    _work/units/NNNNNN.json           work unit N (sources.plan_units)
    _work/bpe/NNNNNN.bin              unit N's share of the BPE sample (canonical bodies)
    _work/encoded/NNNNNN.bin          unit N's ok images, grouped by shuffle bucket (shuffle.py's record format)
    _work/encoded/done/...            unit done records and their consolidated chunks (results.py)
    _work/encoded/index/NNNNNN.u64    bucket offsets of the units of the chunk starting at unit N (bucket-major)
    _work/encoded/NNNNNN.hashes.parquet  unit N's ok images: position, pHash, body sha256, id (neardup.py)
    _work/encoded/NNNNNN.bands.u64    unit N's pHashes grouped by (band, slot), with their offsets (neardup.py)
    _work/exclude/...                 the --exclude images: units/, hashes/NNNNNN.parquet and .bands.u64, done/
    _work/neardup/plan.json           partitions per band and place tasks (fixed on the first run)
    _work/neardup/pairs/KK-PPPPPP.*   band K, partition P: near pairs and matches of excluded hashes (.npy)
    _work/neardup/done/...            band task done records
    _work/neardup/components/PPPPPP.parquet  slice P of the components: hash, component, excluded_by
    _work/neardup/components.json     the components task's done record
    _work/neardup/place/...           place task done records; groups.json: the phase's (written last)
    _work/neardup/drops/BBBBBB-PPPPPP.parquet  bucket B's near_duplicate and excluded images of slice P
    _work/buckets/NNNNNN.SPLIT.u16    bucket N's token stream of one split (BOS + tokens + EOS per image)
    _work/buckets/done/...            bucket done records and chunks
    _work/shards/done/...             shard done records (manifest entries) and chunks
    stats/unit-NNNNNN.parquet         unit N's images that could not be used
    stats/bucket-NNNNNN.parquet       bucket N's ok and duplicate images, in stream order
"""

from __future__ import annotations

from pipeline import storage

OUR_ENTRIES = ("manifest.json", "summary.json", "tokenizer.model", "tokenizer.json", "shards", "stats", "_work")
# What _work holds before any task finished: an OUTPUT with only these is no finished work of any job.
UNFINISHED_WORK_ENTRIES = ("config.json", "plan.json", "units", "bpe", "faults")


class Layout:
    """Where everything lives under OUTPUT."""

    def __init__(self, output: str):
        self.output = output

    def path(self, *parts: str) -> str:
        return storage.join(self.output, *parts)

    manifest = property(lambda self: self.path("manifest.json"))
    summary = property(lambda self: self.path("summary.json"))
    tokenizer_model = property(lambda self: self.path("tokenizer.model"))
    tokenizer_json = property(lambda self: self.path("tokenizer.json"))
    work = property(lambda self: self.path("_work"))
    work_config = property(lambda self: self.path("_work", "config.json"))
    plan = property(lambda self: self.path("_work", "plan.json"))
    encoded_done = property(lambda self: self.path("_work", "encoded", "done"))
    buckets_done = property(lambda self: self.path("_work", "buckets", "done"))
    shards_done = property(lambda self: self.path("_work", "shards", "done"))
    near_plan = property(lambda self: self.path("_work", "neardup", "plan.json"))
    near_done = property(lambda self: self.path("_work", "neardup", "done"))
    near_groups_done = property(lambda self: self.path("_work", "neardup", "groups.json"))
    near_components_done = property(lambda self: self.path("_work", "neardup", "components.json"))
    near_place_done = property(lambda self: self.path("_work", "neardup", "place"))
    exclude_plan = property(lambda self: self.path("_work", "exclude", "plan.json"))
    exclude_done = property(lambda self: self.path("_work", "exclude", "done"))

    def unit(self, i: int) -> str:
        return self.path("_work", "units", f"{i:06d}.json")

    def bpe_bodies(self, i: int) -> str:
        return self.path("_work", "bpe", f"{i:06d}.bin")

    def encoded(self, unit: int) -> str:
        return self.path("_work", "encoded", f"{unit:06d}.bin")

    def unit_hashes(self, unit: int) -> str:
        return self.path("_work", "encoded", f"{unit:06d}.hashes.parquet")

    def unit_bands(self, unit: int) -> str:
        return self.path("_work", "encoded", f"{unit:06d}.bands.u64")

    def exclude_unit(self, i: int) -> str:
        return self.path("_work", "exclude", "units", f"{i:06d}.json")

    def exclude_hashes(self, i: int) -> str:
        return self.path("_work", "exclude", "hashes", f"{i:06d}.parquet")

    def exclude_bands(self, i: int) -> str:
        return self.path("_work", "exclude", "hashes", f"{i:06d}.bands.u64")

    def near_pairs(self, band: int, part: int) -> str:
        return self.path("_work", "neardup", "pairs", f"{band:02d}-{part:06d}.pairs.npy")

    def near_matches(self, band: int, part: int) -> str:
        return self.path("_work", "neardup", "pairs", f"{band:02d}-{part:06d}.matches.npy")

    def near_components(self, place: int) -> str:
        return self.path("_work", "neardup", "components", f"{place:06d}.parquet")

    def near_drops(self, bucket: int, place: int) -> str:
        return self.path("_work", "neardup", "drops", f"{bucket:06d}-{place:06d}.parquet")

    def bucket_index(self, first_unit: int) -> str:
        return self.path("_work", "encoded", "index", f"{first_unit:06d}.u64")

    def bucket_stream(self, bucket: int, split: str) -> str:
        return self.path("_work", "buckets", f"{bucket:06d}.{split}.u16")

    def unit_stats(self, unit: int) -> str:
        return self.path("stats", f"unit-{unit:06d}.parquet")

    def bucket_stats(self, bucket: int) -> str:
        return self.path("stats", f"bucket-{bucket:06d}.parquet")

    def shard(self, name: str) -> str:
        return self.path("shards", name)

    def fault_marker(self, phase: str, index: int | str) -> str:
        return self.path("_work", "faults", f"{phase}-{index}")
