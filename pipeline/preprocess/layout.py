"""Where everything of a job lives under OUTPUT (formats: schemas/README.md)."""

from __future__ import annotations

from pipeline import storage

OUR_ENTRIES = ("manifest.json", "summary.json", "tokenizer.model", "tokenizer.json", "shards", "stats", "_work")


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
    work_config = property(lambda self: self.path("_work", "config.json"))
    plan = property(lambda self: self.path("_work", "plan.json"))

    def unit(self, i: int) -> str:
        return self.path("_work", "units", f"{i:06d}.json")

    def bpe_bodies(self, i: int) -> str:
        return self.path("_work", "bpe", f"{i:06d}.bin")

    def stream(self, i: int, split: str) -> str:
        return self.path("_work", "encoded", f"{i:06d}", f"{split}.u16")

    def encoded_done(self, i: int) -> str:
        return self.path("_work", "encoded", f"{i:06d}.done.json")

    def stats(self, i: int) -> str:
        return self.path("stats", f"unit-{i:06d}.parquet")

    def shard(self, name: str) -> str:
        return self.path("shards", name)

    def shard_done(self, name: str) -> str:
        return self.path("_work", "shards", name + ".json")

    def fault_marker(self, phase: str, index: int | str) -> str:
        return self.path("_work", "faults", f"{phase}-{index}")

