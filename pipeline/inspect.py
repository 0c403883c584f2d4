"""`jpeglm inspect OUTPUT`: what a preprocess output holds, and any image back as the JPEG the model will see.

    jpeglm inspect out/preprocess                       # manifest + summary
    jpeglm inspect out/preprocess --list 5              # the first 5 images (id, status, split, tokens)
    jpeglm inspect out/preprocess --failed 20           # images that were not packed, and why
    jpeglm inspect out/preprocess --dump img-000007.jpg --out seen.jpg
    jpeglm inspect out/preprocess --verify              # re-hash every shard against the manifest

--dump finds the image's position from the per-image stats (the buckets' rows are in the token stream's order),
reads only the rows holding it from the shards (one ranged read per shard through its row index; an output of
manifest format 1, without row indexes, is streamed from the shard's start), decodes the tokens and splices the
JPEG tables back (codec.assemble).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from typing import Iterator

import numpy as np

from jpeglm.errors import UserError
from pipeline import storage


class InspectError(UserError):
    pass


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="a jpeglm preprocess output folder (local path or s3://...)")
    parser.add_argument("--list", type=int, default=0, metavar="N", help="print the first N images (all statuses)")
    parser.add_argument("--failed", type=int, default=0, metavar="N", help="print up to N images that failed, and why")
    parser.add_argument("--dump", default=None, metavar="ID",
                        help="an image id (see --list): decode its tokens from the shards and write it as a JPEG")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="where --dump writes the JPEG (default: the id's base name + .jpg, in the current folder)")
    parser.add_argument("--verify", action="store_true",
                        help="check every shard's size and sha256 against the manifest")


def run(args: argparse.Namespace) -> int:
    """InspectError (a UserError) reaches jpeglm.cli, which prints `jpeglm inspect: error: ...` and exits 2."""
    out = Output(args.output)
    print(out.describe())
    if args.list:
        _print_images(out.images(limit=args.list))
    if args.failed:
        _print_images(out.images(limit=args.failed, failed_only=True), empty="no failed images")
    if args.verify:
        bad = out.verify()
        from pipeline.stats import plural

        shards = len(out.manifest["shards"])
        print(f"\nverify: {shards - len(bad):,} of {plural(shards, 'shard')} match")
        for line in bad:
            print(f"  MISMATCH {line}")
        if bad:
            return 1
    if args.dump is not None:
        path = args.out or _default_name(args.dump)
        jpeg, info = out.dump(args.dump)
        with open(path, "wb") as f:
            f.write(jpeg)
        print(f"\nwrote {path}: {info['id']} ({info['size']}x{info['size']} pixels, {info['split']}, "
              f"{info['tokens']} tokens, {info['jpeg_bytes']} body bytes -> {len(jpeg)} JPEG bytes; rows "
              f"{info['rows'][0]}..{info['rows'][-1]})")
    return 0


def _default_name(image_id: str) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", image_id.rsplit("/", 1)[-1]).strip("._") or "image"
    return os.path.splitext(base)[0] + ".jpg"


def _print_images(rows: list[dict], empty: str = "no images") -> None:
    print()
    if not rows:
        print(empty)
        return
    for r in rows:
        extra = f"{r['split']:<10} {r['tokens']:>6} tokens" if r["status"] == "ok" else r["message"]
        print(f"{r['status']:<12} {r['id']}  {extra}")


class Output:
    """A finished preprocess output: manifest.json, summary.json, stats/, shards/."""

    def __init__(self, uri: str):
        from pipeline.manifest import read_manifest

        self.uri = uri.rstrip("/")
        self.manifest = read_manifest(self.uri)
        summary_uri = storage.join(self.uri, "summary.json")
        self.summary = json.loads(storage.read_bytes(summary_uri)) if storage.exists(summary_uri) else None

    def describe(self) -> str:
        from pipeline.stats import format_summary, plural

        m = self.manifest
        tok = m["tokenizer"]
        lines = [
            f"{self.uri}: {m['format']} v{m['format_version']}, seq_len {m['seq_len']}, tokens {m['token_dtype']}",
            f"tokenizer: {tok['path']} vocab {tok['vocab_size']}, bos {tok['bos_id']}, eos {tok['eos_id']}, "
            f"fingerprint {tok['fingerprint'][:12]}",
            f"codec: {m['codec']['size']}x{m['codec']['size']} q{m['codec']['quality']} {m['codec']['subsampling']}, "
            f"RST every {m['codec']['restart_interval_mcus']} MCU; last row: {m['last_row_policy']}",
        ]
        for split, t in m["totals"].items():
            shards = [s for s in m["shards"] if s["split"] == split]
            lines.append(f"{split}: {plural(t['images'], 'image')}, {plural(t['rows'], 'row')}, "
                         f"{plural(len(shards), 'shard')} "
                         f"({sum(s['bytes'] for s in shards) / 1e6:,.1f} MB), padding {t['padding_tokens']:,} tokens, "
                         f"dropped {t['dropped_tokens']:,}")
        if self.summary:
            lines += ["", format_summary(self.summary)]
        return "\n".join(lines)

    def stats_files(self) -> list[str]:
        """Buckets in bucket order (their ok rows are the stream order), then units (failed images only); numeric
        order: bucket-1000000 comes after bucket-999999."""
        names = [n for n in storage.listdir(storage.join(self.uri, "stats"))
                 if re.fullmatch(r"(bucket|unit)-\d+\.parquet", n)]
        names.sort(key=lambda n: (n.startswith("unit"), int(n.split("-")[1].split(".")[0])))
        return [storage.join(self.uri, "stats", n) for n in names]

    def _stats_rows(self) -> Iterator[dict]:
        from pipeline import stats

        for uri in self.stats_files():  # bucket order = stream order
            yield from stats.read(uri).to_pylist()

    def images(self, limit: int, failed_only: bool = False) -> list[dict]:
        out = []
        for r in self._stats_rows():
            if failed_only and r["status"] == "ok":
                continue
            out.append(r)
            if len(out) >= limit:
                break
        return out

    def verify(self) -> list[str]:
        bad = []
        for s in self.manifest["shards"]:
            h, size = hashlib.sha256(), 0
            with storage.open_read(storage.join(self.uri, s["path"])) as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    size += len(chunk)
            if size != s["bytes"] or h.hexdigest() != s["sha256"]:
                bad.append(f"{s['path']}: {size} bytes, sha256 {h.hexdigest()[:16]}")
        return bad

    def stats_batches(self, columns: list[str], batch_rows: int = 65_536) -> Iterator:
        """The stats as Arrow record batches of at most batch_rows rows, file by file in stats_files() order, with
        those of `columns` each file has (files of an older or newer jpeglm may lack or add columns): memory is one
        batch, whatever the number of images."""
        import pyarrow.parquet as pq

        for uri in self.stats_files():
            with storage.open_read(uri) as f:
                pf = pq.ParquetFile(f)
                present = [c for c in columns if c in pf.schema_arrow.names]
                yield from pf.iter_batches(batch_size=batch_rows, columns=present)

    def locate(self, image_id: str) -> tuple[dict, int]:
        """(its stats row, offset of its BOS in its split's token stream)."""
        found = self.locate_many([image_id])
        if image_id not in found:
            raise InspectError(f"no image {image_id!r} in {self.uri}/stats (see --list)")
        rec, offset = found[image_id]
        if rec["status"] != "ok":
            raise InspectError(f"{image_id} is not in the shards: {rec['status']} ({rec['message']})")
        return rec, offset

    def locate_many(self, image_ids: list[str]) -> dict[str, tuple[dict, int]]:
        """{id: (its stats row, offset of its BOS in its split's stream)} for those of image_ids in the stats (the
        offset is meaningful for ok images only), in one columnar pass that stops when all are found."""
        import pyarrow as pa
        import pyarrow.compute as pc

        wanted = pa.array(sorted(set(image_ids)), pa.string())
        found: dict[str, tuple[dict, int]] = {}
        offsets: dict[str, int] = {}
        for batch in self.stats_batches(["id", "status", "message", "split", "tokens", "jpeg_bytes"]):
            ok = pc.equal(batch.column("status"), "ok").to_numpy(zero_copy_only=False)
            split = batch.column("split").to_numpy(zero_copy_only=False)
            size = np.where(ok, batch.column("tokens").fill_null(0).to_numpy(zero_copy_only=False) + 2, 0)
            hits = np.flatnonzero(pc.is_in(batch.column("id"), value_set=wanted).to_numpy(zero_copy_only=False))
            for name in set(split[ok]):
                in_split = np.where(split == name, size, 0)
                before = offsets.get(name, 0) + np.cumsum(in_split) - in_split
                for i in hits[split[hits] == name]:
                    found[batch.column("id")[i].as_py()] = (batch.slice(i, 1).to_pylist()[0], int(before[i]))
                offsets[name] = offsets.get(name, 0) + int(in_split.sum())
            for i in hits[~ok[hits]]:
                found[batch.column("id")[i].as_py()] = (batch.slice(i, 1).to_pylist()[0], 0)
            if len(found) == len(wanted):
                break
        return found

    def dump(self, image_id: str, located: tuple[dict, int] | None = None) -> tuple[bytes, dict]:
        """The image's JPEG file as decoded from the shards, and where it was found; `located`: what locate (or
        locate_many) gave for it, if known."""
        from pipeline import codec, packing
        from pipeline.tokenizer import Tokenizer

        rec, offset = located or self.locate(image_id)
        if rec["status"] != "ok":
            raise InspectError(f"{image_id} is not in the shards: {rec['status']} ({rec['message']})")
        seq_len = self.manifest["seq_len"]
        first_row, last_row = offset // seq_len, (offset + rec["tokens"] + 1) // seq_len
        rows = []
        for s in self.manifest["shards"]:
            if s["split"] != rec["split"] or s["first_row"] + s["rows"] <= first_row or s["first_row"] > last_row:
                continue
            rows += [(tokens, meta["images"]) for _, tokens, meta in self._read_rows(s, first_row, last_row)]
        ids = packing.image_tokens(rows, image_id)
        if ids is None:
            raise InspectError(f"{image_id} is listed as ok but is not in rows {first_row}..{last_row} "
                               "(damaged output?)")
        tok = Tokenizer.load(storage.join(self.uri, self.manifest["tokenizer"]["path"]))
        body = tok.decode(np.asarray(ids).tolist())
        jpeg = codec.assemble(body, self.manifest["codec"]["quality"])
        return jpeg, {"id": image_id, "split": rec["split"], "tokens": len(ids), "jpeg_bytes": len(body),
                      "size": self.manifest["codec"]["size"], "rows": list(range(first_row, last_row + 1))}

    def _read_rows(self, shard: dict, first_row: int, last_row: int) -> list[tuple[str, np.ndarray, dict]]:
        """The samples of split rows first_row..last_row held by this shard: with its row index (format 2), one
        ranged read of just those rows; without (format 1), the shard streamed from its start to the last one."""
        from pipeline import shards

        uri = storage.join(self.uri, shard["path"])
        a = max(first_row, shard["first_row"]) - shard["first_row"]
        b = min(last_row + 1, shard["first_row"] + shard["rows"]) - shard["first_row"]
        if shard.get("index"):
            offsets = shards.read_index(storage.join(self.uri, shard["index"]), shard["rows"])
            return shards.read_row_range(uri, offsets, shard["split"], shard["first_row"], a, b)
        out = []
        for sample in shards.read_samples(uri):
            if first_row <= sample[2]["row"] <= last_row:
                out.append(sample)
            if sample[2]["row"] >= last_row:
                break
        return out
