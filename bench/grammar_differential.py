"""Differential proof of the JPEG grammar: its verdict on mutated bodies against a strict decoder's.

    python bench/grammar_differential.py --num 100000 --out bench/results/grammar-differential.json

Real canonical bodies (the bundled photos at 256 and 64, and derived web-like photos, grayscale sources included,
at 64) are mutated in seeded ways (`MUTATIONS`: byte and bit flips, insertions, deletions, truncations, restart
markers swapped / duplicated / removed / renumbered, FF insertions, an early EOI, an extra restart marker before
EOI, data after EOI; and two kinds that stay valid: random bytes the grammar allows, then its shortest completion,
and two bodies spliced at a restart marker). Per stream: the grammar accepts it as a whole body
(`JpegGrammar.check(body).ok`) or not; the strict judge (`pipeline.strict_decode.strict_error`: libjpeg-turbo,
warnings fatal) accepts the spliced file or not. The one outcome that must never happen: the grammar accepts and
the judge rejects. The reverse (stricter than libjpeg) is counted and explained by examples. A sample of the files
is also judged by `djpeg -strict` to show the two judges agree. tests/test_jpeg_grammar.py runs the same with a
few thousand mutations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time
from collections import Counter, defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_RST = re.compile(rb"\xff[\xd0-\xd7]")


def _markers(body: bytes) -> list[int]:
    return [m.start() for m in _RST.finditer(body)]


def _pos(rng: random.Random, body: bytes, header: int) -> int:
    """A position in the entropy-coded data mostly, sometimes in the header (after SOI, which assemble replaces)."""
    return rng.randrange(2, header) if rng.random() < 0.05 else rng.randrange(header, len(body))


def _byte_replace(rng, body, g, others):
    p = _pos(rng, body, len(g.header))
    return body[:p] + bytes([(body[p] + rng.randrange(1, 256)) % 256]) + body[p + 1 :]


def _bit_flip(rng, body, g, others):
    p = _pos(rng, body, len(g.header))
    return body[:p] + bytes([body[p] ^ (1 << rng.randrange(8))]) + body[p + 1 :]


def _insert(rng, body, g, others):
    p = _pos(rng, body, len(g.header))
    return body[:p] + rng.randbytes(rng.choice((1, 1, 2, 3))) + body[p:]


def _delete(rng, body, g, others):
    p = _pos(rng, body, len(g.header))
    return body[:p] + body[p + rng.choice((1, 1, 2, 4)) :]


def _truncate(rng, body, g, others):
    return body[: rng.randrange(2, len(body))]


def _marker_swap(rng, body, g, others):
    ms = _markers(body)
    a, b = rng.sample(ms, 2)
    out = bytearray(body)
    out[a + 1], out[b + 1] = body[b + 1], body[a + 1]
    if out == body:  # same number (8 apart): swap with a neighbour instead
        out[a + 1] = 0xD0 + (body[a + 1] - 0xD0 + 1) % 8
    return bytes(out)


def _marker_duplicate(rng, body, g, others):
    p = rng.choice(_markers(body))
    return body[: p + 2] + body[p : p + 2] + body[p + 2 :]


def _marker_remove(rng, body, g, others):
    p = rng.choice(_markers(body))
    return body[:p] + body[p + 2 :]


def _marker_renumber(rng, body, g, others):
    p = rng.choice(_markers(body))
    new = rng.choice([b for b in (*range(0xD0, 0xD8), 0xD9) if b != body[p + 1]])
    return body[: p + 1] + bytes([new]) + body[p + 2 :]


def _ff_insert(rng, body, g, others):
    p = _pos(rng, body, len(g.header))
    return body[:p] + rng.choice((b"\xff", b"\xff\x00", b"\xff\xff", bytes([0xFF, rng.randrange(256)]))) + body[p:]


def _early_eoi(rng, body, g, others):
    p = rng.randrange(len(g.header), len(body) - 2)
    return body[:p] + b"\xff\xd9"


def _extra_marker_before_eoi(rng, body, g, others):
    return body[:-2] + bytes([0xFF, 0xD0 + (g.mcus - 1) % 8 if rng.random() < 0.5 else rng.randrange(0xD0, 0xD8)]) \
        + b"\x28\xa2\x8a\x00" * rng.randrange(2) + body[-2:]


def _after_eoi(rng, body, g, others):
    return body + rng.choice((b"\x00", b"\xff\xd9", rng.randbytes(rng.randrange(1, 8))))


def _grammar_walk(rng, body, g, others):
    """A real prefix, then up to 200 random bytes the grammar allows, then its shortest completion."""
    cut = rng.randrange(2, len(body))
    state = g.advance(g.start(), body[:cut])
    out = bytearray(body[:cut])
    for _ in range(rng.randrange(1, 200)):
        if g.is_complete(state):
            break
        for b in rng.sample(range(256), 256):
            nxt = g.advance(state, bytes([b]))
            if nxt is not None:
                out.append(b)
                state = nxt
                break
    return bytes(out) + g.shortest_completion(state)


def _splice(rng, body, g, others):
    """body's first k MCUs, then another body of the same size from MCU k on."""
    other = rng.choice(others)
    k = rng.randrange(len(_markers(body)))
    return body[: _markers(body)[k] + 2] + other[_markers(other)[k] + 2 :]


MUTATIONS = {f.__name__.lstrip("_"): f for f in (
    _byte_replace, _bit_flip, _insert, _delete, _truncate, _marker_swap, _marker_duplicate, _marker_remove,
    _marker_renumber, _ff_insert, _early_eoi, _extra_marker_before_eoi, _after_eoi, _grammar_walk, _splice)}


def splice_tables(stream: bytes, quality: int) -> bytes:
    """assemble() for any stream: the tables after its first two bytes, whatever they are (a lost SOI stays lost)."""
    from pipeline.codec import tables

    return stream[:2] + tables(quality)[2:-2] + stream[2:]


def real_bodies(derived: int = 40) -> dict[int, list[tuple[str, bytes]]]:
    """{size: [(name, body)]}: the bundled photos at 256 and 64, `derived` web-like photos at 64."""
    from pipeline import codec
    from pipeline.sample_images import derive, photo_bytes, photo_names

    out = {256: [], 64: []}
    for name in photo_names():
        for size in out:
            out[size].append((name, codec.canonicalize(photo_bytes(name), size)))
    for name, data in derive(derived, seed=7):
        out[64].append((name, codec.canonicalize(data, 64)))
    return out


def run(num: int, seed: int = 0, bodies: dict | None = None, djpeg_every: int = 0, examples: int = 8) -> dict:
    """`num` mutated streams (1 in 8 of size 256) -> counts per mutation kind and the disagreements."""
    from pipeline.codec import QUALITY
    from pipeline.jpeg_grammar import JpegGrammar
    from pipeline.strict_decode import djpeg_strict, strict_error

    bodies = bodies or real_bodies()
    grammars = {size: JpegGrammar(size, QUALITY) for size in bodies}
    rng = random.Random(seed)
    kinds = sorted(MUTATIONS)
    counts: dict = defaultdict(Counter)
    found: dict = {"grammar_accepts_judge_rejects": [], "judge_accepts_grammar_rejects": []}
    judges, stricter = Counter(), Counter()
    for i in range(num):
        size = 256 if i % 8 == 0 else 64
        g, pool = grammars[size], bodies[size]
        name, body = rng.choice(pool)
        kind = kinds[i % len(kinds)]
        stream = MUTATIONS[kind](rng, body, g, [b for _, b in pool])
        state = g.advance(g.start(), stream)
        grammar_ok = state is not None and g.is_complete(state)
        jpeg = splice_tables(stream, QUALITY)
        message = strict_error(jpeg)
        judge_ok = message is None
        c = counts[kind]
        c["streams"] += 1
        c["unchanged"] += stream == body
        c["grammar_accepts"] += grammar_ok
        c["judge_accepts"] += judge_ok
        if grammar_ok != judge_ok:
            direction = "grammar_accepts_judge_rejects" if grammar_ok else "judge_accepts_grammar_rejects"
            c[direction] += 1
            verdict = g.check(stream)
            if not grammar_ok:
                stricter[_reason_kind(verdict.reason)] += 1
            if len(found[direction]) < examples and not any(e["kind"] == kind for e in found[direction]):
                found[direction].append({"kind": kind, "size": size, "body": name, "index": i, "judge": message,
                                         "grammar_offset": verdict.offset, "grammar_reason": verdict.reason})
        if djpeg_every and i % djpeg_every == 0:
            judges["files"] += 1
            judges["djpeg_agrees"] += djpeg_strict(jpeg) == judge_ok
    total = Counter()
    for c in counts.values():
        total.update(c)
    return {"num": num, "seed": seed, "bodies": {s: len(b) for s, b in bodies.items()}, "total": dict(total),
            "disagreement_rate": (total["grammar_accepts_judge_rejects"] + total["judge_accepts_grammar_rejects"])
            / max(1, num),
            "by_kind": {k: dict(counts[k]) for k in kinds},
            "judge_accepts_grammar_rejects_by_reason": dict(stricter.most_common()), "examples": found,
            "judges_compared": dict(judges)}


def _reason_kind(reason: str) -> str:
    """The grammar's reason without its numbers: 'MCU N of N is complete: N where a marker (N) must follow'."""
    return re.sub(r"RST\d", "RSTn", re.sub(r"\b(?!AC\b|DC\b)[0-9A-F]+\b", "N", reason))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--djpeg-every", type=int, default=25, help="also judge every N-th file with djpeg -strict")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = run(args.num, args.seed, djpeg_every=args.djpeg_every)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["command"] = " ".join(["python", *sys.argv])
    result["machine"] = {"python": platform.python_version(), "platform": platform.platform()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    t = result["total"]
    print(f"{args.num} streams in {result['seconds']} s: grammar accepts {t.get('grammar_accepts', 0)}, judge accepts "
          f"{t.get('judge_accepts', 0)}; grammar accepts / judge rejects: {t.get('grammar_accepts_judge_rejects', 0)}; "
          f"judge accepts / grammar rejects: {t.get('judge_accepts_grammar_rejects', 0)} "
          f"(disagreement {result['disagreement_rate']:.4%}); djpeg agrees on "
          f"{result['judges_compared'].get('djpeg_agrees', 0)} of {result['judges_compared'].get('files', 0)}")


if __name__ == "__main__":
    main()
