"""Speed of the JPEG grammar (pipeline/jpeg_grammar.py) as the constrained sampler uses it: one `advance` call per
sampled token per row, CPython, one thread.

    python bench/bench_grammar.py --out bench/results/grammar.json [--derived 40] [--repeat 5]

Inputs: canonical 256x256 bodies of the bundled photos and of `--derived` web-like photos derived from them,
tokenized with a BPE tokenizer (vocab 320) trained on those bodies, as the tests train theirs. Measured (CPU time
of the thread, the median of `--repeat` passes; wall time beside it):
- cold: a fresh JpegGrammar advanced token by token over the first half of the bodies (the memo filled on the way);
- held_out: then token by token over the other half, which it has not seen (a sampler after its first images);
- warm: the first half again (every transition memoized);
- per byte: the warm grammar fed one byte per call; and whole bodies in one call;
- min_bytes_to_complete on every token boundary of the warm bodies (the sampler's budget check);
- the memo's size: decoder states and computed transitions.
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

clock = time.thread_time  # CPU time of this thread: not inflated when other processes take the core


def _bodies(derived: int) -> list[bytes]:
    from pipeline import codec
    from pipeline.sample_images import derive, photo_bytes, photo_names

    photos = [codec.canonicalize(photo_bytes(n)) for n in photo_names()]
    return photos + [codec.canonicalize(data) for _, data in derive(derived, seed=3)]


def _advance_tokens(g, token_lists) -> tuple[float, float, int]:
    """Advance over every body token by token: (cpu s, wall s, tokens)."""
    t0, w0, n = clock(), time.perf_counter(), 0
    for pieces in token_lists:
        state = g.start()
        for piece in pieces:
            state = g.advance(state, piece)
        assert g.is_complete(state)
        n += len(pieces)
    return clock() - t0, time.perf_counter() - w0, n


def _timed(fn, repeat: int) -> dict:
    cpu, wall = [], []
    for _ in range(repeat):
        c, w, units = fn()
        cpu.append(c)
        wall.append(w)
    return {"us_per_unit": round(statistics.median(cpu) / units * 1e6, 4),
            "us_per_unit_wall": round(statistics.median(wall) / units * 1e6, 4), "units": units,
            "passes_cpu_s": [round(c, 4) for c in cpu]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--derived", type=int, default=40)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    from pipeline.jpeg_grammar import JpegGrammar
    from pipeline.tokenizer import Tokenizer

    bodies = _bodies(args.derived)
    tok = Tokenizer.train(bodies, 320)
    table = tok.token_bytes()
    token_lists = [[table[t] for t in tok.encode(b)] for b in bodies]
    half = len(bodies) // 2
    seen, unseen = token_lists[:half], token_lists[half:]
    total_bytes = sum(map(len, bodies))
    total_tokens = sum(map(len, token_lists))

    cold, held_out = [], []
    for _ in range(args.repeat):  # a fresh grammar per pass
        g = JpegGrammar()
        cold.append(_advance_tokens(g, seen))
        held_out.append(_advance_tokens(g, unseen))
    result = {"cold_per_token": _timed(iter(cold).__next__, args.repeat),
              "held_out_per_token": _timed(iter(held_out).__next__, args.repeat)}
    g = JpegGrammar()
    _advance_tokens(g, token_lists)
    result["warm_per_token"] = _timed(lambda: _advance_tokens(g, seen), args.repeat)

    def per_byte():
        t0, w0 = clock(), time.perf_counter()
        for body in bodies:
            state = g.start()
            for i in range(len(body)):
                state = g.advance(state, body[i : i + 1])
        return clock() - t0, time.perf_counter() - w0, total_bytes

    def whole():
        t0, w0 = clock(), time.perf_counter()
        for body in bodies:
            g.advance(g.start(), body)
        return clock() - t0, time.perf_counter() - w0, total_bytes

    states = []
    for pieces in seen:
        state = g.start()
        for piece in pieces:
            state = g.advance(state, piece)
            states.append(state)

    def min_bytes():
        t0, w0 = clock(), time.perf_counter()
        for state in states:
            g.min_bytes_to_complete(state)
        return clock() - t0, time.perf_counter() - w0, len(states)

    result["warm_per_byte"] = _timed(per_byte, args.repeat)
    result["warm_whole_body_per_byte"] = _timed(whole, args.repeat)
    g.min_bytes_to_complete(g.start())
    cold_min = _timed(min_bytes, 1)  # the first pass fills the per-state memo
    result["min_bytes_to_complete_first_call"] = cold_min
    result["min_bytes_to_complete_warm"] = _timed(min_bytes, args.repeat)
    result["memo"] = {"decoder_states": len(g._trans),
                      "transitions_computed": sum(1 for row in g._trans.values() for x in row if x != -2)}
    result["inputs"] = {"bodies": len(bodies), "bytes": total_bytes, "tokens": total_tokens,
                        "bytes_per_token": round(total_bytes / total_tokens, 3), "size": 256, "quality": 25,
                        "vocab_size": tok.vocab_size}
    result["command"] = " ".join(["python", *sys.argv])
    result["machine"] = {"python": platform.python_version(), "implementation": platform.python_implementation(),
                         "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for key in ("cold_per_token", "held_out_per_token", "warm_per_token", "warm_per_byte",
                "warm_whole_body_per_byte", "min_bytes_to_complete_warm"):
        print(f"{key:28s} {result[key]['us_per_unit']:8.3f} us CPU ({result[key]['us_per_unit_wall']:.3f} wall)")
    print(f"memo: {result['memo']}; {result['inputs']}")


if __name__ == "__main__":
    main()
