"""The driver: checks, then the phases in order (each resumable), then the manifest and the summary.

    check inputs and OUTPUT (nothing created yet) -> start/join Ray -> check the cluster sees local paths ->
    claim OUTPUT (_work/config.json) -> plan -> tokenizer -> encode -> environment-failure check -> [--exclude
    hashes, near-duplicate bands and groups] -> shuffle buckets -> shards -> manifest.json (last) + summary.json

It holds metadata only: one int per unit (plan), running totals, each bucket's token counts and the manifest's shard
entries; never a per-image list. Images and tokens move through OUTPUT, never through the driver or Ray's object
store. Finished tasks are found again from their done records (results.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipeline import stats, storage
from pipeline.preprocess import checks, executor
from pipeline.preprocess.bpe import bpe_sample_task, fit_memory, fit_tokenizer_task, sample_memory
from pipeline.preprocess.config import (DEFAULTS, SPLITS, PreprocessError, config_difference, config_from_args,
                                        config_hash, pretty_json)
from pipeline.preprocess.encode import encode_memory, encode_unit_task
from pipeline.preprocess.exclude import exclude_phase
from pipeline.preprocess.neardup import active as near_active
from pipeline.preprocess.neardup import curation_report, near_phase
from pipeline.preprocess.layout import OUR_ENTRIES, UNFINISHED_WORK_ENTRIES, Layout
from pipeline.preprocess.plan import Plan, bpe_sample_plan, plan_units
from pipeline.preprocess.results import RESULT_CHUNK, ResultLog, add_retries
from pipeline.preprocess.shuffle import bucket_memory, shuffle_bucket_task, write_bucket_index
from pipeline.preprocess.write import estimated_row_bytes, plan_shards, shard_memory, write_shard_task
from pipeline.shards import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION

log = logging.getLogger(__name__)
plural = stats.plural

PASS_HEADROOM = 1.25  # a bucket holds about --images-per-bucket images; read it in one pass up to this much more


@dataclass
class EncodeTotals:
    """The encode phase's done records, summed (and the first example of each failure reason, by unit)."""

    images: int = 0
    ok: int = 0
    encoded_bytes: int = 0
    failed: stats.Counts = field(default_factory=stats.Counts)
    examples: dict = field(default_factory=dict)  # reason -> (unit, [id, message])
    retries: Counter = field(default_factory=Counter)

    def add(self, unit: int, record: dict) -> None:
        self.images += record["images"]
        self.ok += record["ok"]
        self.encoded_bytes += record["encoded_bytes"]
        self.failed = self.failed + stats.Counts.from_json(record["counts"])
        for reason, example in record.get("examples", {}).items():
            if reason not in self.examples or unit < self.examples[reason][0]:
                self.examples[reason] = (unit, example)
        add_retries(self.retries, record)


class Job:
    def __init__(self, output: str | os.PathLike, config: dict, tokenizer_source: str | None = None):
        output = os.fspath(output)
        self.output = output.rstrip("/") if storage.is_remote(output) else os.path.abspath(output)
        self.layout = Layout(self.output)
        self.config = config
        self.tokenizer_source = tokenizer_source
        self.already_complete = False  # set by run() when OUTPUT already held this finished job
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
        inputs = checks.resolve_inputs(args.input)
        excludes = checks.resolve_excludes(getattr(args, "exclude", None) or [])
        return cls(args.output, config_from_args(args, inputs, excludes), args.tokenizer)

    # -- driver entry point ------------------------------------------------------------------------------------

    def run(self, address: str | None = None, num_cpus: int | None = None, max_in_flight: int | None = None,
            overwrite: bool = False, keep_work: bool = False,
            max_failed_fraction: float = DEFAULTS["max_failed_fraction"], verbose: bool = False) -> dict:
        """Run (or resume) the job; returns the summary. Nothing is created in OUTPUT before the inputs and OUTPUT
        are checked and Ray has started."""
        start = time.perf_counter()
        checks.check_output_usable(self.output)
        state = self._output_state(overwrite)
        if state == "complete":
            self.already_complete = True
            return json.loads(storage.read_bytes(self.layout.summary)) if storage.exists(self.layout.summary) else {}
        checks.check_inputs_hold_images(self.config["inputs"], self.config["image_column"])
        if self.config.get("exclude"):
            checks.check_inputs_hold_images(self.config["exclude"], self.config["image_column"])
        from pipeline import sources

        log.info("images: %s", sources.readable_formats_line())
        started_ray = executor.init_ray(address, num_cpus, verbose, self.output)
        try:
            import ray

            checks.check_cluster_sees(self.config["inputs"] + self.config.get("exclude", []),
                                      self.output)  # every node sees the local paths
            self._claim(state)
            cpus = float(ray.cluster_resources().get("CPU", 1))
            in_flight = max_in_flight or max(2, int(2 * cpus))
            phases, t = {}, time.perf_counter()

            def lap(name):
                nonlocal t
                phases[name], t = round(time.perf_counter() - t, 2), time.perf_counter()

            plan = plan_units(self.layout, self.config)
            lap("plan")
            fingerprint, tok_meta = self._tokenizer_phase(plan, in_flight)
            lap("tokenizer")
            encoded, images_this_run = self._encode_phase(plan, fingerprint, in_flight)
            lap("encode")
            checks.check_environment_failures(encoded.images, stats.failures(encoded.failed),
                                              {r: e for r, (_, e) in encoded.examples.items()}, max_failed_fraction)
            curation = self._curation_phase(plan, encoded, in_flight)
            if curation:
                lap("neardup")
            bucket_tokens, bucket_counts, bucket_retries = self._bucket_phase(plan, encoded, tok_meta, in_flight)
            lap("shuffle")
            manifest, shard_totals, shard_retries = self._shard_phase(bucket_tokens, bucket_counts.split_images,
                                                                      tok_meta, in_flight)
            lap("shards")
        finally:
            if started_ray:
                executor.shutdown_ray()
        total = encoded.failed + bucket_counts
        retries = encoded.retries + bucket_retries + shard_retries
        if retries:
            log.warning("storage: %s retried (%s); see storage_retries in the summary",
                        plural(sum(retries.values()), "request"), ", ".join(f"{k} {v}" for k, v in retries.items()))
        summary = stats.summarize(
            total,
            rows={s: manifest["totals"][s]["rows"] for s in SPLITS},
            shards={s: sum(1 for sh in manifest["shards"] if sh["split"] == s) for s in SPLITS},
            shard_bytes=sum(sh["bytes"] for sh in manifest["shards"]),
            padding_tokens=shard_totals["padding"], dropped_tokens=shard_totals["dropped"],
            wall_s=time.perf_counter() - start, images_this_run=images_this_run, cpus=cpus, retries=retries,
        )
        summary["task_retries"] = executor.report_task_retries()
        summary["image_size"] = self.config["codec"]["size"]
        summary["phase_seconds"] = phases
        manifest["images"] = {"total": total.images, "ok": total.ok,
                              "duplicate": total.status.get(stats.DUPLICATE, 0), "failed": stats.failures(total)}
        manifest["images"].update({s: total.status[s] for s in (stats.NEAR_DUPLICATE, stats.EXCLUDED)
                                   if total.status.get(s)})  # present when there are some
        for key, value in curation_report(self.config, curation, total).items():
            manifest[key] = summary[key] = value
        manifest["stats"] = {"path": "stats/", "files": plan.units + plan.buckets}
        storage.write_bytes(self.layout.summary, pretty_json(summary))
        storage.write_bytes(self.layout.manifest, pretty_json(manifest))  # last: the output is complete
        if not keep_work:
            storage.remove(self.layout.work, recursive=True)
        return summary

    # -- is OUTPUT ours, and made with this config? (read-only; _claim acts on the answer) --------------------

    def _output_state(self, overwrite: bool) -> str:
        """complete | resume | fresh | restart (a stale start with no finished work) | replace (--overwrite)."""
        chash = config_hash(self.config)
        previous = None
        if storage.exists(self.layout.manifest):
            previous = json.loads(storage.read_bytes(self.layout.manifest))
        elif storage.exists(self.layout.work_config):
            previous = json.loads(storage.read_bytes(self.layout.work_config))
        present = [e for e in storage.listdir(self.output) if not e.startswith(".")]
        if previous is not None and previous.get("config_hash") == chash:
            return "complete" if "shards" in previous else "resume"
        if previous is not None or any(e in OUR_ENTRIES for e in present):
            if overwrite:
                return "replace"
            if set(present) <= {"_work"} and set(storage.listdir(self.layout.work)) <= set(UNFINISHED_WORK_ENTRIES):
                return "restart"
            what = config_difference(previous.get("config", {}) if previous else {}, self.config)
            raise PreprocessError(f"{self.output} holds an output made with another config ({what}). Refusing to mix "
                                  "them: use another --output, or pass --overwrite to replace it")
        if present and not overwrite:
            raise PreprocessError(f"{self.output} is not empty and is not a jpeglm preprocess output "
                                  f"(it holds {', '.join(present[:5])}); choose an empty or new --output")
        return "fresh"

    def _claim(self, state: str) -> None:
        if state == "resume":
            log.info("resuming the unfinished job in %s", self.output)
            return
        if state == "replace":
            log.warning("--overwrite: removing the previous output in %s", self.output)
            for entry in OUR_ENTRIES:
                storage.remove(self.layout.path(entry), recursive=True)
        elif state == "restart":
            log.info("%s holds no finished work (a run with another config stopped before any unit finished): "
                     "starting over", self.output)
            storage.remove(self.layout.work, recursive=True)
        storage.write_bytes(self.layout.work_config,
                            pretty_json({"config": self.config, "config_hash": config_hash(self.config)}))

    # -- phases -------------------------------------------------------------------------------------------------

    def _tokenizer_phase(self, plan: Plan, in_flight: int) -> tuple[str, dict]:
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
        size = self.config["codec"]["size"]
        chosen, take = bpe_sample_plan(plan.unit_sizes, self.config["bpe_sample"])
        t0 = time.perf_counter()
        # a sampled unit's reader holds what an encode task's does (a Parquet column of image bytes: the unit's)
        sample_task = executor.remote(bpe_sample_task, sample_memory(take, size) + plan.source_bytes)
        got = executor.run_bounded(
            ((i, lambda i=i: sample_task.remote(self.output, i, take, self.config)) for i in chosen),
            in_flight, len(chosen), "BPE sample (units)")
        n = sum(count for _, count in got)
        if n == 0:
            raise PreprocessError("no image of the BPE sample could be canonicalized: check the inputs "
                                  "(see OUTPUT/stats after an encode, or pass --tokenizer)")
        fit = executor.remote(fit_tokenizer_task, fit_memory(n, size))
        [(_, meta)] = executor.run_bounded([(0, lambda: fit.remote(self.output, chosen, self.config["vocab_size"]))],
                                           1, 1, "BPE fit")
        log.info("tokenizer: fitted on %s from %s in %.1f s (fingerprint %s)", plural(n, "image"),
                 plural(len(chosen), "unit"), time.perf_counter() - t0, meta["fingerprint"][:12])
        return meta["fingerprint"], meta

    def _encode_phase(self, plan: Plan, fingerprint: str, in_flight: int) -> tuple[EncodeTotals, int]:
        """Encode every unit not done before; returns the totals and the images encoded by this run."""
        totals = EncodeTotals()
        results = ResultLog(self.layout.encoded_done, plan.units,
                            keep=lambda r: {k: v for k, v in r.items() if k != "bucket_offsets"},
                            on_chunk=lambda first, records: write_bucket_index(self.layout, first, records))
        for i, record in results.load():
            totals.add(i, record)
        todo = results.todo()
        if len(todo) < plan.units:
            log.info("encode: %s of %s done before; %d to go", plural(plan.units - len(todo), "unit"),
                     f"{plan.units:,}", len(todo))
        size = self.config["codec"]["size"]
        encode = executor.remote(encode_unit_task,
                                 max(encode_memory(n, size, plan.source_bytes) for n in plan.unit_sizes or [0]))
        images_this_run = 0
        for i, record in executor.run_bounded(
                ((i, lambda i=i: encode.remote(self.output, i, self.config, fingerprint, plan.buckets)) for i in todo),
                in_flight, len(todo), "encode (units)"):
            results.add(i, record)
            totals.add(i, record)
            images_this_run += record["images"]
        return totals, images_this_run

    def _curation_phase(self, plan: Plan, encoded: EncodeTotals, in_flight: int) -> dict:
        """--exclude and --dedup near (exclude.py, neardup.py); {} when neither is asked for."""
        if not near_active(self.config):
            return {}
        excluded = exclude_phase(self.layout, self.config, in_flight) if self.config.get("exclude") else None
        groups = near_phase(self.layout, self.config, plan.units, encoded.ok, excluded["units"] if excluded else 0,
                            in_flight)
        return {"groups": groups, "exclude": excluded}

    def _bucket_phase(self, plan: Plan, encoded: EncodeTotals, tok_meta: dict,
                      in_flight: int) -> tuple[np.ndarray, stats.Counts, Counter]:
        """Shuffle and dedup every bucket not done before; returns each bucket's stream tokens by split
        (R x 2), the buckets' counts summed, and their storage retries."""
        tokens = np.zeros((plan.buckets, len(SPLITS)), dtype=np.int64)
        totals = {"counts": stats.Counts(), "retries": Counter()}

        def add(b: int, record: dict) -> None:
            counts = stats.Counts.from_json(record["counts"])
            tokens[b] = [counts.split_tokens.get(s, 0) for s in SPLITS]
            totals["counts"] = totals["counts"] + counts
            add_retries(totals["retries"], record)

        results = ResultLog(self.layout.buckets_done, plan.buckets)
        for b, record in results.load():
            add(b, record)
        todo = results.todo()
        # A pass holds about --images-per-bucket images, measured in the encoded bytes of the average image.
        per_image = encoded.encoded_bytes / max(1, encoded.ok)
        pass_bytes = max(2**20, int(PASS_HEADROOM * self.config["images_per_bucket"] * per_image))
        shuffle = executor.remote(shuffle_bucket_task, bucket_memory(pass_bytes))
        for b, record in executor.run_bounded(
                ((b, lambda b=b: shuffle.remote(self.output, b, plan.buckets, plan.units, RESULT_CHUNK, self.config,
                                                tok_meta["bos_id"], tok_meta["eos_id"], pass_bytes)) for b in todo),
                in_flight, len(todo), "shuffle (buckets)"):
            results.add(b, record)
            add(b, record)
        return tokens, totals["counts"], totals["retries"]

    def _shard_phase(self, bucket_tokens: np.ndarray, split_images: dict, tok_meta: dict,
                     in_flight: int) -> tuple[dict, dict, Counter]:
        """Write every shard not written before; returns the manifest (without its image counts), the padding and
        dropped tokens, and the shard tasks' storage retries."""
        seq_len = self.config["seq_len"]
        rows_per_shard = max(1, self.config["shard_size"] // estimated_row_bytes(seq_len))
        specs, totals = [], {}
        padding_all = dropped_all = 0
        for k, split in enumerate(SPLITS):
            split_specs, rows, padding, dropped = plan_shards(
                split, [(b, int(n)) for b, n in enumerate(bucket_tokens[:, k])], seq_len, rows_per_shard,
                self.config["last_row"])
            specs += split_specs
            totals[split] = {"images": split_images.get(split, 0), "rows": rows, "tokens": rows * seq_len, "padding_tokens": padding,
                             "dropped_tokens": dropped}
            padding_all += padding
            dropped_all += dropped
        entries: dict[int, dict] = {}
        retries: Counter = Counter()
        results = ResultLog(self.layout.shards_done, len(specs))
        for i, record in results.load():
            entries[i] = record["entry"]
            add_retries(retries, record)
        todo = results.todo()
        write = executor.remote(write_shard_task, shard_memory(self.config["shard_size"]))
        for i, record in executor.run_bounded(
                ((i, lambda i=i: write.remote(self.output, i, specs[i], seq_len, tok_meta["eos_id"])) for i in todo),
                in_flight, len(todo), "shards"):
            results.add(i, record)
            entries[i] = record["entry"]
            add_retries(retries, record)
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
            "shards": [entries[i] for i in range(len(specs))],
            "totals": totals,
        }
        return manifest, {"padding": padding_all, "dropped": dropped_all}, retries
