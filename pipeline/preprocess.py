"""`jpeglm preprocess`: images -> canonical JPEG -> BPE tokens -> packed WebDataset shards, on Ray.

    jpeglm preprocess --input data/sample-images --output out/preprocess --shard-size 4MB

Phases (each resumable; formats in schemas/README.md):
1. plan: stream the input listing into work units, written as OUTPUT/_work/units/NNNNNN.json while listing (the
   driver never holds all names); `_work/plan.json` marks the plan done.
2. tokenizer: canonicalize a deterministic sample of --bpe-sample images spread over all units (Ray tasks writing
   the bodies to `_work/bpe/`), fit SentencePiece BPE in one task -> OUTPUT/tokenizer.model + tokenizer.json.
   Skipped with --tokenizer (the model is copied).
3. encode: one Ray task per unit, at most --max-in-flight at once (backpressure): read, canonicalize, tokenize,
   append BOS+tokens+EOS of each image to its split's stream (`_work/encoded/NNNNNN/{train,validation}.u16`),
   write the unit's per-image stats (OUTPUT/stats/unit-NNNNNN.parquet), then its done-marker.
4. shards: the concatenation of the units' streams (in unit order) is each split's token stream, cut into rows of
   seq_len; one Ray task per output shard reads the stream slices it needs and writes its tar atomically.
   Nothing is dropped: only each split's very last row can be partial (padded with EOS, or dropped: --last-row).
5. manifest.json (written last; its presence means the output is complete) and summary.json; `_work/` is removed.

Every task's output depends only on the inputs and the config, so the number of workers, retries, crashes and
reruns cannot change a byte of the shards or the manifest. Ray only schedules: the stages are plain functions
(sources, codec, tokenizer, packing, shards) and no image data passes through Ray's object store.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import os
import re
import struct
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from jpeglm.errors import UserError
from pipeline import storage
from pipeline.shards import MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION

log = logging.getLogger("pipeline.preprocess")

SPLITS = ("train", "validation")
TASK_RETRIES = 3  # per task: worker death and exceptions (e.g. an S3 outage that outlived storage.retry)
SAMPLE_MIN_PER_UNIT = 16  # the BPE sample takes at least this many images from each unit it visits
# Test hook, off unless set: "PHASE:INDEX:ACTION[,...]" makes the first attempt of that task exit the worker process
# (ACTION "exit") or hang (ACTION "hang"), to prove retries and resume. PHASE:INDEX is bpe:N or encode:N (unit N)
# or shard:NAME (e.g. shard:train-000001, which dies halfway through writing that tar).
FAULT_ENV = "JPEGLM_PREPROCESS_FAULT"
OUR_ENTRIES = ("manifest.json", "summary.json", "tokenizer.model", "tokenizer.json", "shards", "stats", "_work")

DEFAULTS = dict(bpe_sample=10_000, vocab_size=320, seq_len=12_288, images_per_unit=1000, shard_size="1GB",
                val_fraction=0.01, min_side=0, last_row="pad", image_size=256)


class PreprocessError(UserError):
    """A refused configuration or output: the message says what to do."""


# ---------------------------------------------------------------------------------------------------------------
# CLI


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str) -> int:
    """'4MB' -> 4,000,000; '1GiB' -> 2**30; '512' -> 512 bytes (KB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4MB, 1GB, 512MiB, 1000000)")
    unit = (m.group(2) or "").lower().rstrip("b")
    value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _image_size(text: str) -> int:
    v = int(text)
    if v < 16 or v % 16:
        raise argparse.ArgumentTypeError(f"must be a positive multiple of 16 (the 4:2:0 MCU is 16x16 pixels), got {v}")
    return v


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def configure_parser(parser: argparse.ArgumentParser) -> None:
    io_ = parser.add_argument_group("inputs and output (local paths or s3://bucket/prefix; S3 endpoint and "
                                    "credentials from the AWS environment, e.g. AWS_ENDPOINT_URL)")
    io_.add_argument("--input", action="append", required=True, metavar="URI",
                     help="a folder/prefix (walked recursively) or a file: image files, WebDataset/img2dataset tars, "
                          "or Parquet files with an image column; repeat for several inputs")
    io_.add_argument("--output", required=True, metavar="URI",
                     help="output folder: manifest.json, tokenizer.model, shards/, stats/, summary.json")
    io_.add_argument("--image-column", default=None, metavar="NAME",
                     help="Parquet column holding the images: a {bytes, path} struct, binary, or paths/URLs "
                          "(default: a Hugging Face image struct, else a column named image/jpg/png/..., "
                          "else path/url)")
    io_.add_argument("--overwrite", action="store_true",
                     help="replace an existing output made with another config or tokenizer (default: refuse)")
    io_.add_argument("--keep-work", action="store_true",
                     help="keep OUTPUT/_work (work units, per-unit token streams) after success")

    tok = parser.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", default=None, metavar="PATH",
                     help="reuse this SentencePiece tokenizer.model (local or s3://) instead of fitting one")
    tok.add_argument("--bpe-sample", type=_positive_int, default=DEFAULTS["bpe_sample"], metavar="N",
                     help="images to fit the BPE tokenizer on, drawn deterministically across all inputs "
                          "(default: %(default)s, as in the paper)")
    tok.add_argument("--vocab-size", type=_positive_int, default=DEFAULTS["vocab_size"], metavar="N",
                     help="BPE vocabulary size (default: %(default)s, as in the paper)")

    pack = parser.add_argument_group("packing and shards")
    pack.add_argument("--seq-len", type=_positive_int, default=DEFAULTS["seq_len"], metavar="N",
                      help="tokens per row, the training sequence length (default: %(default)s, as in the paper)")
    pack.add_argument("--shard-size", type=parse_size, default=DEFAULTS["shard_size"], metavar="SIZE",
                      help="target size of each tar shard: 4MB, 512MiB, 1GB or plain bytes (default: %(default)s)")
    pack.add_argument("--val-fraction", type=_fraction, default=DEFAULTS["val_fraction"], metavar="F",
                      help="fraction of images in the validation split, chosen by a hash of the image id, so "
                           "stable across reruns (default: %(default)s)")
    pack.add_argument("--last-row", choices=("pad", "drop"), default=DEFAULTS["last_row"],
                      help="each split's last partial row: pad it with EOS (masked by valid_tokens) or drop it "
                           "(default: %(default)s)")

    img = parser.add_argument_group("images")
    img.add_argument("--image-size", type=_image_size, default=DEFAULTS["image_size"], metavar="PX",
                     help="side of the canonical square JPEG, a multiple of 16 (one 4:2:0 MCU) (default: "
                          "%(default)s, as in the paper)")
    img.add_argument("--min-side", type=int, default=DEFAULTS["min_side"], metavar="PX",
                     help="count as too_small (and skip) images whose shorter side is below PX pixels "
                          "(default: %(default)s, keep all)")
    img.add_argument("--max-pixels", type=_positive_int, default=None, metavar="N",
                     help="count as too_large (and skip) images with more than N pixels (default: 8192x8192)")

    ray_ = parser.add_argument_group("Ray")
    ray_.add_argument("--address", default=None,
                      help="Ray cluster to run on (RAY_ADDRESS also works; default: start a local Ray)")
    ray_.add_argument("--num-cpus", type=_positive_int, default=None, metavar="N",
                      help="CPUs of the local Ray started here (default: all cores; ignored with --address)")
    ray_.add_argument("--images-per-unit", type=_positive_int, default=DEFAULTS["images_per_unit"], metavar="N",
                      help="images per work unit, one Ray task and the unit of resume; each tar input is one unit "
                           "(default: %(default)s)")
    ray_.add_argument("--max-in-flight", type=_positive_int, default=None, metavar="N",
                      help="most tasks submitted at once, for backpressure (default: 2 x the cluster's CPUs)")


def run(args: argparse.Namespace) -> int:
    _setup_logging()
    try:
        job = Job.from_args(args)
        summary = job.run(address=args.address, num_cpus=args.num_cpus, max_in_flight=args.max_in_flight,
                          overwrite=args.overwrite, keep_work=args.keep_work)
    except PreprocessError as e:
        print(f"jpeglm preprocess: error: {e}", file=sys.stderr)
        return 2
    from pipeline.stats import format_summary

    print(format_summary(summary))
    print(f"\noutput: {job.output}\n  see it with: jpeglm inspect {job.output}")
    if summary.get("images_ok") == 0:
        print("jpeglm preprocess: error: no image could be used (see the failures with: "
              f"jpeglm inspect {job.output} --failed 20)", file=sys.stderr)
        return 1
    return 0


def _setup_logging() -> None:
    # Our progress at INFO; libraries (botocore, s3fs, Ray) only at WARNING.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pipeline").setLevel(logging.INFO)


# ---------------------------------------------------------------------------------------------------------------
# config and output layout


def config_from_args(args: argparse.Namespace) -> dict:
    """Everything that determines the output's bytes (and nothing else: not --num-cpus, --address, ...)."""
    from pipeline import codec, sources

    try:
        inputs = [i.uri for i in sources.resolve_inputs(args.input)]
    except sources.InputError as e:
        raise PreprocessError(str(e)) from None
    missing = [u for u in inputs if not storage.exists(u)]
    if missing:
        raise PreprocessError(f"input {missing[0]} does not exist")
    from pipeline.tokenizer import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE

    if args.tokenizer is None and not MIN_VOCAB_SIZE <= args.vocab_size <= MAX_VOCAB_SIZE:
        raise PreprocessError(f"--vocab-size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] (256 bytes + <unk>, <s>, "
                              f"</s>; uint16 token ids), got {args.vocab_size}")
    if args.min_side < 0:
        raise PreprocessError(f"--min-side must be >= 0, got {args.min_side}")
    if args.seq_len < 2:
        raise PreprocessError("--seq-len must be >= 2")
    return {
        "inputs": inputs,
        "image_column": args.image_column,
        "tokenizer": None,  # filled in with the given tokenizer's fingerprint (None: fitted here)
        "bpe_sample": args.bpe_sample,
        "vocab_size": args.vocab_size,
        "seq_len": args.seq_len,
        "images_per_unit": args.images_per_unit,
        "shard_size": args.shard_size,
        "val_fraction": args.val_fraction,
        "last_row": args.last_row,
        "min_side": args.min_side,
        "max_pixels": args.max_pixels or codec.DEFAULT_MAX_PIXELS,
        "codec": codec_params(args.image_size),
    }


def codec_params(size: int | None = None) -> dict:
    from pipeline import codec

    return {"size": size or codec.SIZE, "quality": codec.QUALITY, "subsampling": "4:2:0", "restart_interval_mcus": 1}


def config_hash(config: dict) -> str:
    return hashlib.sha256(_canonical_json(config)).hexdigest()


def _canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _pretty_json(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


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


def _maybe_fault(layout: Layout, phase: str, index: int | str) -> None:
    """The FAULT_ENV test hook (see its comment); a no-op unless that variable names this very task."""
    specs = [s for s in os.environ.get(FAULT_ENV, "").split(",") if s.startswith(f"{phase}:{index}:")]
    if not specs:
        return
    marker = layout.fault_marker(phase, index)
    if storage.exists(marker):
        return  # the retry (or the rerun) proceeds normally
    storage.write_bytes(marker, b"")
    if specs[0].endswith(":hang"):
        time.sleep(3600)
    os._exit(17)


def split_of(image_id: str, val_fraction: float) -> str:
    """validation iff the first 8 bytes of sha256(id), as a fraction of 2**64, fall below val_fraction."""
    h = int.from_bytes(hashlib.sha256(image_id.encode()).digest()[:8], "big")
    return "validation" if h < val_fraction * 2**64 else "train"


# ---------------------------------------------------------------------------------------------------------------
# tasks: plain functions over OUTPUT (Ray runs them; tests may call them directly)

_TOKENIZERS: dict = {}


def _tokenizer(layout: Layout, fingerprint: str):
    """The output's tokenizer, loaded once per worker process (keyed by fingerprint: workers outlive jobs)."""
    from pipeline.tokenizer import Tokenizer

    tok = _TOKENIZERS.get(fingerprint)
    if tok is None:
        tok = Tokenizer.load(layout.tokenizer_model)
        if tok.fingerprint != fingerprint:
            raise RuntimeError(f"{layout.tokenizer_model} changed during the job (fingerprint {tok.fingerprint[:12]}, "
                               f"expected {fingerprint[:12]})")
        _TOKENIZERS[fingerprint] = tok
    return tok


def _canonicalize(data: bytes, config: dict):
    from pipeline import codec

    c = config["codec"]
    return codec.canonicalize_with_info(data, c["size"], c["quality"], max_pixels=config["max_pixels"],
                                        min_side=config["min_side"])


def sample_positions(n: int | None, take: int) -> set[int] | int:
    """Which images of a unit go into the BPE sample: `take` evenly spaced positions when the unit's size n is
    known, else (a tar) the first `take` images (returned as an int limit)."""
    if n is None:
        return take
    if take >= n:
        return set(range(n))
    return {i * n // take for i in range(take)}


def bpe_sample_task(output: str, index: int, take: int, config: dict) -> int:
    """Canonicalize this unit's share of the BPE sample into _work/bpe/NNNNNN.bin; returns how many bodies."""
    from pipeline import codec, sources

    layout = Layout(output)
    _maybe_fault(layout, "bpe", index)
    unit = json.loads(storage.read_bytes(layout.unit(index)))
    chosen = sample_positions(unit_size(unit), take)
    if unit["kind"] == "files":  # read only the chosen files
        unit = {**unit, "entries": [e for i, e in enumerate(unit["entries"]) if i in chosen]}
        chosen = len(unit["entries"])
    out = io.BytesIO()
    count = 0
    for pos, src in enumerate(sources.read_unit(unit)):
        if isinstance(chosen, int) and pos >= chosen:
            break
        if src.data is None or (isinstance(chosen, set) and pos not in chosen):
            continue
        try:
            body = _canonicalize(src.data, config).body
        except codec.CodecError:
            continue  # bad images are counted by the encode phase; the sample just has one less
        out.write(struct.pack("<I", len(body)))
        out.write(body)
        count += 1
    storage.write_bytes(layout.bpe_bodies(index), out.getvalue())
    return count


def _read_bodies(data: bytes) -> Iterator[bytes]:
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        yield data[pos + 4 : pos + 4 + n]
        pos += 4 + n


def fit_tokenizer_task(output: str, unit_indices: list[int], vocab_size: int) -> dict:
    """Fit BPE on the sample bodies (in unit order) and write tokenizer.model + tokenizer.json."""
    from pipeline.tokenizer import Tokenizer

    layout = Layout(output)
    counted = {"images": 0}

    def bodies() -> Iterator[bytes]:
        for i in unit_indices:
            for body in _read_bodies(storage.read_bytes(layout.bpe_bodies(i))):
                counted["images"] += 1
                yield body

    tok = Tokenizer.train(bodies(), vocab_size=vocab_size)
    tok.save(layout.tokenizer_model)
    meta = {**tok.metadata(), "source": "fitted", "sample_images": counted["images"], "sample_units": len(unit_indices)}
    storage.write_bytes(layout.tokenizer_json, _pretty_json(meta))
    return meta


def unit_size(unit: dict) -> int | None:
    if unit["kind"] == "files":
        return len(unit["entries"])
    if unit["kind"] == "parquet":
        return unit["rows"][1] - unit["rows"][0]
    return None  # a tar: known once read


def encode_unit_task(output: str, index: int, config: dict, fingerprint: str) -> dict:
    """Read, canonicalize and tokenize one unit; write its split streams, its stats, then its done-marker.
    Returns the done-marker's content (counts only)."""
    from pipeline import codec, sources, stats
    from pipeline.packing import TOKEN_DTYPE, image_sequence

    layout = Layout(output)
    _maybe_fault(layout, "encode", index)
    start = time.perf_counter()
    unit = json.loads(storage.read_bytes(layout.unit(index)))
    tok = _tokenizer(layout, fingerprint)
    records: list[stats.ImageStat] = []
    ok: list[tuple[stats.ImageStat, bytes]] = []
    for src in sources.read_unit(unit):
        rec = stats.ImageStat(id=src.id, source=src.source, status=stats.READ_ERROR, message=src.error)
        records.append(rec)
        if src.data is None:
            continue
        rec.source_bytes = len(src.data)
        try:
            img = _canonicalize(src.data, config)
        except codec.CodecError as e:
            rec.status, rec.message = e.reason, e.message
            continue
        except Exception as e:  # noqa: BLE001 - one image must never fail the job; the codec should not get here
            log.warning("unexpected codec failure on %s: %s: %s", src.id, type(e).__name__, e)
            rec.status, rec.message = stats.INTERNAL_ERROR, f"{type(e).__name__}: {e}"
            continue
        rec.status, rec.message = stats.OK, ""
        rec.source_format, rec.source_width, rec.source_height = img.source_format, img.source_width, img.source_height
        rec.jpeg_bytes, rec.split = len(img.body), split_of(src.id, config["val_fraction"])
        ok.append((rec, img.body))
    token_lists = tok.encode_batch([body for _, body in ok], num_threads=1) if ok else []
    streams: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for (rec, _), ids in zip(ok, token_lists):
        rec.tokens = len(ids)
        streams[rec.split].append(image_sequence(ids, tok.bos_id, tok.eos_id))
    for split in SPLITS:
        parts = streams[split]
        data = np.concatenate(parts).astype(TOKEN_DTYPE, copy=False).tobytes() if parts else b""
        storage.write_bytes(layout.stream(index, split), data)
    stats.write(layout.stats(index), records)
    counts = stats.Counts.of(records)
    done = {"unit": index, "counts": counts.to_json(), "seconds": round(time.perf_counter() - start, 3)}
    storage.write_bytes(layout.encoded_done(index), _canonical_json(done))
    return done


@dataclass(frozen=True)
class ShardSpec:
    split: str
    index: int
    first_row: int
    num_rows: int
    total_tokens: int  # valid tokens of the whole split stream
    pieces: tuple[tuple[int, int, int], ...]  # (unit, offset of the unit's stream in the split stream, its tokens)

    @property
    def name(self) -> str:
        from pipeline.shards import shard_name

        return shard_name(self.split, self.index)


def plan_shards(split: str, unit_tokens: list[tuple[int, int]], seq_len: int, rows_per_shard: int,
                last_row: str) -> tuple[list[ShardSpec], int, int, int]:
    """Cut a split's stream (the units' streams in unit order: (unit, tokens)) into shards of rows_per_shard rows.
    Returns (specs, rows, padding_tokens, dropped_tokens)."""
    from pipeline.packing import count_rows

    offsets, pos = [], 0
    for unit, n in unit_tokens:
        if n:
            offsets.append((unit, pos, n))
            pos += n
    total = pos
    rows, padding, dropped = count_rows(total, seq_len, last_row)
    specs = []
    for k, first in enumerate(range(0, rows, rows_per_shard)):
        num = min(rows_per_shard, rows - first)
        lo, hi = first * seq_len, min((first + num) * seq_len, total)
        pieces = tuple(p for p in offsets if p[1] < hi and p[1] + p[2] > lo)
        specs.append(ShardSpec(split, k, first, num, total, pieces))
    return specs, rows, padding, dropped


def estimated_row_bytes(seq_len: int) -> int:
    """Tar bytes per sample: two 512-byte headers, the .npy (128-byte header + 2 bytes/token) and the .json
    (typically well under 1 KB), each padded to 512 bytes."""
    return 512 + 512 * math.ceil((128 + 2 * seq_len) / 512) + 512 + 1024


def write_shard_task(output: str, spec: ShardSpec, seq_len: int, pad_id: int) -> dict:
    """Write one shard from the stream slices and stats of the units it covers; then its done-marker."""
    from pipeline import shards, stats
    from pipeline.packing import TOKEN_DTYPE, ImageRef, rows_in_range

    layout = Layout(output)
    lo = spec.first_row * seq_len
    hi = min((spec.first_row + spec.num_rows) * seq_len, spec.total_tokens)
    parts, images = [], []
    for unit, offset, n in spec.pieces:
        a, b = max(lo, offset) - offset, min(hi, offset + n) - offset
        with storage.open_read(layout.stream(unit, spec.split)) as f:
            f.seek(2 * a)
            chunk = f.read(2 * (b - a))
        if len(chunk) != 2 * (b - a):
            raise RuntimeError(f"unit {unit} {spec.split} stream is shorter than its done-marker says")
        parts.append(np.frombuffer(chunk, dtype=TOKEN_DTYPE))
        table = stats.read(layout.stats(unit), columns=["id", "status", "split", "tokens"]).to_pylist()
        pos = offset
        for rec in table:
            if rec["status"] == stats.OK and rec["split"] == spec.split:
                length = rec["tokens"] + 2
                if pos < hi and pos + length > lo:
                    images.append(ImageRef(rec["id"], pos, length))
                pos += length
    stream = np.concatenate(parts) if parts else np.empty(0, dtype=TOKEN_DTYPE)
    rows = rows_in_range(stream, lo, images, spec.first_row, spec.num_rows, seq_len, spec.total_tokens, pad_id)

    def rows_with_fault_hook():
        for i, row in enumerate(rows):
            if i == spec.num_rows // 2:
                _maybe_fault(layout, "shard", spec.name.removesuffix(".tar"))
            yield row

    info = shards.write_shard(layout.shard(spec.name), spec.split, rows_with_fault_hook())
    padding = spec.num_rows * seq_len - (hi - lo)
    entry = {"path": f"shards/{spec.name}", "split": spec.split, "first_row": spec.first_row, "rows": info.rows,
             "tokens": info.rows * seq_len, "padding_tokens": padding, "bytes": info.bytes, "sha256": info.sha256}
    storage.write_bytes(layout.shard_done(spec.name), _canonical_json(entry))
    return entry


# ---------------------------------------------------------------------------------------------------------------
# the job (driver)


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
        started_ray = _init_ray(address, num_cpus)
        try:
            import ray

            cpus = float(ray.cluster_resources().get("CPU", 1))
            in_flight = max_in_flight or max(2, int(2 * cpus))
            phases = {}
            t = time.perf_counter()
            units = self._plan()
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
        storage.write_bytes(self.layout.summary, _pretty_json(summary))
        storage.write_bytes(self.layout.manifest, _pretty_json(manifest))  # last: the output is complete
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
                what = _config_difference(previous.get("config", {}) if previous else {}, self.config)
                raise PreprocessError(
                    f"{self.output} holds an output made with another config ({what}). Refusing to mix them: "
                    "use another --output, or pass --overwrite to replace it")
            log.warning("--overwrite: removing the previous output in %s", self.output)
            for entry in OUR_ENTRIES:
                storage.remove(self.layout.path(entry), recursive=True)
        elif present and not overwrite:
            raise PreprocessError(f"{self.output} is not empty and is not a jpeglm preprocess output "
                                  f"(it holds {', '.join(present[:5])}); choose an empty or new --output")
        storage.write_bytes(self.layout.work_config, _pretty_json({"config": self.config, "config_hash": chash}))
        return None

    # -- phase 1: plan ----------------------------------------------------------------------------------------

    def _plan(self) -> list[int | None]:
        """Work units -> _work/units/; returns each unit's image count (None for tars). Resumed if planned."""
        from pipeline import sources

        if storage.exists(self.layout.plan):
            plan = json.loads(storage.read_bytes(self.layout.plan))
            log.info("plan: %d work units (planned before)", len(plan["unit_sizes"]))
            return plan["unit_sizes"]
        counts = sources.PlanCounts()
        sizes: list[int | None] = []
        listing = sources.plan_units(sources.resolve_inputs(self.config["inputs"]), self.config["images_per_unit"],
                                     self.config["image_column"], counts)
        t0 = time.perf_counter()
        try:
            for i, unit in enumerate(listing):
                storage.write_bytes(self.layout.unit(i), _canonical_json(unit))
                sizes.append(unit_size(unit))
        except sources.InputError as e:
            raise PreprocessError(str(e)) from None
        counts.units = len(sizes)
        log.info("plan: %d work units from %d image files, %d tars, %d Parquet files (%d rows); skipped %d other "
                 "files and %d img2dataset metadata Parquet files (%.1f s)", counts.units, counts.image_files,
                 counts.tars, counts.parquet_files, counts.parquet_rows, counts.skipped_files,
                 counts.skipped_img2dataset_parquet, time.perf_counter() - t0)
        storage.write_bytes(self.layout.plan, _canonical_json({"unit_sizes": sizes, "counts": counts.__dict__}))
        return sizes

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
            storage.write_bytes(self.layout.tokenizer_json, _pretty_json(meta))
            log.info("tokenizer: %s copied from %s", tok.fingerprint[:12], self.tokenizer_source)
            return tok.fingerprint, meta
        import ray

        chosen, take = bpe_sample_plan(unit_sizes, self.config["bpe_sample"])
        t0 = time.perf_counter()
        sample_task = _remote(bpe_sample_task)
        got = run_bounded(
            ((i, lambda i=i: sample_task.remote(self.output, i, take, self.config)) for i in chosen),
            in_flight, len(chosen), "BPE sample (units)")
        n = sum(got.values())
        if n == 0:
            raise PreprocessError("no image of the BPE sample could be canonicalized: check the inputs "
                                  "(see OUTPUT/stats after an encode, or pass --tokenizer)")
        fit = _remote(fit_tokenizer_task)
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
        encode = _remote(encode_unit_task)
        results = run_bounded(
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
        write = _remote(write_shard_task)
        entries.update(run_bounded(
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


def _config_difference(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not old:
        return "its config is unknown"
    shown = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" if k != "tokenizer" else "tokenizer fingerprint differs"
             for k in keys[:4]]
    return "differs in " + "; ".join(shown) if shown else "differs"


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


# ---------------------------------------------------------------------------------------------------------------
# Ray plumbing


def _init_ray(address: str | None, num_cpus: int | None) -> bool:
    """Connect to (or start) Ray unless this process already did; True if we started it (and must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    log.info("Ray: %s CPUs", ray.cluster_resources().get("CPU"))
    return True


def _remote(fn: Callable):
    import ray

    # retry_exceptions: a task that failed (e.g. S3 down longer than storage.retry waits) runs again; its
    # output is the same whichever attempt writes it.
    return ray.remote(num_cpus=1, max_retries=TASK_RETRIES, retry_exceptions=True)(fn)


def run_bounded(submissions: Iterable[tuple[object, Callable]], max_in_flight: int, total: int, desc: str) -> dict:
    """Run (key, submit) pairs with at most max_in_flight tasks pending, with a progress bar; {key: result}."""
    from tqdm import tqdm

    import ray

    results: dict = {}
    with tqdm(total=total, desc=desc, unit="task", disable=total == 0, file=sys.stderr, dynamic_ncols=True) as bar:
        try:
            for key, result in bounded(submissions, max_in_flight):
                results[key] = result
                bar.update(1)
        except ray.exceptions.RayError as e:
            raise PreprocessError(f"{desc}: a task failed {TASK_RETRIES + 1} times; finished work is kept, so "
                                  f"rerunning the same command resumes. Last error: {e}") from e
    return results


def bounded(submissions: Iterable[tuple[object, Callable]], max_in_flight: int) -> Iterator[tuple[object, object]]:
    """Yield (key, result) as tasks finish, calling `submit()` lazily so that at most max_in_flight tasks are
    pending at any time (backpressure: the driver never queues the whole job). Results are small (counts,
    metadata): data moves through OUTPUT, never through the object store. A task that failed all its retries
    raises here, after the pending ones are cancelled."""
    import ray

    pending: dict = {}
    it = iter(submissions)
    while True:
        while len(pending) < max_in_flight:
            nxt = next(it, None)
            if nxt is None:
                break
            key, submit = nxt
            pending[submit()] = key
        if not pending:
            return
        ready, _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except Exception:
            for ref in pending:
                ray.cancel(ref)
            raise
        yield key, result
