"""The cost of whole images: grammar-constrained sampling against unconstrained, and our sampler against Hugging
Face `LlamaForCausalLM.generate` on the same weights.

    python bench/bench_constrained.py --out bench/results/constrained.json [--checkpoint out/demo/run]

- constrained_vs_unconstrained: whole images from BOS at batch --batch with the checkpoint (default: the `make demo`
  run when it exists, else a random demo-preset model), the same seeds and sampling settings, with and without
  `--constrain jpeg`; wall and process-CPU seconds, their ratio, and how often a draw was rejected. Runs alternate
  so that machine noise hits both alike; the medians of --repeat runs are reported.
- ours_vs_hf: one thread, batch --batch, --hf-new-tokens tokens from BOS with top-k 50 / top-p 0.9 on the tiny
  preset's architecture (random weights, max_seq_len raised to fit): trainer.generate.generate vs
  transformers' generate (min_new_tokens = max_new_tokens, so both decode exactly as many tokens). Process CPU time
  is the figure to compare on a shared machine; wall time is reported beside it.
The grammar's own cost per token (cold and warm) is bench/bench_grammar.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

DEMO_RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "out", "demo", "run")


def _timed(fn) -> tuple[float, float, object]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def constrained_vs_unconstrained(args) -> dict:
    from pipeline.jpeg_grammar import JpegGrammar
    from trainer.generate import EOIDetector, JpegConstraint, SamplingParams, generate
    from trainer.loading import load_checkpoint

    loaded = load_checkpoint(args.checkpoint, torch.device("cpu"), torch.float32)
    tok, model = loaded.tokenizer, loaded.model
    size, quality = loaded.codec["size"], loaded.codec["quality"]
    params = SamplingParams(args.temperature, args.top_k, args.top_p)
    limit = model.cfg.max_seq_len
    counting = JpegConstraint(JpegGrammar(size, quality), tok.token_bytes(), tok.bos_id)

    def whole(gens) -> int:  # complete, valid bodies by the grammar (an unconstrained row may stop at a stray FF D9)
        return sum(counting.grammar.check(tok.decode(g.tokens)).ok for g in gens)

    def run(constraint, seed):
        return generate(model, [[tok.bos_id]] * args.batch, limit - 1, params, tok.eos_id,
                        EOIDetector(tok.token_bytes()), torch.Generator().manual_seed(seed),
                        suppress_ids=[tok.unk_id], constraint=constraint)

    run(counting, 999)  # warm-up: grammar memo, allocator
    free, cons, complete = [], [], {"unconstrained": 0, "constrained": 0}
    counting.draws = counting.rejected = 0  # count the timed runs only
    tokens = {"unconstrained": 0, "constrained": 0}
    for i in range(args.repeat):
        w, c, gens = _timed(lambda: run(None, i))
        free.append((w, c))
        complete["unconstrained"] += whole(gens)
        tokens["unconstrained"] += sum(len(g.tokens) for g in gens)
        w, c, gens = _timed(lambda: run(counting, i))
        cons.append((w, c))
        complete["constrained"] += whole(gens)
        tokens["constrained"] += sum(len(g.tokens) for g in gens)
    n = args.repeat * args.batch
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    # Images differ in length with and without the constraint: compare the cost per token as well.
    per_token = lambda xs, key: sum(x[1] for x in xs) / tokens[key]  # noqa: E731
    out = {
        "checkpoint": args.checkpoint_label or args.checkpoint,
        "codec": loaded.codec, "batch": args.batch, "max_tokens": limit - 1, "runs": args.repeat,
        "sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p},
        "unconstrained": {"wall_s": round(med(free, 0), 3), "cpu_s": round(med(free, 1), 3),
                          "mean_tokens": round(tokens["unconstrained"] / n, 1),
                          "cpu_us_per_token": round(1e6 * per_token(free, "unconstrained"), 1),
                          "whole_images": complete["unconstrained"] / n},
        "constrained": {"wall_s": round(med(cons, 0), 3), "cpu_s": round(med(cons, 1), 3),
                        "mean_tokens": round(tokens["constrained"] / n, 1),
                        "cpu_us_per_token": round(1e6 * per_token(cons, "constrained"), 1),
                        "whole_images": complete["constrained"] / n,
                        "rejected_draws_per_token": round(counting.rejected / max(counting.draws, 1), 4)},
    }
    out["ratio_wall"] = round(out["constrained"]["wall_s"] / out["unconstrained"]["wall_s"], 3)
    out["ratio_cpu"] = round(out["constrained"]["cpu_s"] / out["unconstrained"]["cpu_s"], 3)
    out["ratio_cpu_per_token"] = round(out["constrained"]["cpu_us_per_token"]
                                       / out["unconstrained"]["cpu_us_per_token"], 3)
    print(f"constrained vs unconstrained (batch {args.batch}): wall {out['ratio_wall']}x, CPU {out['ratio_cpu']}x, "
          f"CPU per token {out['ratio_cpu_per_token']}x; whole images {out['constrained']['whole_images']:.0%} vs "
          f"{out['unconstrained']['whole_images']:.0%}; rejected draws per token "
          f"{out['constrained']['rejected_draws_per_token']}", flush=True)
    return out


def ours_vs_hf(args) -> dict:
    import transformers

    from trainer import hf
    from trainer.generate import SamplingParams, generate
    from trainer.model import ModelConfig, Transformer

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = ModelConfig(vocab_size=320, n_layers=4, d_model=128, n_heads=4, ffn_dim=352,
                      max_seq_len=args.hf_new_tokens + 8)  # the tiny preset's shape
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    config = {k: v for k, v in hf.hf_config(cfg).items() if k not in ("architectures", "torch_dtype")}
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    missing, unexpected = theirs.load_state_dict(hf.to_hf_state_dict(ours.state_dict()), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    b, n = args.batch, args.hf_new_tokens

    def run_ours(seed):
        return generate(ours, [[1]] * b, n, SamplingParams(), generator=torch.Generator().manual_seed(seed))

    def run_hf(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return theirs.generate(torch.ones(b, 1, dtype=torch.long), do_sample=True, top_k=50, top_p=0.9,
                                   temperature=1.0, max_new_tokens=n, min_new_tokens=n, pad_token_id=0)

    run_ours(0), run_hf(0)  # warm-up
    mine, hfs = [], []
    for i in range(args.repeat):
        w, c, gens = _timed(lambda: run_ours(i))
        assert all(len(g.tokens) == n for g in gens)
        mine.append((w, c))
        w, c, ids = _timed(lambda: run_hf(i))
        assert ids.shape == (b, n + 1)
        hfs.append((w, c))
    torch.set_num_threads(before)
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    out = {"model": "tiny preset shape, random weights", "batch": b, "new_tokens": n, "threads": 1,
           "transformers": transformers.__version__, "runs": args.repeat,
           "ours": {"wall_s": round(med(mine, 0), 3), "cpu_s": round(med(mine, 1), 3)},
           "hf_generate": {"wall_s": round(med(hfs, 0), 3), "cpu_s": round(med(hfs, 1), 3)}}
    out["speedup_cpu"] = round(out["hf_generate"]["cpu_s"] / out["ours"]["cpu_s"], 2)
    out["speedup_wall"] = round(out["hf_generate"]["wall_s"] / out["ours"]["wall_s"], 2)
    print(f"ours vs HF generate (1 thread, batch {b}, {n} tokens): {out['speedup_cpu']}x per CPU second, "
          f"{out['speedup_wall']}x wall", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write (e.g. bench/results/constrained.json)")
    parser.add_argument("--checkpoint", default=DEMO_RUN,
                        help="model for the constrained/unconstrained comparison (default: out/demo/run)")
    parser.add_argument("--checkpoint-label", help="how the JSON names the checkpoint (default: the path)")
    parser.add_argument("--batch", type=int, default=8, help="batch size of both comparisons (default 8)")
    parser.add_argument("--repeat", type=int, default=3, help="alternated runs per figure; medians (default 3)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--hf-new-tokens", type=int, default=900, help="tokens per row against HF (default 900)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: constrained,hf")
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    torch.set_num_threads(1)
    results = {"command": "python bench/bench_constrained.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
               "torch": torch.__version__, "load_average_at_start": os.getloadavg()}
    t0 = time.perf_counter()
    if "constrained" not in skip:
        results["constrained_vs_unconstrained"] = constrained_vs_unconstrained(args)
    if "hf" not in skip:
        results["ours_vs_hf"] = ours_vs_hf(args)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    results["load_average_at_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"wrote {args.out} ({results['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
