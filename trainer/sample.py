"""`jpeglm sample`: generate images (from BOS) or complete them (from their top rows) with a trained model.

    jpeglm sample --checkpoint DIR --out OUT [--num N] [--batch B] [--temperature T] [--top-k K] [--top-p P] [--seed S]
    jpeglm sample --checkpoint DIR --out OUT --prompt a.jpg b.png --ratio 0.375 --num 4

--checkpoint is any of: an exported jpeglm folder (trainer/pretrained.py), a Hugging Face Llama folder
(trainer/hf.py; e.g. the authors' released weights), or a training run dir / DeepSpeed checkpoint
(trainer/export.py consolidates it); a local path or s3:// (trainer/loading.py). The image size and JPEG quality
the model was trained on come from the checkpoint (its "codec" record; 256 / 25 when it has none).

The command: flags -> trainer/loading.py (the model) -> trainer/sampling.py (the samples). Decoding is
trainer/generate.py's: batched, with a KV cache, stopping at EOS, at JPEG EOI (FF D9) or at the token limit. Every
sample is repaired (pipeline.repair) and decoded, then written as OUT/sample-NNNN.jpg and .png;
OUT/grid.png shows each prompt beside its completions, each labelled with how it ended ("complete", "cut at N
tokens", "repaired"); OUT/summary.json gives per-sample token counts, completeness and timing.
"""

from __future__ import annotations

import argparse
import os

from trainer.devices import DTYPES
from trainer.sampling import SampleError, check_out_dir, check_sampling_flags


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
    parser.add_argument("--constrain", choices=("jpeg", "none"), default="jpeg",
                        help="jpeg: sample only tokens that keep the bytes a valid canonical JPEG that can still be "
                             "closed within --max-tokens, so every sample is a whole, strictly decodable image "
                             "(the model's distribution renormalized over those tokens); none: unconstrained, as "
                             "in the paper (default jpeg)")
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
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="weights/activations dtype (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: the usable cores minus those other processes keep busy "
                             "now, at least 1: threads that share a core with a busy process stall each other)")


def _check_args(args):
    from pipeline import storage

    if args.num <= 0:
        raise SampleError("--num must be positive")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise SampleError("--max-tokens must be at least 2")
    if args.image_size is not None and (args.image_size < 16 or args.image_size % 16):
        raise SampleError(f"--image-size {args.image_size}: must be a positive multiple of 16")
    if args.prompt and not 0 < args.ratio < 1:
        raise SampleError("--ratio must be in (0, 1), e.g. 0.375")
    params = check_sampling_flags(args.batch, args.threads, args.temperature, args.top_k, args.top_p)
    for p in args.prompt or []:
        if not storage.exists(p):
            raise SampleError(f"--prompt {p}: no such file")
    check_out_dir(args.out)
    return params


def run(args: argparse.Namespace) -> int:
    from jpeglm.logs import setup_logging

    setup_logging()
    params = _check_args(args)
    from pipeline.repair import prompt_rows
    from trainer.devices import resolve_device, resolve_dtype, set_threads
    from trainer.loading import checkpoint_codec, load_checkpoint
    from trainer.sampling import sample_to_folder

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    threads = set_threads(args.threads) if device.type == "cpu" else None

    codec = checkpoint_codec(args.checkpoint)
    if args.image_size:
        codec = {**codec, "size": args.image_size}
    if args.prompt:
        try:
            prompt_rows(args.ratio, codec["size"] // 16)  # before the model loads: that may take minutes
        except ValueError as e:
            raise SampleError(f"--ratio {args.ratio} at {codec['size']}x{codec['size']} pixels: {e}") from None
    loaded = load_checkpoint(args.checkpoint, device, dtype, args.tokenizer)
    loaded.codec = codec
    summary = sample_to_folder(loaded, device, args.out, params, args.seed, args.batch, args.num, args.prompt,
                               args.ratio, args.max_tokens, args.constrain)
    t = summary["timing"]
    endings = [s["ending"] for s in summary["samples"]]
    print(f"{len(endings)} samples in {args.out}: {endings.count('complete')} complete, "
          f"{endings.count('repaired')} repaired, {sum(e.startswith('cut') for e in endings)} cut at the token limit, "
          f"{sum(s['strict'] for s in summary['samples'])} pass a strict decoder; "
          f"{t['new_tokens']} tokens at {t['tokens_per_s']:.1f} tokens/s, {t['images_per_min']:.2f} images/min "
          f"({summary['device']}, {summary['dtype']}" + (f", threads {threads}" if threads else "") + ")")
    print(f"grid: {os.path.join(args.out, 'grid.png')}")
    return 0
