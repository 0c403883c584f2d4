"""`jpeglm eval`: is a model any good?

    jpeglm eval fid REAL FAKE [--json PATH] [--inception PATH] [--num N]
    jpeglm eval completion --checkpoint CKPT --data OUTPUT --ratios 0.25,0.375,0.5 --num N --out DIR
    jpeglm eval unconditional --checkpoint CKPT --data OUTPUT --num N --out DIR

`fid`: FID and KID between two image sets (folders of image files of any size, or `jpeglm preprocess` outputs,
meaning their validation images); see evaluation/fid.py. `completion` and `unconditional`: sample with a
checkpoint and measure the samples against validation images; see evaluation/completion.py.
"""

from __future__ import annotations

import argparse
import json
import os

from evaluation.fid import EvalError

DEFAULT_RATIOS = (0.25, 0.375, 0.5)
GRID_ROWS = 8


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="WHAT", required=True)
    fid = sub.add_parser("fid", help="FID and KID between two image sets",
                         description="FID and KID between two image sets: folders of image files (any size; "
                                     "resized to 299x299, bicubic) or jpeglm preprocess outputs (their validation "
                                     "images).")
    fid.add_argument("real", metavar="REAL", help="reference images: a folder or a preprocess output")
    fid.add_argument("fake", metavar="FAKE", help="images to score: a folder or a preprocess output")
    fid.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    fid.add_argument("--num", type=int, metavar="N",
                     help="use N images of each set, spread evenly over it (default: all)")
    add_inception_flags(fid)
    configure_sampling_parsers(sub)


def configure_sampling_parsers(sub) -> None:
    from trainer.devices import DTYPES

    for name, text in (("completion", "complete N validation images from their top rows and score the "
                                      "completions (FID/KID, decode validity) against the originals"),
                       ("unconditional", "sample N images from BOS and score them against N validation images")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--checkpoint", required=True,
                       help="exported jpeglm folder, Hugging Face Llama folder, or training run dir")
        p.add_argument("--data", required=True, help="the jpeglm preprocess output whose validation images are used")
        p.add_argument("--out", required=True, help="output folder (eval.json, grids, samples)")
        p.add_argument("--num", type=int, default=100, help="validation images / samples (default 100)")
        if name == "completion":
            p.add_argument("--ratios", default=",".join(map(str, DEFAULT_RATIOS)),
                           help="prompt fractions, comma-separated (default 0.25,0.375,0.5; whole MCU rows)")
        p.add_argument("--untrained", action="store_true",
                       help="also sample a randomly initialized model of the same shape (a reference)")
        p.add_argument("--batch", type=int, default=8, help="sequences decoded together (default 8)")
        p.add_argument("--temperature", type=float, default=1.0, help="default 1.0")
        p.add_argument("--top-k", type=int, default=50, help="default 50")
        p.add_argument("--top-p", type=float, default=0.9, help="default 0.9")
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
        p.add_argument("--max-tokens", type=int,
                       help="max tokens per image, prompt included (default: twice the longest of the N validation "
                            "images, at most the model's context)")
        p.add_argument("--bpb-tokens", type=int, default=262_144,
                       help="validation tokens for bits per byte (default 262,144; 0 = skip)")
        p.add_argument("--grid", type=int, default=GRID_ROWS, help=f"images shown in the grid (default {GRID_ROWS})")
        p.add_argument("--dtype", choices=sorted(DTYPES),
                       help="model dtype (default: bf16 on cuda, fp32 on cpu)")
        add_inception_flags(p)


def add_inception_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inception", metavar="PATH",
                        help="the FID Inception TorchScript file (default: .cache/fid-inception-2015-12-05.pt from "
                             "`make eval-weights`, or $JPEGLM_INCEPTION)")
    parser.add_argument("--feature-batch", type=int, default=16, metavar="B",
                        help="images per Inception forward pass (default 16)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default auto)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: the usable cores minus those other processes keep busy "
                             "now, at least 1)")


def run(args: argparse.Namespace) -> int:
    from jpeglm.logs import setup_logging

    setup_logging()
    if args.feature_batch < 1:  # 0 would never flush a batch: every 299x299 input would pile up in memory
        raise EvalError(f"--feature-batch must be >= 1, got {args.feature_batch}")
    if args.eval_command == "fid":
        return run_fid(args)
    from evaluation import completion

    return completion.run(args)


def check_json_path(path: str | None) -> None:
    if path and os.path.isdir(path):
        raise EvalError(f"--json {path} is a folder: give a file path")


def run_fid(args: argparse.Namespace) -> int:
    from evaluation.fid import check_inception_file, default_inception_path, extract_features, fid_kid, load_inception
    from evaluation.images import open_image_set
    from trainer.devices import resolve_device, set_threads

    check_json_path(args.json)
    if args.num is not None and args.num < 2:
        raise EvalError("--num must be at least 2 (FID needs a covariance)")
    check_inception_file(args.inception or default_inception_path())  # before reading any image
    device = resolve_device(args.device)
    set_threads(args.threads)
    n_real, real_images = open_image_set(args.real, args.num)
    n_fake, fake_images = open_image_set(args.fake, args.num)
    for uri, n in ((args.real, n_real), (args.fake, n_fake)):
        if n < 2:
            raise EvalError(f"{uri} holds {n} image{'s' * (n != 1)}; FID and KID need at least 2 per set "
                            "(a few hundred for a meaningful figure)")
    net = load_inception(args.inception, str(device))
    real = extract_features(net, (im for _, im in real_images), args.feature_batch, "REAL features", n_real)
    fake = extract_features(net, (im for _, im in fake_images), args.feature_batch, "FAKE features", n_fake)
    result = fid_kid(real, fake) | {"real": args.real, "fake": args.fake}
    print(f"FID {result['fid']:.3f}   KID {result['kid']:.5f} +- {result['kid_std']:.5f}   "
          f"({result['num_real']} real, {result['num_fake']} fake images; FID is biased upward below ~2,000 "
          "images: compare only at equal N)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0
