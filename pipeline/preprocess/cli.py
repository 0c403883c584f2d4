"""`jpeglm preprocess` command line: flags, and the command that runs a Job and prints its summary.

Exit status: 0 done (or already complete), 1 no usable image, too many environment failures, or a task failure
no retry can fix (disk full, read-only, no permission, S3 access denied: one line saying what to change; the same
command then resumes), 2 a refused flag, input or output (one line, no traceback), 130 interrupted (finished work
is kept; the same command resumes).
"""

from __future__ import annotations

import argparse
import re
import sys

from jpeglm.command import jpeglm_command
from jpeglm.logs import setup_logging
from pipeline.preprocess.config import DEDUP_MODES, DEFAULTS
from pipeline.preprocess.job import Job

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


def _non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
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
                     help="keep OUTPUT/_work (work units, encoded unit files, bucket streams) after success")

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
                      help="fraction of images in the validation split, chosen by the sha256 of the canonical "
                           "image: stable when inputs are added or renamed, and identical images share a split "
                           "(default: %(default)s)")
    pack.add_argument("--seed", type=_non_negative_int, default=DEFAULTS["seed"], metavar="N",
                      help="seed of the write-time shuffle: the packed order is sorted by sha256(seed, image "
                           "content), whatever the listing order (default: %(default)s)")
    pack.add_argument("--dedup", choices=DEDUP_MODES, default=DEFAULTS["dedup"],
                      help="exact: images with the same canonical JPEG are packed once, the others counted "
                           "'duplicate' with the kept image's id; near: also near-copies (resized, re-compressed, "
                           "slightly cropped or brightened: pHash within --near-radius bits), one kept per group "
                           "(the smallest body sha256), the others counted 'near_duplicate'; none: pack every copy "
                           "(default: %(default)s)")
    pack.add_argument("--near-radius", type=int, default=DEFAULTS["near_radius"], metavar="R",
                      help="pHash bits two images may differ in and still be near-copies (--dedup near, --exclude); "
                           "calibrated in docs/preprocess.md (default: %(default)s)")
    pack.add_argument("--exclude", action="append", default=[], metavar="URI",
                      help="images that must not be trained on, e.g. an evaluation set (folder, tar or Parquet, "
                           "local or s3://): an image that is an exact or near (--near-radius) copy of one goes into "
                           "neither split and is counted 'excluded' with its id; repeatable")
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
    img.add_argument("--max-aspect-ratio", type=float, default=DEFAULTS["max_aspect_ratio"], metavar="F",
                     help="count as bad_aspect_ratio (and skip) images whose longer side is more than F times the "
                          "shorter, measured on the source before the centre crop (img2dataset's "
                          "--max_aspect_ratio; default: keep all)")
    img.add_argument("--max-failed-fraction", type=_fraction, default=DEFAULTS["max_failed_fraction"], metavar="F",
                     help="stop before writing shards when more than this fraction of the images failed for "
                          "reasons that mean a broken environment (unsupported, read_error, internal_error); rerun "
                          "with a higher value to accept them (default: %(default)s)")
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
    ray_.add_argument("--images-per-bucket", type=_positive_int, default=DEFAULTS["images_per_bucket"], metavar="N",
                      help="images per shuffle bucket, one Ray task each; bounds its memory (~10 KB per image) "
                           "(default: %(default)s)")
    ray_.add_argument("--verbose", action="store_true",
                      help="leave Ray's own output (worker logs, raylet messages) on the terminal; by default it "
                           "goes to a log file named when something fails (JPEGLM_VERBOSE=1 does the same)")
    ray_.add_argument("--max-in-flight", type=_positive_int, default=None, metavar="N",
                      help="most tasks submitted at once, for backpressure (default: 2 x the cluster's CPUs)")


def run(args: argparse.Namespace) -> int:
    from pipeline.stats import format_summary

    setup_logging()
    job = Job.from_args(args)
    try:
        summary = job.run(address=args.address, num_cpus=args.num_cpus, max_in_flight=args.max_in_flight,
                          overwrite=args.overwrite, keep_work=args.keep_work,
                          max_failed_fraction=args.max_failed_fraction, verbose=args.verbose)
    except KeyboardInterrupt:
        print(f"\njpeglm preprocess: interrupted; finished work is kept in {job.output}: run the same command "
              "again to resume", file=sys.stderr, flush=True)
        return 130
    if job.already_complete:
        print(f"{job.output} is already complete (same config): nothing to do. Its summary:\n")
        print(format_summary(summary, this_run=False))
    else:
        print(format_summary(summary))
    jpeglm = jpeglm_command()
    print(f"\noutput: {job.output}\n  see it with: {jpeglm} inspect {job.output}")
    if summary.get("images_ok") == 0:
        print("jpeglm preprocess: error: no image could be used (see the failures with: "
              f"{jpeglm} inspect {job.output} --failed 20)", file=sys.stderr)
        return 1
    return 0
