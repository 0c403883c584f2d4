"""The driver: runs the phases in order (each resumable), and writes the manifest and the summary.

It holds metadata only (unit sizes and counts); images and tokens move through OUTPUT, never through the driver or
Ray's object store.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

from pipeline import storage
from pipeline.preprocess import executor
from pipeline.preprocess.bpe import bpe_sample_task, fit_tokenizer_task
from pipeline.preprocess.config import (SPLITS, PreprocessError, config_difference, config_from_args,
                                        config_hash, pretty_json)
from pipeline.preprocess.encode import encode_unit_task
from pipeline.preprocess.layout import OUR_ENTRIES, Layout
from pipeline.preprocess.plan import bpe_sample_plan, plan_units
from pipeline.preprocess.write import estimated_row_bytes, plan_shards, write_shard_task
from pipeline.shards import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION

log = logging.getLogger(__name__)


class Job:
    def __init__(self, output: str, config: dict, tokenizer_source: str | None = None):
        self.output = output.rstrip("/") if storage.is_remote(output) else os.path.abspath(output)
        self.layout = Layout(self.output)
        self.config = config
        self.tokenizer_source = tokenizer_source
        self._given_tokenizer = None
        if tokenizer_source is not None:
            from pipeline.tokenizer import Tokenizer

            try:
                self._given_tokenizer = Tokenizer.load(tokenizer_source)
            except (FileNotFoundError, ValueError) as e:
                raise PreprocessError(f"--tokenizer {tokenizer_source}: {e}") from None
            self.config["tokenizer"] = self._given_tokenizer.fingerprint
            self.config["vocab_size"] = self._given_tokenizer.vocab_size

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Job":
        return cls(args.output, config_from_args(args), args.tokenizer)

    # -- driver entry point ------------------------------------------------------------------------------------

    def run(self, address: str | None = None, num_cpus: int | None = None, max_in_flight: int | None = None,
            overwrite: bool = False, keep_work: bool = False) -> dict:
        start = time.perf_counter()
        finished = self._check_output(overwrite)
        if finished is not None:
            log.info("%s is already complete (same config); nothing to do", self.output)
            return finished
        if address and not storage.is_remote(self.output):
            log.warning("OUTPUT %s is a local path: every node of the Ray cluster must see it (a shared "
                        "filesystem); use s3://... otherwise", self.output)
        started_ray = executor.init_ray(address, num_cpus)
        try:
            import ray

            cpus = float(ray.cluster_resources().get("CPU", 1))
            in_flight = max_in_flight or max(2, int(2 * cpus))
            phases = {}
            t = time.perf_counter()
            units = plan_units(self.layout, self.config)
            phases["plan"], t = time.perf_counter() - t, time.perf_counter()
            fingerprint, tok_meta = self._tokenizer_phase(units, in_flight)
            phases["tokenizer"], t = time.perf_counter() - t, time.perf_counter()
            counts_by_unit, processed = self._encode_phase(units, fingerprint, in_flight)
            phases["encode"], t = time.perf_counter() - t, time.perf_counter()
            manifest, shard_totals = self._shard_phase(counts_by_unit, tok_meta, in_flight)
            phases["shards"] = time.perf_counter() - t
        finally:
            if started_ray:
                import ray

                ray.shutdown()
        from pipeline import stats

        total = stats.Counts()
        for c in counts_by_unit:
            total = total + c
        summary = stats.summarize(
            total,
            rows={s: manifest["totals"][s]["rows"] for s in SPLITS},
            shards={s: sum(1 for sh in manifest["shards"] if sh["split"] == s) for s in SPLITS},
            shard_bytes=sum(sh["bytes"] for sh in manifest["shards"]),
            padding_tokens=shard_totals["padding"], dropped_tokens=shard_totals["dropped"],
            wall_s=time.perf_counter() - start, images_this_run=processed, cpus=cpus,
        )
        summary["phase_seconds"] = {k: round(v, 2) for k, v in phases.items()}
        manifest["images"] = {"total": total.images, "ok": total.ok,
                              "failed": {k: v for k, v in total.status.items() if k != stats.OK}}
        storage.write_bytes(self.layout.summary, pretty_json(summary))
        storage.write_bytes(self.layout.manifest, pretty_json(manifest))  # last: the output is complete
        if not keep_work:
            storage.remove(self.layout.path("_work"), recursive=True)
        return summary

    # -- phase 0: is OUTPUT ours, and made with this config? --------------------------------------------------

    def _check_output(self, overwrite: bool) -> dict | None:
        """Refuse mixing outputs; returns the saved summary if the same job already finished."""
        chash = config_hash(self.config)
        previous = None
        if storage.exists(self.layout.manifest):
            previous = json.loads(storage.read_bytes(self.layout.manifest))
        elif storage.exists(self.layout.work_config):
            previous = json.loads(storage.read_bytes(self.layout.work_config))
        present = [e for e in storage.listdir(self.output) if not e.startswith(".")]
        if previous is not None and previous.get("config_hash") == chash:
            if "shards" in previous:  # the manifest: complete
                if storage.exists(self.layout.summary):
                    return json.loads(storage.read_bytes(self.layout.summary))
                return {}
            log.info("resuming the unfinished job in %s", self.output)
            return None
        if previous is not None or any(e in OUR_ENTRIES for e in present):
            if not overwrite:
                what = config_difference(previous.get("config", {}) if previous else {}, self.config)
                raise PreprocessError(
                    f"{self.output} holds an output made with another config ({what}). Refusing to mix them: "
                    "use another --output, or pass --overwrite to replace it")
            log.warning("--overwrite: removing the previous output in %s", self.output)
            for entry in OUR_ENTRIES:
                storage.remove(self.layout.path(entry), recursive=True)
        elif present and not overwrite:
            raise PreprocessError(f"{self.output} is not empty and is not a jpeglm preprocess output "
                                  f"(it holds {', '.join(present[:5])}); choose an empty or new --output")
        storage.write_bytes(self.layout.work_config, pretty_json({"config": self.config, "config_hash": chash}))
        return None

    # -- phase 2: tokenizer -----------------------------------------------------------------------------------

    def _tokenizer_phase(self, unit_sizes: list[int | None], in_flight: int) -> tuple[str, dict]:
        if storage.exists(self.layout.tokenizer_json) and storage.exists(self.layout.tokenizer_model):
            meta = json.loads(storage.read_bytes(self.layout.tokenizer_json))
            log.info("tokenizer: %s (from before)", meta["fingerprint"][:12])
            return meta["fingerprint"], meta
        if self._given_tokenizer is not None:
            tok = self._given_tokenizer
            tok.save(self.layout.tokenizer_model)
            meta = {**tok.metadata(), "source": self.tokenizer_source}
            storage.write_bytes(self.layout.tokenizer_json, pretty_json(meta))
            log.info("tokenizer: %s copied from %s", tok.fingerprint[:12], self.tokenizer_source)
            return tok.fingerprint, meta
        import ray

        chosen, take = bpe_sample_plan(unit_sizes, self.config["bpe_sample"])
        t0 = time.perf_counter()
        sample_task = executor.remote(bpe_sample_task)
        got = executor.run_bounded(
            ((i, lambda i=i: sample_task.remote(self.output, i, take, self.config)) for i in chosen),
            in_flight, len(chosen), "BPE sample (units)")
        n = sum(got.values())
        if n == 0:
            raise PreprocessError("no image of the BPE sample could be canonicalized: check the inputs "
                                  "(see OUTPUT/stats after an encode, or pass --tokenizer)")
        fit = executor.remote(fit_tokenizer_task)
        meta = ray.get(fit.remote(self.output, chosen, self.config["vocab_size"]))
        log.info("tokenizer: fitted on %d images from %d units in %.1f s (fingerprint %s)", n, len(chosen),
                 time.perf_counter() - t0, meta["fingerprint"][:12])
        return meta["fingerprint"], meta

    # -- phase 3: encode --------------------------------------------------------------------------------------

    def _encode_phase(self, unit_sizes: list[int | None], fingerprint: str, in_flight: int):
        from pipeline import stats

        n = len(unit_sizes)
        done_names = set(storage.listdir(self.layout.path("_work", "encoded")))
        done: dict[int, dict] = {}
        for i in range(n):
            if f"{i:06d}.done.json" in done_names:
                done[i] = json.loads(storage.read_bytes(self.layout.encoded_done(i)))
        todo = [i for i in range(n) if i not in done]
        if done:
            log.info("encode: %d of %d units done before; %d to go", len(done), n, len(todo))
        encode = executor.remote(encode_unit_task)
        results = executor.run_bounded(
            ((i, lambda i=i: encode.remote(self.output, i, self.config, fingerprint)) for i in todo),
            in_flight, len(todo), "encode (units)")
        done.update(results)
        counts = [stats.Counts.from_json(done[i]["counts"]) for i in range(n)]
        processed = sum(stats.Counts.from_json(r["counts"]).images for r in results.values())
        return counts, processed

    # -- phase 4: shards; phase 5: manifest -------------------------------------------------------------------

    def _shard_phase(self, counts_by_unit: list, tok_meta: dict, in_flight: int) -> tuple[dict, dict]:
        seq_len = self.config["seq_len"]
        rows_per_shard = max(1, self.config["shard_size"] // estimated_row_bytes(seq_len))
        specs, totals = [], {}
        padding_all = dropped_all = 0
        for split in SPLITS:
            unit_tokens = [(i, c.split_tokens.get(split, 0)) for i, c in enumerate(counts_by_unit)]
            split_specs, rows, padding, dropped = plan_shards(split, unit_tokens, seq_len, rows_per_shard,
                                                              self.config["last_row"])
            specs += split_specs
            totals[split] = {"images": sum(c.split_images.get(split, 0) for c in counts_by_unit), "rows": rows,
                             "tokens": rows * seq_len, "padding_tokens": padding, "dropped_tokens": dropped}
            padding_all += padding
            dropped_all += dropped
        done_names = set(storage.listdir(self.layout.path("_work", "shards")))
        entries: dict[str, dict] = {}
        for spec in specs:
            if f"{spec.name}.json" in done_names and storage.exists(self.layout.shard(spec.name)):
                entries[spec.name] = json.loads(storage.read_bytes(self.layout.shard_done(spec.name)))
        todo = [s for s in specs if s.name not in entries]
        write = executor.remote(write_shard_task)
        entries.update(executor.run_bounded(
            ((s.name, lambda s=s: write.remote(self.output, s, seq_len, tok_meta["eos_id"])) for s in todo),
            in_flight, len(todo), "shards"))
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_FORMAT_VERSION,
            "seq_len": seq_len,
            "token_dtype": "uint16",
            "tokenizer": {"path": "tokenizer.model", "fingerprint": tok_meta["fingerprint"],
                          "vocab_size": tok_meta["vocab_size"], "bos_id": tok_meta["bos_id"],
                          "eos_id": tok_meta["eos_id"]},
            "codec": self.config["codec"],
            "config": self.config,
            "config_hash": config_hash(self.config),
            "last_row_policy": self.config["last_row"],
            "pad_id": tok_meta["eos_id"],
            "shards": [entries[s.name] for s in specs],
            "totals": totals,
            "stats": {"path": "stats/", "files": len(counts_by_unit)},
        }
        return manifest, {"padding": padding_all, "dropped": dropped_all}

