"""`jpeglm sample`: generate images (from BOS) or complete them (from their top rows) with a trained model.

    jpeglm sample --checkpoint DIR --out OUT [--num N] [--batch B] [--temperature T] [--top-k K] [--top-p P] [--seed S]
    jpeglm sample --checkpoint DIR --out OUT --prompt a.jpg b.png --ratio 0.375 --num 4

--checkpoint is any of: an exported jpeglm folder (trainer/pretrained.py), a Hugging Face Llama folder
(trainer/hf.py; e.g. the authors' released weights), or a training run dir / DeepSpeed checkpoint
(trainer/export.py consolidates it); a local path or s3://. The image size and JPEG quality the model was trained
on come from the checkpoint (its "codec" record; 256 / 25 when it has none).

Decoding is trainer/generate.py's: batched, with a KV cache, stopping at EOS, at JPEG EOI (FF D9) or at the token
limit. Every sample is repaired (pipeline.repair) and decoded, then written as OUT/sample-NNNN.jpg and .png;
OUT/grid.png shows each prompt beside its completions, each labelled with how it ended ("complete", "cut at N
tokens", "repaired"); OUT/summary.json gives per-sample token counts, completeness and timing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field

import torch

from jpeglm.errors import UserError
from trainer.generate import EOIDetector, GenerationStats, SamplingParams, generate
from trainer.model import Transformer

log = logging.getLogger("jpeglm.sample")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class SampleError(UserError):
    """A problem with the user's inputs (checkpoint, prompt, flags): reported as a message, exit status 2."""


# ---------------------------------------------------------------------------------------------- threads


def usable_cores() -> list[int]:
    """The CPUs this process may run on (its affinity: a GPU node's launcher often pins a rank to a few cores)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def default_threads() -> int:
    """torch CPU threads when --threads is not given: the cores this process may run on minus the cores other
    processes keep busy right now (busy_cores()), at least 1. OpenMP threads wait for each other at the end of every
    operation, so a thread that shares its core with a busy process stalls all of them: with one other busy process
    on 2 cores, 2 threads decoded 3.5x slower than 1 (bench/results/sample-threads.json)."""
    cores = usable_cores()
    return max(1, min(len(cores), round(len(cores) - busy_cores(cores))))


def busy_cores(cores: list[int], interval: float = 0.25) -> float:
    """How many of `cores` other processes use now: their non-idle CPU time over `interval` seconds (Linux
    /proc/stat, the per-CPU lines of those cores only: on a pinned node the rest of the machine does not matter; we
    are idle meanwhile); elsewhere the 1-minute load average, capped at len(cores)."""
    wanted = {f"cpu{c}" for c in cores}

    def sample() -> tuple[int, int]:
        total = idle = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *values = line.split()
                if name in wanted:
                    fields = [int(v) for v in values]
                    total, idle = total + sum(fields), idle + fields[3] + fields[4]  # idle + iowait
        if total == 0:
            raise ValueError("no per-CPU lines for these cores")
        return total, idle

    try:
        t0, idle0 = sample()
        time.sleep(interval)
        t1, idle1 = sample()
        return (1 - (idle1 - idle0) / max(1, t1 - t0)) * len(cores)
    except (OSError, ValueError, IndexError):
        try:
            return min(float(len(cores)), os.getloadavg()[0])
        except OSError:
            return 0.0


def set_threads(threads: int | None) -> int:
    """Apply --threads (None: default_threads()) to torch; returns the number used."""
    n = threads or default_threads()
    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------------------------------------- checkpoints


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object  # pipeline.tokenizer.Tokenizer
    kind: str  # "jpeglm", "huggingface" or "training-run"
    source: str
    codec: dict = field(default_factory=lambda: {"size": 256, "quality": 25})  # trainer.pretrained.codec_params
    revision: str | None = None  # a training run's resolved checkpoint (a run dir's latest moves as it trains)


def read_checkpoint_config(uri: str) -> dict | None:
    """The config.json of a checkpoint folder (local or s3://), or None if it has none."""
    from pipeline import storage

    cfg_uri = storage.join(uri, "config.json")
    if not storage.exists(cfg_uri):
        return None
    return json.loads(storage.read_bytes(cfg_uri))


def require_checkpoint(uri: str) -> None:
    """SampleError unless `uri` (local or s3://) exists."""
    from pipeline import storage

    if not storage.exists(uri):
        raise SampleError(f"--checkpoint {uri}: no such folder")


def checkpoint_codec(uri: str) -> dict:
    """The codec record (image size, quality) of a checkpoint, read without loading its weights."""
    from trainer import checkpoint as ckpt, hf, pretrained

    require_checkpoint(uri)
    config = read_checkpoint_config(uri)
    if config is not None and config.get("format") == pretrained.FORMAT:
        return pretrained.codec_params(config.get("codec"))
    if config is not None and hf.is_llama_config(config):
        return pretrained.codec_params((config.get("jpeglm") or {}).get("codec"))
    if "://" in uri:
        raise SampleError(f"--checkpoint {uri}: training checkpoints are read from a filesystem path; copy it "
                          "locally first (or export it where it was trained)")
    state = ckpt.read_state(*ckpt.resolve(uri))
    return pretrained.run_codec({"codec": state.get("codec"), "data": state.get("data")})


def load_checkpoint(
    uri: str, device: torch.device, dtype: torch.dtype, tokenizer_uri: str | None = None
) -> LoadedModel:
    """Detect what `uri` holds and load model + tokenizer + codec from it (see module docstring)."""
    from pipeline import storage
    from pipeline.tokenizer import Tokenizer
    from trainer import hf, pretrained

    uri = os.fspath(uri)
    require_checkpoint(uri)
    config = read_checkpoint_config(uri)
    revision = None
    with contextlib.ExitStack() as stack:
        if config is not None and config.get("format") == pretrained.FORMAT:
            kind = "jpeglm"
            path = stack.enter_context(storage.local_folder(uri))
            model, meta = pretrained.load_pretrained(path, device=device, dtype=dtype)
            tok_path, tok_meta = os.path.join(path, "tokenizer.model"), meta.get("tokenizer") or {}
            codec = meta["codec"]
        elif config is not None and hf.is_llama_config(config):
            kind = "huggingface"
            path = stack.enter_context(storage.local_folder(uri))
            model, info = hf.load_hf_local(path, device=device, dtype=dtype)
            tok_path, tok_meta = info["tokenizer_path"], (config.get("jpeglm") or {}).get("tokenizer") or {}
            codec = info["codec"]
        else:
            kind = "training-run"
            try:
                from trainer.export import consolidate
            except ImportError as e:
                raise SampleError(f"--checkpoint {uri}: not an exported or Hugging Face folder, and training runs "
                                  f"cannot be read here ({e})") from None
            state, cfg, tok_path, meta = consolidate(uri)  # quiet: DeepSpeed's print-out only if it fails
            tok_meta, codec = meta.get("tokenizer") or {}, pretrained.run_codec(meta)
            revision = f"{os.path.basename(os.path.normpath(meta['checkpoint']))} (step {meta['step']})"
            with torch.device("meta"):
                model = Transformer(cfg)
            model.load_state_dict(state, strict=True, assign=True)
        log.info("checkpoint %s: %s, %.1fM parameters, %dx%d images at quality %d", uri,
                 {"jpeglm": "exported jpeglm folder", "huggingface": "Hugging Face Llama folder",
                  "training-run": "training run (DeepSpeed checkpoint, consolidated)"}[kind],
                 sum(p.numel() for p in model.parameters()) / 1e6, codec["size"], codec["size"], codec["quality"])
        tok_path = tokenizer_uri or tok_path
        if not tok_path:
            raise SampleError(f"{uri}: no tokenizer.model found; pass --tokenizer PATH")
        tokenizer = Tokenizer.load(tok_path)  # read into memory: the temporary copy may go now
    expected = tok_meta.get("fingerprint")
    if expected and expected != tokenizer.fingerprint:
        log.warning("tokenizer %s is not the one the model was trained with (fingerprint %s, expected %s): "
                    "samples will be garbage unless the two are equivalent", tok_path, tokenizer.fingerprint[:12],
                    expected[:12])
    model = model.to(device=device, dtype=dtype).eval()
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise SampleError(f"tokenizer vocab_size {tokenizer.vocab_size} != model vocab_size {model.cfg.vocab_size}")
    return LoadedModel(model, tokenizer, kind, uri, codec, revision)


# ---------------------------------------------------------------------------------------------- images


@dataclass
class SampleRecord:
    file: str
    prompt: str | None
    prompt_tokens: int
    new_tokens: int
    stop: str  # the sampler's reason: "eos", "eoi" or "max_tokens"
    ending: str  # in words, as in the grid: "complete", "cut at N tokens", "repaired"
    body_bytes: int
    body_sha256: str  # of the generated bytes before repair (prompt included): identical runs give identical hashes
    jpeg_bytes: int
    complete: bool
    mcu_fraction: float  # share of the image's MCUs whose data is all there


def render(data: bytes, codec: dict):
    """(RGB image, repair report) of model output, a prefix or a body, through pipeline.repair."""
    from pipeline.repair import decode_report

    return decode_report(data, codec["quality"], codec["size"])


def largest_fitting_ratio(body: bytes, tokenizer, limit: int) -> float | None:
    """The largest prompt ratio (whole MCU rows) whose BOS + tokens stay below `limit`; None if even one row does
    not fit."""
    from pipeline.repair import mcu_rows_of, prompt_prefix

    rows = mcu_rows_of(body)
    for r in range(rows - 1, 0, -1):
        if 1 + len(tokenizer.encode(prompt_prefix(body, r / rows))) < limit:
            return r / rows
    return None


# ---------------------------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="exported jpeglm folder, Hugging Face Llama folder (local path or s3://), or training "
                             "run dir (local path)")
    parser.add_argument("--out", required=True, help="output folder for sample-NNNN.{jpg,png}, grid.png, summary.json")
    parser.add_argument("--num", type=int, default=8,
                        help="images to generate; with --prompt: completions per prompt (default 8)")
    parser.add_argument("--batch", type=int, default=8, help="sequences decoded together (default 8)")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, default=50,
                        help="sample among the k most likely tokens; 0 = off (default 50)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass; 1.0 = off (default 0.9)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed; the same flags give the same images (default 0)")
    parser.add_argument("--prompt", nargs="+", metavar="IMAGE", help="complete these images from their top rows")
    parser.add_argument("--ratio", type=float, default=0.375,
                        help="fraction of the image given as prompt, in whole 16-pixel MCU rows: floor(ratio x "
                             "rows) rows (default 0.375 = the top 96 rows of 256, as in the paper)")
    parser.add_argument("--max-tokens", type=int,
                        help="max tokens per image including BOS and prompt (default: the model's context, "
                             "max_seq_len)")
    parser.add_argument("--tokenizer", help="tokenizer.model to use instead of the checkpoint's (local or s3://)")
    parser.add_argument("--image-size", type=int, metavar="PX",
                        help="image size the model was trained on, for checkpoints that do not record it "
                             "(default: the checkpoint's, else 256)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or auto (cuda when available; default auto)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES),
                        help="weights/activations dtype (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: the usable cores minus those other processes keep busy "
                             "now, at least 1: threads that share a core with a busy process stall each other)")


def check_out_dir(out: str, flag: str = "--out") -> None:
    """Refuse an output folder that is a file, lies under one or cannot be written, before any work (the model may
    take minutes to load)."""
    from pipeline import storage

    problem = storage.folder_problem(out)
    if problem:
        raise SampleError(f"{flag} {out} {problem}: give a folder this user can write (it is created if missing)")


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SampleError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return dev


def check_sampling_flags(args) -> None:
    """The flags shared with `jpeglm eval`: --batch, --temperature, --top-k, --top-p, --threads."""
    if args.batch <= 0:
        raise SampleError("--batch must be positive")
    if args.threads is not None and args.threads <= 0:
        raise SampleError("--threads must be positive")
    try:
        SamplingParams(args.temperature, args.top_k, args.top_p).validate()
    except ValueError as e:
        message = str(e)
        for name, flag in (("temperature", "--temperature"), ("top_k", "--top-k"), ("top_p", "--top-p")):
            message = message.replace(name, flag)
        raise SampleError(message) from None


def _check_args(args) -> None:
    from pipeline import storage

    if args.num <= 0:
        raise SampleError("--num must be positive")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise SampleError("--max-tokens must be at least 2")
    if args.image_size is not None and (args.image_size < 16 or args.image_size % 16):
        raise SampleError(f"--image-size {args.image_size}: must be a positive multiple of 16")
    if args.prompt and not 0 < args.ratio < 1:
        raise SampleError("--ratio must be in (0, 1), e.g. 0.375")
    check_sampling_flags(args)
    for p in args.prompt or []:
        if not storage.exists(p):
            raise SampleError(f"--prompt {p}: no such file")
    check_out_dir(args.out)


def run(args: argparse.Namespace) -> int:
    from jpeglm.logs import setup_logging

    setup_logging()
    _check_args(args)
    device = device_of(args.device)
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    threads = set_threads(args.threads) if device.type == "cpu" else None
    from pipeline.repair import prompt_rows

    codec = checkpoint_codec(args.checkpoint)
    if args.image_size:
        codec = {**codec, "size": args.image_size}
    if args.prompt:
        try:
            prompt_rows(args.ratio, codec["size"] // 16)  # before the model loads: that may take minutes
        except ValueError as e:
            raise SampleError(f"--ratio {args.ratio} at {codec['size']}x{codec['size']} pixels: {e}") from None
    try:
        loaded = load_checkpoint(args.checkpoint, device, dtype, args.tokenizer)
    except (ValueError, FileNotFoundError) as e:
        # Refusals of the loaders (trainer.pretrained, trainer.hf, pipeline.tokenizer) name the problem.
        raise SampleError(str(e)) from None
    loaded.codec = codec
    summary = sample_to_folder(args, loaded, device)
    t = summary["timing"]
    endings = [s["ending"] for s in summary["samples"]]
    print(f"{len(endings)} samples in {args.out}: {endings.count('complete')} complete, "
          f"{endings.count('repaired')} repaired, {sum(e.startswith('cut') for e in endings)} cut at the token limit; "
          f"{t['new_tokens']} tokens at {t['tokens_per_s']:.1f} tokens/s, {t['images_per_min']:.2f} images/min "
          f"({summary['device']}, {summary['dtype']}" + (f", threads {threads}" if threads else "") + ")")
    print(f"grid: {os.path.join(args.out, 'grid.png')}")
    return 0


def _prompt_jobs(args, tokenizer, codec: dict, limit: int):
    """[(label, prompt token ids incl. BOS, canonical body or None, prompt body or None)]."""
    from pipeline import codec as jpeg, storage
    from pipeline.repair import prompt_prefix

    if not args.prompt:
        return [(None, [tokenizer.bos_id], None, None)]
    jobs = []
    for p in args.prompt:
        try:
            body = jpeg.canonicalize(storage.read_bytes(p), codec["size"], codec["quality"])
        except jpeg.CodecError as e:
            raise SampleError(f"--prompt {p}: {e}") from None
        prefix = prompt_prefix(body, args.ratio)
        ids = [tokenizer.bos_id] + tokenizer.encode(prefix)
        if len(ids) >= limit:
            fits = largest_fitting_ratio(body, tokenizer, limit)
            hint = (f"the largest --ratio that fits is {fits:.4g}" if fits else "not even one MCU row fits")
            raise SampleError(f"--prompt {p} at --ratio {args.ratio} is {len(ids):,} tokens, not below the limit of "
                              f"{limit:,} tokens per image (--max-tokens / the model's context): {hint}")
        jobs.append((p, ids, body, prefix))
    return jobs


def sample_to_folder(args, loaded: LoadedModel, device: torch.device) -> dict:
    """Generate per `args` (the CLI flags) into args.out; returns the summary written to summary.json."""
    from tqdm import tqdm

    from evaluation.grids import ending_label, make_grid, square_rows
    from pipeline import codec as jpeg

    model, tok, codec = loaded.model, loaded.tokenizer, loaded.codec
    dtype = next(model.parameters()).dtype
    params = SamplingParams(args.temperature, args.top_k, args.top_p)
    eoi = EOIDetector(tok.token_bytes())
    generator = torch.Generator(device=device).manual_seed(args.seed)
    max_total = min(args.max_tokens or model.cfg.max_seq_len, model.cfg.max_seq_len)
    if args.max_tokens and args.max_tokens > model.cfg.max_seq_len:
        log.warning("--max-tokens %d exceeds the model's context (max_seq_len %d): images stop at %d tokens",
                    args.max_tokens, model.cfg.max_seq_len, model.cfg.max_seq_len)
    jobs = _prompt_jobs(args, tok, codec, max_total)
    os.makedirs(args.out, exist_ok=True)

    records: list[SampleRecord] = []
    grid_rows, grid_labels = [], []
    stats = GenerationStats()
    t_start = time.perf_counter()
    bar = tqdm(total=len(jobs) * args.num, desc="sampling", unit="img")
    for label, prompt_ids, body, prefix in jobs:
        row_images, row_labels = [], []
        if prefix is not None:
            row_images.append(render(prefix, codec)[0])
            row_labels.append(f"prompt {os.path.basename(label)}"[:40])
        remaining = args.num
        while remaining:
            b = min(args.batch, remaining)
            steps_before = stats.steps
            gens = generate(model, [prompt_ids] * b, max_total - len(prompt_ids), params, tok.eos_id, eoi, generator,
                            stats=stats, suppress_ids=[tok.unk_id])
            for g in gens:
                name = f"sample-{len(records):04d}"
                body_out = tok.decode(prompt_ids + g.tokens)
                image, report = render(body_out, codec)
                ending = ending_label(g.stop, report.complete, len(prompt_ids) + len(g.tokens))
                with open(os.path.join(args.out, name + ".jpg"), "wb") as f:
                    f.write(report.jpeg)
                image.save(os.path.join(args.out, name + ".png"))
                records.append(SampleRecord(name + ".jpg", label, len(prompt_ids), len(g.tokens), g.stop, ending,
                                            len(body_out), hashlib.sha256(body_out).hexdigest(), len(report.jpeg),
                                            report.complete, round(report.mcu_fraction, 4)))
                row_images.append(image)
                row_labels.append(f"{name[7:]}: {ending}")
            remaining -= b
            bar.update(b)
            bar.set_postfix(tok_s=f"{stats.tokens_per_s:.0f}", steps=stats.steps - steps_before)
        if body is not None:
            row_images.append(render(jpeg.assemble(body, codec["quality"]), codec)[0])
            row_labels.append("original")
        grid_rows.append(row_images)
        grid_labels.append(row_labels)
    bar.close()
    wall = time.perf_counter() - t_start

    if not args.prompt:  # unconditional: wrap the single row into a square-ish grid
        grid_rows, grid_labels = square_rows(grid_rows[0]), square_rows(grid_labels[0])
    make_grid(grid_rows, grid_labels).save(os.path.join(args.out, "grid.png"))

    gen_s = stats.prefill_s + stats.decode_s
    summary = {
        "checkpoint": args.checkpoint,
        "checkpoint_kind": loaded.kind,
        "checkpoint_revision": loaded.revision,
        "codec": codec,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "sampling": asdict(params) | {"seed": args.seed, "batch": args.batch, "max_tokens": max_total},
        "prompts": args.prompt or [],
        "ratio": args.ratio if args.prompt else None,
        "samples": [asdict(r) for r in records],
        "timing": {
            "wall_s": round(wall, 3),
            "generate_s": round(gen_s, 3),
            "prefill_s": round(stats.prefill_s, 3),
            "new_tokens": stats.new_tokens,
            "tokens_per_s": round(stats.new_tokens / gen_s, 2) if gen_s else 0.0,
            "images_per_min": round(len(records) / wall * 60, 3) if wall else 0.0,
        },
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return summary
