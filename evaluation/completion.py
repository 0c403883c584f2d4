"""`jpeglm eval completion` and `jpeglm eval unconditional`: sample with a checkpoint, score the samples.

    jpeglm eval completion --checkpoint CKPT --data OUTPUT --ratios 0.25,0.375,0.5 --num N --out DIR [--untrained]
    jpeglm eval unconditional --checkpoint CKPT --data OUTPUT --num N --out DIR [--untrained]

Real images: N validation images of OUTPUT (a `jpeglm preprocess` output made with the checkpoint's tokenizer and
image size), spread evenly over the split (evaluation/images.py), as canonical JPEGs.

completion, per ratio (the paper's protocol): each real image's body is cut after its top floor(ratio x MCU rows)
MCU rows (pipeline.repair.prompt_prefix; at 256x256 the paper's cut after the int(32 x ratio)-th FF D7), the
model samples the rest once, and the completions are scored against the N originals. Two references make the
number mean something: "prompt_only", the prompts themselves repaired and decoded (the rest of each image grey),
which a model must beat to have added anything; and with --untrained, a randomly initialized model of the same
shape completing the same prompts.

unconditional: N images sampled from BOS, scored against the N real images (and with --untrained, likewise).

Each model samples twice: "model", unconstrained (the paper's protocol), and "model_constrained", with the JPEG
grammar in the sampler (trainer/generate.py JpegConstraint: every sample a whole image); likewise "untrained" and
"untrained_constrained" with --untrained.

Scores per set: FID and KID against the real images (evaluation/fid.py: at small N read KID), and decode validity:
complete_fraction (the model closed the image and nothing had to be repaired), repaired_fraction (closed, but
repaired), cut_fraction (stopped by the token limit), strict_fraction (the saved JPEG passes a strict decoder:
libjpeg-turbo with warnings fatal, pipeline/strict_decode.py), mcu_fraction (mean share of MCUs whose data is all
there), mean_tokens. Also bits per byte of the model on the validation split (evaluation/bpb.py).

Outputs in DIR: eval.json (both commands write their own section into the same file, so one DIR can hold a
model's whole evaluation), grid-unconditional.png / grid-completion-R.png (labels say how each sample ended),
samples/SET/NNNNNN.jpg (every sample, repaired; NNNNNN = the validation image's index), and the Inception
features of the real images (features-real-*.npy, reused by the next command on the same images). A table is
printed at the end. Sampling is batched with a KV cache (trainer/generate.py; prompts sorted by length), on CPU
or GPU; progress bars show sampling and feature extraction.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from evaluation.fid import EvalError

if TYPE_CHECKING:
    from trainer.generate import SamplingParams

log = logging.getLogger("jpeglm.eval")



# ------------------------------------------------------------------------------------ flags (defined in cli.py)


def _ratios(text: str) -> list[float]:
    try:
        ratios = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise EvalError(f"--ratios {text!r}: expected numbers separated by commas, e.g. 0.25,0.375,0.5") from None
    if not ratios or not all(0 < r < 1 for r in ratios):
        raise EvalError(f"--ratios {text!r}: each ratio must be in (0, 1)")
    return ratios


def _check_flags(args) -> SamplingParams:
    from trainer.sampling import check_out_dir, check_sampling_flags

    if args.num < 2:
        raise EvalError("--num must be at least 2 (FID needs a covariance)")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise EvalError("--max-tokens must be at least 2")
    if args.bpb_tokens < 0 or args.grid < 0:
        raise EvalError("--bpb-tokens and --grid must be >= 0")
    params = check_sampling_flags(args.batch, args.threads, args.temperature, args.top_k, args.top_p)
    check_out_dir(args.out)
    return params


# ---------------------------------------------------------------------------------------------- sampling


@dataclass
class Sampled:
    image: object  # PIL RGB
    jpeg: bytes  # repaired
    stop: str
    tokens: int  # prompt included
    complete: bool
    mcu_fraction: float
    ending: str  # in words (trainer.grids.ending_label)
    strict: bool = False  # the saved JPEG passes the strict decoder (set by sample_prompts)


def sample_prompts(model, tok, codec: dict, prompts: list[list[int]], max_len: int, params: SamplingParams,
                   seed: int, batch: int, desc: str, timing: dict | None = None,
                   constraint=None) -> list[Sampled]:
    """One sample per prompt, `batch` at a time in order of prompt length, from a generator seeded with `seed`;
    results in the prompts' order. constraint: a trainer.generate.JpegConstraint, or None (unconstrained)."""
    import torch
    from tqdm import tqdm

    from pipeline.strict_decode import strict_decodable_many
    from trainer.generate import EOIDetector, generate
    from trainer.grids import ending_label
    from trainer.sampling import render

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    eoi = EOIDetector(tok.token_bytes())
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Sampled | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="img")
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        gens = generate(model, [prompts[i] for i in idx], max_len, params, tok.eos_id, eoi, generator,
                        suppress_ids=[tok.unk_id], max_len=max_len, constraint=constraint)
        for i, g in zip(idx, gens):
            image, report = render(tok.decode(prompts[i] + g.tokens), codec)
            n = len(prompts[i]) + len(g.tokens)
            out[i] = Sampled(image, report.jpeg, g.stop, n, report.complete, report.mcu_fraction,
                             ending_label(g.stop, report.complete, n))
        bar.update(len(idx))
    bar.close()
    for s, ok in zip(out, strict_decodable_many([s.jpeg for s in out])):
        s.strict = ok
    if timing is not None:
        timing["sampling_s"] += time.perf_counter() - t0
    return out


def validity(samples: list[Sampled]) -> dict:
    n = len(samples)
    return {
        "complete_fraction": sum(s.complete and s.stop != "max_tokens" for s in samples) / n,
        "repaired_fraction": sum(not s.complete and s.stop != "max_tokens" for s in samples) / n,
        "cut_fraction": sum(s.stop == "max_tokens" for s in samples) / n,
        "strict_fraction": sum(s.strict for s in samples) / n,
        "mcu_fraction": float(np.mean([s.mcu_fraction for s in samples])),
        "mean_tokens": float(np.mean([s.tokens for s in samples])),
    }


# ---------------------------------------------------------------------------------------------- the commands


@dataclass
class Context:
    args: argparse.Namespace
    params: SamplingParams
    loaded: object  # trainer.loading.LoadedModel
    net: object  # the Inception network
    real: list  # evaluation.images.ValidationImage
    real_features: np.ndarray | None  # computed once the inputs have passed every check
    max_len: int
    untrained: object | None
    constraint: object  # trainer.generate.JpegConstraint: one for every set and ratio, so its memo is reused
    timing: dict = field(default_factory=lambda: {"sampling_s": 0.0, "features_s": 0.0, "bits_per_byte_s": 0.0})


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    ratios = _ratios(args.ratios) if args.eval_command == "completion" else []
    params = _check_flags(args)
    ctx = _setup(args, params, ratios)
    result = load_result(args.out, _identity(ctx))
    if args.eval_command == "completion":
        prompts = {ratio: _completion_prompts(ctx, ratio) for ratio in ratios}  # refuse before any work
        ctx.real_features = _real_features(ctx)
        section = result.setdefault("completion", {})
        for ratio in ratios:
            section[f"{ratio:g}"] = _completion(ctx, ratio, *prompts[ratio])
    else:
        ctx.real_features = _real_features(ctx)
        result["unconditional"] = _unconditional(ctx)
    if args.bpb_tokens and (result.get("bits_per_byte") or {}).get("max_tokens") != args.bpb_tokens:
        from evaluation.bpb import validation_bits_per_byte
        from pipeline.manifest import read_manifest

        log.info("bits per byte on the validation split (up to %d tokens)", args.bpb_tokens)
        t1 = time.perf_counter()
        bpb = validation_bits_per_byte(ctx.loaded.model, ctx.loaded.tokenizer, args.data, read_manifest(args.data),
                                       args.bpb_tokens, args.batch)
        result["bits_per_byte"] = bpb | {"max_tokens": args.bpb_tokens}
        ctx.timing["bits_per_byte_s"] += time.perf_counter() - t1
    timing = {k: round(v, 1) for k, v in ctx.timing.items()} | {"wall_s": round(time.perf_counter() - t0, 1)}
    result.setdefault("timing", {})[args.eval_command] = timing
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(format_table(result))
    print(f"\n{os.path.join(args.out, 'eval.json')}; grids and samples in {args.out}")
    return 0


def _setup(args, params: SamplingParams, ratios: list[float]) -> Context:
    import torch

    from evaluation.fid import check_inception_file, default_inception_path, load_inception
    from evaluation.images import validation_images
    from pipeline.manifest import read_manifest
    from pipeline.repair import prompt_rows
    from trainer.devices import resolve_device, resolve_dtype, set_threads
    from trainer.loading import load_checkpoint

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cpu":
        set_threads(args.threads)
    check_inception_file(args.inception or default_inception_path())  # before minutes of sampling
    manifest = read_manifest(args.data)
    for ratio in ratios:
        try:
            prompt_rows(ratio, manifest["codec"]["size"] // 16)
        except ValueError as e:
            raise EvalError(f"--ratios: {e}") from None
    loaded = load_checkpoint(args.checkpoint, device, dtype)
    for key in ("size", "quality"):
        if loaded.codec[key] != manifest["codec"][key]:
            raise EvalError(f"{args.checkpoint} was trained on image {key} {loaded.codec[key]}, {args.data} holds "
                            f"{manifest['codec'][key]}: evaluate on data preprocessed like the training data")
    if loaded.tokenizer.fingerprint != manifest["tokenizer"]["fingerprint"]:
        raise EvalError(f"{args.data} was tokenized with another tokenizer than {args.checkpoint}'s: evaluate on "
                        "data preprocessed with the checkpoint's tokenizer.model (jpeglm preprocess --tokenizer)")
    os.makedirs(args.out, exist_ok=True)
    real = validation_images(args.data, args.num)
    if len(real) < 2:
        raise EvalError(f"{args.data} has {len(real)} validation image(s): FID needs at least 2")
    longest = max(len(v.tokens) for v in real) + 2
    max_len = min(args.max_tokens or 2 * longest, loaded.model.cfg.max_seq_len)
    net = load_inception(args.inception, str(device))
    untrained = None
    if args.untrained:
        from trainer.model import Transformer

        torch.manual_seed(args.seed)
        untrained = Transformer(loaded.model.cfg).to(device=device, dtype=dtype).eval()
    log.info("%d validation images (%dx%d), up to %d tokens per sample", len(real), loaded.codec["size"],
             loaded.codec["size"], max_len)
    from trainer.sampling import jpeg_constraint

    return Context(args, params, loaded, net, real, None, max_len, untrained,
                   jpeg_constraint(loaded.tokenizer, loaded.codec))


def _real_features(ctx: Context) -> np.ndarray:
    from evaluation.fid import extract_features
    from pipeline.manifest import read_manifest

    args, real = ctx.args, ctx.real
    shards = sorted(s["sha256"] for s in read_manifest(args.data)["shards"] if s["split"] == "validation")
    key = hashlib.sha256(json.dumps([shards, [v.id for v in real]]).encode()).hexdigest()[:16]  # same images
    path = os.path.join(args.out, f"features-real-{key}.npy")
    if os.path.exists(path):
        return np.load(path)
    import io

    from PIL import Image

    images = (Image.open(io.BytesIO(v.jpeg)).convert("RGB") for v in real)
    t0 = time.perf_counter()
    features = extract_features(ctx.net, images, args.feature_batch, "real features", len(real))
    ctx.timing["features_s"] += time.perf_counter() - t0
    np.save(path, features)
    return features


def _score(ctx: Context, name: str, images: list, samples: list[Sampled] | None = None) -> dict:
    from evaluation.fid import extract_features, fid_kid

    t0 = time.perf_counter()
    features = extract_features(ctx.net, images, ctx.args.feature_batch, f"{name} features", len(images))
    ctx.timing["features_s"] += time.perf_counter() - t0
    out = fid_kid(ctx.real_features, features)
    if samples is not None:
        out |= validity(samples)
        folder = os.path.join(ctx.args.out, "samples", name.replace(" ", "-"))
        os.makedirs(folder, exist_ok=True)
        for v, s in zip(ctx.real, samples):
            with open(os.path.join(folder, f"{v.index:06d}.jpg"), "wb") as f:
                f.write(s.jpeg)
    return out


def _models(ctx: Context):
    """(set name, model, constraint or None): each model unconstrained (the paper's protocol), then constrained."""
    yield "model", ctx.loaded.model, None
    yield "model_constrained", ctx.loaded.model, ctx.constraint
    if ctx.untrained is not None:
        yield "untrained", ctx.untrained, None
        yield "untrained_constrained", ctx.untrained, ctx.constraint


def _completion_prompts(ctx: Context, ratio: float) -> tuple[list[bytes], list[list[int]]]:
    """(prompt bodies, prompt token ids with BOS) of the real images at `ratio`; refused if one does not fit."""
    from pipeline.repair import prompt_prefix
    from trainer.sampling import largest_fitting_ratio

    tok = ctx.loaded.tokenizer
    prefixes = [prompt_prefix(v.body, ratio) for v in ctx.real]
    prompts = [[tok.bos_id] + tok.encode(p) for p in prefixes]
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) >= ctx.max_len:
        fits = largest_fitting_ratio(ctx.real[longest].body, tok, ctx.max_len)
        raise EvalError(f"at ratio {ratio:g} a prompt is {len(prompts[longest]):,} tokens, not below the limit of "
                        f"{ctx.max_len:,} per image (--max-tokens / the model's context): "
                        + (f"use ratios up to {fits:.4g}" if fits else "not even one MCU row fits"))
    return prefixes, prompts


def _completion(ctx: Context, ratio: float, prefixes: list[bytes], prompts: list[list[int]]) -> dict:
    from trainer.grids import make_grid
    from trainer.sampling import render

    tok, codec = ctx.loaded.tokenizer, ctx.loaded.codec
    prompt_only = [render(p, codec)[0] for p in prefixes]
    result = {"prompt_only": _score(ctx, f"prompt-only {ratio:g}", prompt_only),
              "prompt_tokens": float(np.mean([len(p) for p in prompts]))}
    shown = {}
    for which, model, constraint in _models(ctx):
        samples = sample_prompts(model, tok, codec, prompts, ctx.max_len, ctx.params, ctx.args.seed, ctx.args.batch,
                                 f"completion {ratio:g} ({which})", ctx.timing, constraint)
        result[which] = _score(ctx, f"completion {ratio:g} {which}", [s.image for s in samples], samples)
        shown[which] = samples[: ctx.args.grid]
    if ctx.args.grid:
        rows, labels = [], []
        for i, v in enumerate(ctx.real[: ctx.args.grid]):
            rows.append([prompt_only[i]] + [shown[w][i].image for w in shown] + [render(v.jpeg, codec)[0]])
            labels.append([f"prompt {ratio:g}"] + [f"{_short(w)}: {shown[w][i].ending}" for w in shown]
                          + ["original"])
        make_grid(rows, labels).save(os.path.join(ctx.args.out, f"grid-completion-{ratio:g}.png"))
    return result


def _short(which: str) -> str:
    """Grid label of a set: model, model+jpeg, untrained, untrained+jpeg."""
    return which.replace("_constrained", "+jpeg")


def _unconditional(ctx: Context) -> dict:
    from trainer.grids import make_grid, square_rows

    tok = ctx.loaded.tokenizer
    prompts = [[tok.bos_id]] * len(ctx.real)
    result = {}
    for which, model, constraint in _models(ctx):
        samples = sample_prompts(model, tok, ctx.loaded.codec, prompts, ctx.max_len, ctx.params, ctx.args.seed,
                                 ctx.args.batch, f"unconditional ({which})", ctx.timing, constraint)
        result[which] = _score(ctx, f"unconditional {which}", [s.image for s in samples], samples)
        if which in ("model", "model_constrained") and ctx.args.grid:
            shown = samples[: ctx.args.grid]
            name = "grid-unconditional.png" if which == "model" else "grid-unconditional-constrained.png"
            make_grid(square_rows([s.image for s in shown]), square_rows([s.ending for s in shown])).save(
                os.path.join(ctx.args.out, name))
    result["complete_fraction"] = result["model"]["complete_fraction"]
    result["strict_fraction"] = result["model_constrained"]["strict_fraction"]
    return result


# ---------------------------------------------------------------------------------------------- eval.json


def _identity(ctx: Context) -> dict:
    """What makes two evaluations comparable: the checkpoint (a run dir's resolved revision), data, images and
    sampling."""
    args = ctx.args
    return {"checkpoint": args.checkpoint, "data": args.data, "num": args.num, "seed": args.seed,
            "sampling": asdict(ctx.params), "revision": ctx.loaded.revision, "codec": ctx.loaded.codec,
            "max_tokens": ctx.max_len}


def load_result(out: str, identity: dict) -> dict:
    """OUT/eval.json if it holds an evaluation with this identity (its sections are kept and the one computed now
    replaces its own), else a fresh one. A run dir is identified by the checkpoint it resolved to, so a run trained
    further is never mixed with its earlier figures (bits per byte included)."""
    path = os.path.join(out, "eval.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        differs = [k for k, v in identity.items() if old.get(k) != v]
        if not differs:
            return old
        log.warning("%s holds an evaluation with another %s: replacing it", path, ", ".join(differs))
    return dict(identity)


def format_table(result: dict) -> str:
    """The printed summary: one line per scored set."""
    lines = [f"{'set':<46} {'FID':>9} {'KID':>9} {'+-':>8} {'complete':>9} {'repaired':>9} {'cut':>6} "
             f"{'strict':>7} {'MCUs':>6} {'tokens':>8}"]

    def line(name: str, r: dict) -> None:
        v = [f"{r[k]:9.1%}" if k in r else f"{'':>9}" for k in ("complete_fraction", "repaired_fraction")]
        cut = f"{r['cut_fraction']:6.1%}" if "cut_fraction" in r else f"{'':>6}"
        strict = f"{r['strict_fraction']:7.1%}" if "strict_fraction" in r else f"{'':>7}"
        mcus = f"{r['mcu_fraction']:6.1%}" if "mcu_fraction" in r else f"{'':>6}"
        tokens = f"{r['mean_tokens']:8.0f}" if "mean_tokens" in r else f"{'':>8}"
        lines.append(f"{name:<46} {r['fid']:9.2f} {r['kid']:9.4f} {r['kid_std']:8.4f} {v[0]} {v[1]} {cut} {strict} "
                     f"{mcus} {tokens}")

    sets = ("model", "model_constrained", "untrained", "untrained_constrained")
    for which in sets:
        if which in result.get("unconditional", {}):
            line(f"unconditional ({which.replace('_', ', ')})", result["unconditional"][which])
    for ratio, r in result.get("completion", {}).items():
        for which in (*sets, "prompt_only"):
            if which in r:
                line(f"completion {ratio} ({which.replace('_', ', ') if which != 'prompt_only' else 'prompt-only'})",
                     r[which])
    bpb = result.get("bits_per_byte")
    if bpb:
        lines.append(f"bits per byte on the validation split: {bpb['bits_per_byte']:.4f} ({bpb['tokens']:,} tokens, "
                     f"window {bpb['window']})")
    n = result.get("num")
    lines.append(f"FID/KID against {n} validation images (KID is unbiased; FID is biased upward at small N: "
                 "compare FIDs only at the same N)")
    return "\n".join(lines)
