"""`jpeglm sample`: generate images (from BOS) or complete them (from their top rows) with a trained model.

    jpeglm sample --checkpoint DIR --out OUT [--num N] [--batch B] [--temperature T] [--top-k K] [--top-p P] [--seed S]
    jpeglm sample --checkpoint DIR --out OUT --prompt a.jpg b.png --ratio 0.375 --num 4

--checkpoint is any of: an exported jpeglm folder (trainer/pretrained.py), a Hugging Face Llama folder
(trainer/hf.py; e.g. the authors' released weights), or a training run dir / DeepSpeed checkpoint
(trainer/export.py consolidates it); a local path or s3://.

Decoding is batched with a KV cache: the prompt (BOS + prompt tokens, the same length for every row of a batch) is
prefilled once, then one token per step. A row stops at EOS, when the bytes FF D9 (JPEG EOI) appear in its decoded
byte stream, or at the token limit; finished rows are dropped from the batch (and from the cache). Every sample is
repaired (pipeline.codec.repair) and decoded, then written as OUT/sample-NNNN.jpg and .png; OUT/grid.png shows each
prompt beside its completions; OUT/summary.json gives per-sample token counts, completeness and timing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from jpeglm.errors import UserError
from pipeline.codec import EOI  # the JPEG end marker FF D9 ends a sample
from trainer.model import KVCache, Transformer

log = logging.getLogger("jpeglm.sample")

DEFAULT_MAX_TOKENS = 12288  # the paper's sequence length: BOS + prompt + generated tokens per image
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------- sampling core


@dataclass
class SamplingParams:
    """temperature 0 = greedy. top_k 0 / top_p 1.0 disable the filter. Defaults: the authors' settings."""

    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.9

    def validate(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


def next_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) fp32 -> token ids (B,): greedy, or temperature + top-k + top-p (nucleus) sampling."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already cover top_p (the best token always stays).
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class EOIDetector:
    """Finds the JPEG end-of-image marker FF D9 in each row's decoded byte stream, token by token.

    A BPE piece may hold FF D9 whole, or end with FF while the next starts with D9. In entropy-coded data a 0xFF
    byte is always stuffed (FF 00) or starts a restart marker, so FF D9 means end of image.
    """

    def __init__(self, token_bytes: list[bytes]):
        self.contains_eoi = [EOI in b for b in token_bytes]
        self.starts_d9 = [b[:1] == b"\xd9" for b in token_bytes]
        self.ends_ff = [None if not b else b[-1:] == b"\xff" for b in token_bytes]  # None: no bytes (specials)

    def prompt_state(self, prompt_tokens: list[int]) -> bool:
        """Whether the prompt's byte stream ends with FF (so a first D9 closes the image)."""
        last_ff = False
        for t in prompt_tokens:
            if self.ends_ff[t] is not None:
                last_ff = self.ends_ff[t]
        return last_ff

    def step(self, token: int, last_ff: bool) -> tuple[bool, bool]:
        """(EOI reached, new last_ff)."""
        done = self.contains_eoi[token] or (last_ff and self.starts_d9[token])
        ends = self.ends_ff[token]
        return done, last_ff if ends is None else ends


@dataclass
class Generation:
    tokens: list[int]  # generated tokens, without the prompt; includes the EOS / EOI-closing token
    stop: str  # "eos", "eoi" or "max_tokens"


@dataclass
class GenerationStats:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: int = 0
    steps: int = 0
    rows: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int,
    params: SamplingParams,
    eos_id: int | None = None,
    eoi: EOIDetector | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stats: GenerationStats | None = None,
    on_step=None,
    suppress_ids: list[int] | None = None,
) -> list[Generation]:
    """Autoregressive decoding of a batch of equal-length prompts (each starts with BOS).

    suppress_ids: tokens never to generate (e.g. <unk>, which stands for no byte).
    use_cache=False recomputes the whole sequence at every step (the reference, and the benchmark's baseline).
    on_step(n_active) is called after every decoding step (progress bars).
    """
    params.validate()
    if not prompts or len({len(p) for p in prompts}) != 1:
        raise ValueError("prompts must be a non-empty list of equal-length token lists")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    prompt_len = len(prompts[0])
    max_new_tokens = min(max_new_tokens, model.cfg.max_seq_len - prompt_len)
    if max_new_tokens <= 0:
        raise ValueError(f"prompt of {prompt_len} tokens leaves no room under max_seq_len={model.cfg.max_seq_len}")
    stats = stats if stats is not None else GenerationStats()
    n = len(prompts)
    out: list[list[int]] = [[] for _ in range(n)]
    stop = ["max_tokens"] * n
    last_ff = [eoi.prompt_state(p) if eoi else False for p in prompts]
    active = list(range(n))  # original row index of each row still in the batch

    seq = torch.tensor(prompts, dtype=torch.long, device=device)
    shared = use_cache and n > 1 and all(p == prompts[0] for p in prompts)
    t0 = time.perf_counter()
    if shared:
        # Several samples of one prompt (unconditional, or completions of one image): prefill it once and copy
        # its cache rows.
        cache = KVCache(model.cfg, 1, prompt_len + max_new_tokens, device, dtype)
        logits = model(seq[:1], cache)[:, -1].expand(n, -1).contiguous()
        cache.k = [k.repeat(n, 1, 1, 1) for k in cache.k]
        cache.v = [v.repeat(n, 1, 1, 1) for v in cache.v]
    else:
        cache = KVCache(model.cfg, n, prompt_len + max_new_tokens, device, dtype) if use_cache else None
        logits = model(seq, cache)[:, -1]
    _sync(device)
    stats.prefill_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(max_new_tokens):
        if suppress_ids:
            logits[:, suppress_ids] = float("-inf")
        tok = next_tokens(logits, params, generator)
        tok_list = tok.tolist()  # one host sync per step: the stop tests need the ids
        keep = []
        for j, (row, t) in enumerate(zip(active, tok_list)):
            out[row].append(t)
            if eos_id is not None and t == eos_id:
                stop[row] = "eos"
                continue
            if eoi is not None:
                done, last_ff[row] = eoi.step(t, last_ff[row])
                if done:
                    stop[row] = "eoi"
                    continue
            keep.append(j)
        stats.new_tokens += len(tok_list)
        stats.steps += 1
        if on_step:
            on_step(len(keep))
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):
            # Drop finished rows: the remaining ones compute (and cache) nothing for them.
            idx = torch.tensor(keep, device=device)
            tok = tok[idx]
            active = [active[j] for j in keep]
            if cache is not None:
                cache.k = [k.index_select(0, idx) for k in cache.k]
                cache.v = [v.index_select(0, idx) for v in cache.v]
            else:
                seq = seq.index_select(0, idx)
        if cache is not None:
            logits = model(tok[:, None], cache)[:, -1]
        else:
            seq = torch.cat([seq, tok[:, None]], dim=1)
            logits = model(seq)[:, -1]
    _sync(device)
    stats.decode_s += time.perf_counter() - t0
    stats.rows.append(n)
    return [Generation(o, s) for o, s in zip(out, stop)]


# ---------------------------------------------------------------------------------------------- checkpoints


class SampleError(UserError):
    """A problem with the user's inputs (checkpoint, prompt, flags): reported as a message, exit status 2."""


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object  # pipeline.tokenizer.Tokenizer
    kind: str  # "jpeglm", "huggingface" or "training-run"
    source: str


def read_checkpoint_config(uri: str) -> dict | None:
    """The config.json of a checkpoint folder (local or s3://), or None if it has none."""
    from pipeline import storage

    cfg_uri = storage.join(uri, "config.json")
    if not storage.exists(cfg_uri):
        return None
    return json.loads(storage.read_bytes(cfg_uri))


def load_checkpoint(
    uri: str, device: torch.device, dtype: torch.dtype, tokenizer_uri: str | None = None
) -> LoadedModel:
    """Detect what `uri` holds and load model + tokenizer from it (see module docstring)."""
    from pipeline import storage
    from pipeline.tokenizer import Tokenizer
    from trainer import hf, pretrained

    if not storage.exists(uri):
        raise SampleError(f"--checkpoint {uri}: no such folder")
    config = read_checkpoint_config(uri)
    with contextlib.ExitStack() as stack:
        if config is not None and config.get("format") == pretrained.FORMAT:
            kind = "jpeglm"
            path = stack.enter_context(storage.local_folder(uri))
            model, meta = pretrained.load_pretrained(path, device=device, dtype=dtype)
            tok_path, tok_meta = os.path.join(path, "tokenizer.model"), meta.get("tokenizer") or {}
        elif config is not None and hf.is_llama_config(config):
            kind = "huggingface"
            path = stack.enter_context(storage.local_folder(uri))
            model, info = hf.load_hf_local(path, device=device, dtype=dtype)
            tok_path, tok_meta = info["tokenizer_path"], (config.get("jpeglm") or {}).get("tokenizer") or {}
        else:
            kind = "training-run"
            try:
                from trainer.export import consolidate
            except ImportError as e:
                raise SampleError(f"--checkpoint {uri}: not an exported or Hugging Face folder, and training runs "
                                  f"cannot be read here ({e})") from None
            state, cfg, tok_path, meta = consolidate(uri)
            tok_meta = meta.get("tokenizer") or {}
            with torch.device("meta"):
                model = Transformer(cfg)
            model.load_state_dict(state, strict=True, assign=True)
        log.info("checkpoint %s: %s, %.1fM parameters", uri,
                 {"jpeglm": "exported jpeglm folder", "huggingface": "Hugging Face Llama folder",
                  "training-run": "training run (DeepSpeed checkpoint, consolidated)"}[kind],
                 sum(p.numel() for p in model.parameters()) / 1e6)
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
    return LoadedModel(model, tokenizer, kind, uri)


# ---------------------------------------------------------------------------------------------- images


@dataclass
class SampleRecord:
    file: str
    prompt: str | None
    prompt_tokens: int
    new_tokens: int
    stop: str
    body_bytes: int
    body_sha256: str  # of the generated bytes before repair (prompt included): identical runs give identical hashes
    jpeg_bytes: int
    complete: bool
    decoded: bool


def _render(jpeg: bytes):
    """(RGB image, complete, decoded) via the tolerant decoder; a grey square if nothing decodes."""
    from PIL import Image

    from pipeline import codec

    try:
        image, complete = codec.decode_tolerant(jpeg)
        return image.convert("RGB"), bool(complete), True
    except Exception as e:  # a sample the decoder cannot read at all is still a sample: record it
        log.warning("undecodable sample (%s: %s)", type(e).__name__, e)
        return Image.new("RGB", (256, 256), (128, 128, 128)), False, False


def make_grid(rows: list[list], labels: list[list[str]] | None = None, cell: int = 256, gap: int = 4):
    """A PNG-ready grid: rows of PIL images (each prompt's row: prompt, completions, original)."""
    from PIL import Image, ImageDraw

    ncols = max(len(r) for r in rows)
    label_h = 14 if labels else 0
    grid = Image.new("RGB", (ncols * (cell + gap) + gap, len(rows) * (cell + gap + label_h) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            x, y = gap + j * (cell + gap), gap + i * (cell + gap + label_h)
            if im.size != (cell, cell):
                im = im.resize((cell, cell))
            grid.paste(im, (x, y + label_h))
            if labels:
                draw.text((x + 2, y + 1), labels[i][j], fill=(0, 0, 0))
    return grid


# ---------------------------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="exported jpeglm folder, Hugging Face Llama folder, or training run dir "
                             "(local path or s3://)")
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
                        help="fraction of the image given as prompt: cut after the n-th FF D7 marker, "
                             "n = int(32*ratio) (default 0.375 = top 96 rows)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help="max tokens per image including BOS and prompt, capped by the model's max_seq_len "
                             f"(default {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--tokenizer", help="tokenizer.model to use instead of the checkpoint's (local or s3://)")
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N or auto (cuda when available; default auto)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES),
                        help="weights/activations dtype (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's choice; 1 is often faster for small models on "
                             "busy machines)")


def _check_args(parser_error, args) -> None:
    if args.num <= 0:
        parser_error("--num must be positive")
    if args.batch <= 0:
        parser_error("--batch must be positive")
    if args.threads is not None and args.threads <= 0:
        parser_error("--threads must be positive")
    if args.max_tokens < 2:
        parser_error("--max-tokens must be at least 2")
    if args.prompt and not 0 < args.ratio < 1:
        parser_error("--ratio must be in (0, 1), e.g. 0.375")
    if args.prompt and int(32 * args.ratio) < 1:
        parser_error(f"--ratio {args.ratio} gives n = int(32*ratio) = 0 markers: use at least 1/32")
    try:
        SamplingParams(args.temperature, args.top_k, args.top_p).validate()
    except ValueError as e:
        message = str(e)
        for name, flag in (("temperature", "--temperature"), ("top_k", "--top-k"), ("top_p", "--top-p")):
            message = message.replace(name, flag)
        parser_error(message)
    for p in args.prompt or []:
        from pipeline import storage

        if not storage.exists(p):
            parser_error(f"--prompt {p}: no such file")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return dev


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def fail(msg: str):
        print(f"jpeglm sample: error: {msg}", file=sys.stderr)
        raise SystemExit(2)

    _check_args(fail, args)
    try:
        device = _device(args.device)
    except ValueError as e:
        fail(str(e))
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loaded = load_checkpoint(args.checkpoint, device, dtype, args.tokenizer)
        summary = sample_to_folder(args, loaded, device)
    except (SampleError, ValueError, FileNotFoundError) as e:
        # ValueError: refusals of the loaders (trainer.pretrained, trainer.hf, pipeline.tokenizer) name the problem.
        fail(str(e))
    t = summary["timing"]
    n_complete = sum(s["complete"] for s in summary["samples"])
    print(f"{len(summary['samples'])} samples in {args.out}: {n_complete} complete JPEGs, "
          f"{t['new_tokens']} tokens at {t['tokens_per_s']:.1f} tokens/s, {t['images_per_min']:.2f} images/min "
          f"({summary['device']}, {summary['dtype']}); grid: {os.path.join(args.out, 'grid.png')}")
    return 0


def _prompt_jobs(args, tokenizer):
    """[(label, prompt token ids incl. BOS, canonical body or None, prompt body or None)]."""
    from pipeline import codec, storage

    if not args.prompt:
        return [(None, [tokenizer.bos_id], None, None)]
    jobs = []
    for p in args.prompt:
        try:
            body = codec.canonicalize(storage.read_bytes(p))
        except codec.CodecError as e:
            raise SampleError(f"--prompt {p}: {e}") from None
        prefix = codec.prompt_prefix(body, args.ratio)
        jobs.append((p, [tokenizer.bos_id] + tokenizer.encode(prefix), body, prefix))
    return jobs


def sample_to_folder(args, loaded: LoadedModel, device: torch.device) -> dict:
    """Generate per `args` (the CLI flags) into args.out; returns the summary written to summary.json."""
    from tqdm import tqdm

    from pipeline import codec

    model, tok = loaded.model, loaded.tokenizer
    dtype = next(model.parameters()).dtype
    params = SamplingParams(args.temperature, args.top_k, args.top_p)
    eoi = EOIDetector(tok.token_bytes())
    generator = torch.Generator(device=device).manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    max_total = min(args.max_tokens, model.cfg.max_seq_len)
    if args.max_tokens > model.cfg.max_seq_len:
        log.warning("--max-tokens %d exceeds the model's max_seq_len %d: images stop at %d tokens",
                    args.max_tokens, model.cfg.max_seq_len, model.cfg.max_seq_len)

    jobs = _prompt_jobs(args, tok)
    records: list[SampleRecord] = []
    grid_rows, grid_labels = [], []
    stats = GenerationStats()
    t_start = time.perf_counter()
    bar = tqdm(total=len(jobs) * args.num, desc="sampling", unit="img")
    for label, prompt_ids, body, prefix in jobs:
        if len(prompt_ids) >= max_total:
            raise SampleError(f"prompt {label} is {len(prompt_ids)} tokens, not below the limit of {max_total} "
                              f"tokens per image (--max-tokens, max_seq_len)")
        row_images, row_labels = [], []
        if prefix is not None:
            row_images.append(_render(codec.repair(prefix))[0])
            row_labels.append(f"prompt {os.path.basename(label)}"[:40])
        remaining = args.num
        while remaining:
            b = min(args.batch, remaining)
            steps_before = stats.steps
            gens = generate(model, [prompt_ids] * b, max_total - len(prompt_ids), params, tok.eos_id, eoi, generator,
                            stats=stats, suppress_ids=[tok.unk_id])
            for g in gens:
                i = len(records)
                body_out = tok.decode(prompt_ids + g.tokens)
                jpeg = codec.repair(body_out)
                image, complete, decoded = _render(jpeg)
                name = f"sample-{i:04d}"
                with open(os.path.join(args.out, name + ".jpg"), "wb") as f:
                    f.write(jpeg)
                image.save(os.path.join(args.out, name + ".png"))
                records.append(SampleRecord(name + ".jpg", label, len(prompt_ids), len(g.tokens), g.stop, len(body_out),
                                            hashlib.sha256(body_out).hexdigest(), len(jpeg), complete, decoded))
                row_images.append(image)
                row_labels.append(f"{name} {g.stop}")
            remaining -= b
            bar.update(b)
            bar.set_postfix(tok_s=f"{stats.tokens_per_s:.0f}", steps=stats.steps - steps_before)
        if body is not None:
            row_images.append(_render(codec.assemble(body))[0])
            row_labels.append("original")
        grid_rows.append(row_images)
        grid_labels.append(row_labels)
    bar.close()
    wall = time.perf_counter() - t_start

    if not args.prompt:  # unconditional: wrap the single row into a square-ish grid
        flat, flat_labels = grid_rows[0], grid_labels[0]
        cols = min(len(flat), max(1, math.ceil(math.sqrt(len(flat)))))
        grid_rows = [flat[i : i + cols] for i in range(0, len(flat), cols)]
        grid_labels = [flat_labels[i : i + cols] for i in range(0, len(flat), cols)]
    make_grid(grid_rows, grid_labels).save(os.path.join(args.out, "grid.png"))

    gen_s = stats.prefill_s + stats.decode_s
    summary = {
        "checkpoint": args.checkpoint,
        "checkpoint_kind": loaded.kind,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
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
