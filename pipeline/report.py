"""`jpeglm report OUTPUT [--out report.html]`: what a preprocess output holds, as one self-contained HTML page.

    jpeglm report out/preprocess                          # -> report.html in the current folder
    jpeglm report s3://bucket/out --out /tmp/report.html

The page: images by status (every status met, whatever the version that wrote the stats: `ok`, `duplicate`,
`near_duplicate`, `excluded`, filters, codec reasons) per input; histograms of BPE tokens per image, JPEG bytes per
token, source file sizes, source sizes in pixels and source formats; split sizes; the largest duplicate groups as
thumbnails of their kept images (decoded back from the shards); a few examples of every other status (id, source,
message, matched id); the job's timings. Inline CSS and SVG, images as data: URIs, no JavaScript: it opens offline.

Memory is bounded whatever the number of images (23M and more): the stats are read file by file and record batch
by record batch (`Output.stats_batches`, only the columns used), and everything kept is bounded:
- counts by (input, status) and by source format: one integer per distinct key;
- histograms on fixed logarithmic bins (`LogHistogram`: 2**(1/BINS_PER_OCTAVE) wide over 2**-16 .. 2**48, so no
  first pass for the range), added to with numpy per batch;
- examples: the first EXAMPLES_PER_STATUS rows of each status;
- duplicate groups (`duplicate_of`: exact copies share a stats file, near copies are spread over the buckets):
  candidate sizes counted per batch, at most GROUP_CANDIDATES of them (Misra-Gries: when over, every count is
  lowered by the count ranked GROUP_CANDIDATES / 2 and those at zero dropped), which keeps every group of more
  than 2 * copies / GROUP_CANDIDATES members (at 23M images with 7M copies: any group over 140); when anything was
  dropped, a second pass over the `duplicate_of` column alone counts the RECOUNTED largest candidates exactly, so
  every size shown is exact;
- thumbnails: only the MAX_GROUPS largest groups' kept images are read back (`Output.locate_many` finds them in one
  columnar pass, then one ranged read of their rows per shard).
"""

from __future__ import annotations

import argparse
import base64
import html
import math
from collections import Counter

import numpy as np

from jpeglm.errors import UserError
from pipeline import storage
from pipeline.inspect import Output
from pipeline.stats import plural

EXAMPLES_PER_STATUS = 4
MAX_GROUPS = 8
MEMBERS_SHOWN = 3
GROUP_CANDIDATES = 100_000
RECOUNTED = 1_000
BINS_PER_OCTAVE = 8
# Statuses whose rows name another image in a column: what the page shows beside them.
MATCH_COLUMNS = ("duplicate_of", "excluded_by")
COLUMNS = ["id", "source", "status", "message", "source_bytes", "source_format", "source_width", "source_height",
           "jpeg_bytes", "tokens", "split", *MATCH_COLUMNS]
COLORS = {"ok": "#009E73", "duplicate": "#56B4E9", "near_duplicate": "#0072B2", "excluded": "#CC79A7"}
OTHER_COLOR = "#D55E00"
BATCH_ROWS = 65_536


class ReportError(UserError):
    pass


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="a jpeglm preprocess output folder (local path or s3://...)")
    parser.add_argument("--out", default="report.html", metavar="FILE",
                        help="where to write the HTML page (local path or s3://...; default: report.html)")


def run(args: argparse.Namespace) -> int:
    """A ReportError or InspectError (UserError) reaches jpeglm.cli: one line, exit 2."""
    out = Output(args.output)
    found = scan(out)
    groups = found.largest_groups()
    page = render(out, found, thumbnails(out, [kept for kept, _ in groups]))
    try:
        storage.write_bytes(args.out, page.encode())
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot write {args.out}: {e}") from None
    images = sum(found.status.values())
    print(f"wrote {args.out}: {plural(images, 'image')}, {plural(len(found.status), 'status', 'statuses')}, "
          f"{plural(len(groups), 'duplicate group')} shown ({len(page) / 1e3:,.0f} KB); open it in a browser")
    return 0


class LogHistogram:
    """Counts of positive values on fixed log-spaced bins (edges 2**(k / BINS_PER_OCTAVE)); zero, negative and
    non-finite values are counted apart. Memory: one int64 per bin (~500), whatever the number of values."""

    LOW_OCTAVE, HIGH_OCTAVE = -16, 48

    def __init__(self):
        self.counts = np.zeros((self.HIGH_OCTAVE - self.LOW_OCTAVE) * BINS_PER_OCTAVE, dtype=np.int64)
        self.other = 0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        good = np.isfinite(values) & (values > 0)
        self.other += int(values.size - good.sum())
        k = np.floor((np.log2(values[good]) - self.LOW_OCTAVE) * BINS_PER_OCTAVE).astype(np.int64)
        k = np.clip(k, 0, self.counts.size - 1)
        self.counts += np.bincount(k, minlength=self.counts.size)

    def edge(self, k: int) -> float:
        return 2.0 ** (k / BINS_PER_OCTAVE + self.LOW_OCTAVE)

    def bars(self, max_bars: int = 48) -> list[tuple[float, float, int]]:
        """(low edge, high edge, count) over the occupied range, adjacent bins merged to at most max_bars."""
        nz = np.flatnonzero(self.counts)
        if nz.size == 0:
            return []
        lo, hi = int(nz[0]), int(nz[-1]) + 1
        step = max(1, math.ceil((hi - lo) / max_bars))
        return [(self.edge(a), self.edge(min(a + step, hi)), int(self.counts[a:a + step].sum()))
                for a in range(lo, hi, step)]

    def total(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float | None:
        """The upper edge of the bin holding the q-quantile (within one bin's width, ~9%)."""
        total = self.total()
        if not total:
            return None
        k = int(np.searchsorted(np.cumsum(self.counts), q * total))
        return self.edge(k + 1)


class Scan:
    """Everything the page shows from the stats, aggregated batch by batch (see the module docstring)."""

    def __init__(self, inputs: list[str]):
        self.inputs = list(inputs)
        self.by_input: Counter = Counter()  # (input, status) -> images
        self.status: Counter = Counter()
        self.formats: Counter = Counter()
        self.hist = {name: LogHistogram() for name in ("tokens", "bytes_per_token", "source_bytes", "source_side")}
        self.examples: dict[str, list[dict]] = {}
        self.groups: Counter = Counter()  # kept image id -> copies counted (a lower bound once pruned)
        self.pruned = self.recounted = False
        self.group_members: dict[str, list[tuple[str, str]]] = {}  # kept id -> [(status, id)] (a few)
        self.columns: set[str] = set()

    def add(self, batch) -> None:
        import pyarrow.compute as pc

        names = set(batch.schema.names)
        self.columns |= names
        status = batch.column("status")
        for inp, st, n in self._input_counts(batch, status):
            self.by_input[(inp, st)] += n
            self.status[st] += n
        ok = pc.equal(status, "ok")
        tokens = pc.filter(batch.column("tokens"), ok).to_numpy(zero_copy_only=False).astype(np.float64)
        jpeg = pc.filter(batch.column("jpeg_bytes"), ok).to_numpy(zero_copy_only=False).astype(np.float64)
        self.hist["tokens"].add(tokens)
        with np.errstate(divide="ignore", invalid="ignore"):
            self.hist["bytes_per_token"].add(jpeg / tokens)
        self.hist["source_bytes"].add(batch.column("source_bytes").drop_null().to_numpy())
        width, height = batch.column("source_width"), batch.column("source_height")
        known = pc.and_(pc.is_valid(width), pc.is_valid(height))
        self.hist["source_side"].add(pc.max_element_wise(pc.filter(width, known), pc.filter(height, known))
                                     .to_numpy(zero_copy_only=False))
        for fmt, n in _value_counts(batch.column("source_format").drop_null()):
            self.formats[fmt] += n
        self._keep_examples(batch, status)
        if "duplicate_of" in names:
            self._count_groups(batch)

    def _input_counts(self, batch, status):
        """(input, status, images) of a batch: each row to the longest input its source starts with."""
        import pyarrow.compute as pc

        source = batch.column("source")
        unassigned = pc.is_valid(source)
        for inp in sorted(self.inputs, key=len, reverse=True):
            mask = pc.and_(unassigned, pc.starts_with(source, inp))
            unassigned = pc.and_(unassigned, pc.invert(mask))
            for st, n in _value_counts(pc.filter(status, mask)):
                yield inp, st, n
        for st, n in _value_counts(pc.filter(status, unassigned)):
            yield "(other)", st, n

    def _keep_examples(self, batch, status) -> None:
        import pyarrow.compute as pc

        for st, _ in _value_counts(status):
            have = self.examples.setdefault(st, [])
            if st == "ok" or len(have) >= EXAMPLES_PER_STATUS:
                continue
            rows = batch.filter(pc.equal(status, st)).slice(0, EXAMPLES_PER_STATUS - len(have))
            keep = [c for c in ("id", "source", "message", *MATCH_COLUMNS) if c in batch.schema.names]
            have += rows.select(keep).to_pylist()

    def _count_groups(self, batch) -> None:
        import pyarrow.compute as pc

        of = batch.column("duplicate_of")
        copies = batch.filter(pc.is_valid(of))
        if not copies.num_rows:
            return
        for kept, n in _value_counts(copies.column("duplicate_of")):
            self.groups[kept] += n
        self._add_members(copies)
        if len(self.groups) > GROUP_CANDIDATES:
            counts = np.fromiter(self.groups.values(), np.int64, len(self.groups))
            cut = int(-np.partition(-counts, GROUP_CANDIDATES // 2)[GROUP_CANDIDATES // 2])
            self.groups = Counter({k: n - cut for k, n in self.groups.items() if n > cut})
            self.group_members = {k: self.group_members[k] for k in self.groups if k in self.group_members}
            self.pruned = True

    def _add_members(self, copies) -> None:
        for row in copies.select(["status", "id", "duplicate_of"]).to_pylist():
            members = self.group_members.setdefault(row["duplicate_of"], [])
            if len(members) < MEMBERS_SHOWN:
                members.append((row["status"], row["id"]))

    def recount(self, batches) -> None:
        """Second pass (only when candidates were dropped): exact sizes and members of the RECOUNTED largest."""
        import pyarrow as pa
        import pyarrow.compute as pc

        candidates = [k for k, _ in self.largest_groups(RECOUNTED)]
        self.groups, self.group_members = Counter(), {}
        wanted = pa.array(candidates, pa.string())
        for batch in batches:
            copies = batch.filter(pc.is_in(batch.column("duplicate_of"), value_set=wanted))
            for kept, n in _value_counts(copies.column("duplicate_of")):
                self.groups[kept] += n
            self._add_members(copies)
        self.pruned, self.recounted = False, True

    def largest_groups(self, n: int = MAX_GROUPS) -> list[tuple[str, int]]:
        return sorted(self.groups.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _value_counts(array) -> list[tuple[str, int]]:
    import pyarrow.compute as pc

    if len(array) == 0:
        return []
    vc = pc.value_counts(array)
    return list(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()))


def scan(out: Output) -> Scan:
    s = Scan(out.manifest.get("config", {}).get("inputs", []))
    for batch in out.stats_batches(COLUMNS, BATCH_ROWS):
        s.add(batch)
    if s.pruned:
        s.recount(b for b in out.stats_batches(["status", "id", "duplicate_of"], BATCH_ROWS)
                  if "duplicate_of" in b.schema.names)
    return s


def thumbnails(out: Output, ids: list[str]) -> dict[str, bytes | str]:
    """id -> its JPEG as the model sees it (decoded from the shards), or why it could not be read."""
    located = out.locate_many(ids)
    thumbs: dict[str, bytes | str] = {}
    for image_id in ids:
        if image_id not in located:
            thumbs[image_id] = "not found in the stats"
            continue
        try:
            thumbs[image_id] = out.dump(image_id, located[image_id])[0]
        except UserError as e:
            thumbs[image_id] = str(e)
    return thumbs


# ---------------------------------------------------------------------------------------------------------------
# the page

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1100px;
color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-top:0}table{border-collapse:collapse;margin:8px 0}
td,th{border-bottom:1px solid #eee;padding:3px 10px;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f6f6f6}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #eee;padding:6px}
.chart h3{font-size:13px;margin:0 0 4px}.groups{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:160px;font-size:12px}figure img{width:160px;height:160px;image-rendering:auto;
border:1px solid #ccc}figcaption{word-break:break-all}.dot{display:inline-block;width:10px;height:10px;
border-radius:2px;margin-right:6px}.muted{color:#888}code{font-size:12px;word-break:break-all}
"""


def _e(v) -> str:
    return html.escape("" if v is None else str(v))


def _num(v) -> str:
    if isinstance(v, float):
        return f"{v:,.2f}"
    return f"{v:,}" if isinstance(v, int) else _e(v)


def _color(status: str) -> str:
    return COLORS.get(status, OTHER_COLOR)


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    th = "".join(f'<th class="n">{_e(h)}</th>' if i in numeric else f"<th>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="n">{_num(c)}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _tick_values(lo: float, hi: float) -> list[float]:
    """1-2-5 values in [lo, hi] for a log axis (fewer when the range spans many decades)."""
    ticks = []
    for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0**e
            if lo <= v <= hi:
                ticks.append(v)
    if len(ticks) > 8:
        ticks = [t for t in ticks if str(t).lstrip("0.").startswith("1")]
    return ticks


def _short(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:g}{unit}"
    return f"{v:g}"


def _approx(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def svg_histogram(hist: LogHistogram, title: str, unit: str, width: int = 520, height: int = 200) -> str:
    """Bars on a log x axis, inline SVG; the median and 99th percentile in the title."""
    bars = hist.bars()
    if not bars:
        return f'<div class="chart"><h3>{_e(title)}</h3><p class="muted">no values</p></div>'
    left, right, top, bottom = 48, 10, 8, 28
    lo, hi = bars[0][0], bars[-1][1]
    span = math.log(hi / lo) or 1.0
    peak = max(c for _, _, c in bars)

    def x(v):
        return left + math.log(v / lo) / span * (width - left - right)

    def y(c):
        return top + (1 - c / peak) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{_e(title)}">',
             f'<line x1="{left}" y1="{y(0):.1f}" x2="{width - right}" y2="{y(0):.1f}" stroke="#444"/>']
    for a, b, c in bars:
        if c:
            parts.append(f'<rect x="{x(a) + 0.5:.1f}" y="{y(c):.1f}" width="{max(1.0, x(b) - x(a) - 1):.1f}" '
                         f'height="{y(0) - y(c):.1f}" fill="#0072B2"><title>{_e(f"{a:.4g}-{b:.4g} {unit}: {c:,}")}'
                         f"</title></rect>")
    for t in _tick_values(lo, hi):
        parts.append(f'<line x1="{x(t):.1f}" y1="{y(0):.1f}" x2="{x(t):.1f}" y2="{y(0) + 4:.1f}" stroke="#444"/>'
                     f'<text x="{x(t):.1f}" y="{height - 12}" font-size="11" text-anchor="middle">{_short(t)}</text>')
    for frac in (0.5, 1.0):
        c = peak * frac
        parts.append(f'<text x="{left - 4}" y="{y(c) + 4:.1f}" font-size="11" text-anchor="end">{_short(c)}</text>')
    parts.append(f'<text x="{width - right}" y="{height - 1}" font-size="11" text-anchor="end" fill="#666">'
                 f"{_e(unit)} (log scale)</text></svg>")
    med, p99 = hist.quantile(0.5), hist.quantile(0.99)
    stats = f"{hist.total():,} images; median ~{_approx(med)}, 99% below ~{_approx(p99)}"
    return f'<div class="chart"><h3>{_e(title)}</h3><div class="muted">{_e(stats)}</div>{"".join(parts)}</div>'


def svg_bars(items: list[tuple[str, float]], unit: str, width: int = 520, row: int = 20) -> str:
    """Horizontal labelled bars (formats, phases)."""
    if not items:
        return '<p class="muted">none</p>'
    peak = max(v for _, v in items) or 1
    label_w, height = 150, row * len(items) + 4
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for i, (label, v) in enumerate(items):
        w = (width - label_w - 90) * v / peak
        yy = 2 + i * row
        parts.append(f'<text x="{label_w - 6}" y="{yy + 13}" font-size="12" text-anchor="end">{_e(label)}</text>'
                     f'<rect x="{label_w}" y="{yy + 2}" width="{max(w, 1):.1f}" height="{row - 6}" fill="#0072B2"/>'
                     f'<text x="{label_w + w + 6:.1f}" y="{yy + 13}" font-size="12">{_e(_num(v))} {_e(unit)}</text>')
    return "".join(parts) + "</svg>"


def _status_section(found: Scan) -> str:
    statuses = sorted(found.status, key=lambda s: (s != "ok", -found.status[s], s))
    inputs = [i for i in found.inputs if any(found.by_input[(i, s)] for s in statuses)]
    if any(found.by_input[("(other)", s)] for s in statuses):
        inputs.append("(other)")
    total = sum(found.status.values()) or 1
    rows = []
    for s in statuses:
        rows.append([f'<span class="dot" style="background:{_color(s)}"></span>{_e(s)}', found.status[s],
                     f"{100 * found.status[s] / total:.2f}%"] + [found.by_input[(i, s)] for i in inputs])
    rows.append(["<b>all</b>", sum(found.status.values()), "100%"]
                + [sum(found.by_input[(i, s)] for s in statuses) for i in inputs])
    header = ["status", "images", "share"] + [f"input {k + 1}" for k in range(len(inputs))]
    legend = "".join(f"<li>input {k + 1}: <code>{_e(i)}</code></li>" for k, i in enumerate(inputs))
    bar = "".join(f'<rect x="{x:.2f}" width="{w:.2f}" height="18" fill="{_color(s)}"><title>{_e(s)}: '
                  f"{found.status[s]:,}</title></rect>"
                  for s, x, w in _stacked(statuses, found.status, total, 1000))
    return (f'<h2>Images by status</h2><svg xmlns="http://www.w3.org/2000/svg" width="100%" height="18" '
            f'viewBox="0 0 1000 18" preserveAspectRatio="none" role="img">{bar}</svg>'
            + _table(header, rows, numeric={1, 2} | set(range(3, 3 + len(inputs)))) + f"<ul>{legend}</ul>"
            + '<p class="muted">ok: packed into the shards; duplicate / near_duplicate: the same (or a near) '
              "canonical image as a packed one, packed once; excluded: matches an --exclude image; every other "
              "status: not packed, for the reason it names (schemas/image_stats.md).</p>")


def _stacked(statuses, counts, total, width):
    x = 0.0
    for s in statuses:
        w = counts[s] / total * width
        yield s, x, w
        x += w


def _splits_section(out: Output) -> str:
    m = out.manifest
    rows = []
    for split, t in m.get("totals", {}).items():
        shards = [s for s in m.get("shards", []) if s["split"] == split]
        rows.append([_e(split), t["images"], t["rows"], t["tokens"], t.get("padding_tokens", 0), len(shards),
                     f"{sum(s['bytes'] for s in shards) / 1e6:,.1f} MB"])
    return ("<h2>Splits</h2>" + _table(["split", "images", "rows", "tokens", "padding tokens", "shards", "bytes"],
                                        rows, numeric={1, 2, 3, 4, 5, 6})
            + f'<p class="muted">rows of {m.get("seq_len", "?"):,} tokens; last row: '
              f'{_e(m.get("last_row_policy", "?"))}</p>')


def _distributions_section(found: Scan) -> str:
    h = found.hist
    charts = [svg_histogram(h["tokens"], "BPE tokens per packed image (without BOS/EOS)", "tokens"),
              svg_histogram(h["bytes_per_token"], "JPEG bytes per token (packed images)", "bytes/token"),
              svg_histogram(h["source_bytes"], "source file size (every readable image)", "bytes"),
              svg_histogram(h["source_side"], "source longer side (decodable images)", "pixels")]
    formats = sorted(found.formats.items(), key=lambda kv: (-kv[1], kv[0]))
    charts.append('<div class="chart"><h3>source formats (decodable images)</h3>'
                  + svg_bars([(f, n) for f, n in formats[:12]], "images") + "</div>")
    return '<h2>Distributions</h2><div class="charts">' + "".join(charts) + "</div>"


def _groups_section(found: Scan, thumbs: dict) -> str:
    groups = found.largest_groups()
    copies = sum(n for s, n in found.status.items() if s in ("duplicate", "near_duplicate"))
    if not groups:
        note = "no duplicates in this output" if "duplicate_of" in found.columns or not copies else ""
        return f'<h2>Largest duplicate groups</h2><p class="muted">{_e(note or "none")}</p>'
    figs = []
    for kept, n in groups:
        thumb = thumbs.get(kept)
        img = (f'<img alt="{_e(kept)}" src="data:image/jpeg;base64,{base64.b64encode(thumb).decode()}">'
               if isinstance(thumb, bytes) else f'<div class="muted">{_e(thumb)}</div>')
        members = "".join(f"<br><span class='muted'>{_e(st)}:</span> {_e(i)}"
                          for st, i in found.group_members.get(kept, []))
        more = f"<br><span class='muted'>... {n - MEMBERS_SHOWN:,} more</span>" if n > MEMBERS_SHOWN else ""
        figs.append(f"<figure>{img}<figcaption><b>{n + 1:,} images</b> (kept: {_e(kept)}){members}{more}"
                    "</figcaption></figure>")
    return (f"<h2>Largest duplicate groups</h2><p>{copies:,} images are copies of a packed image; the "
            f"{len(groups)} largest groups, each shown as the canonical image that was kept (as the model sees "
            f'it, decoded from the shards):</p><div class="groups">{"".join(figs)}</div>')


def _examples_section(found: Scan) -> str:
    parts = []
    for st in sorted(s for s in found.examples if s not in ("ok", "duplicate", "near_duplicate")):
        rows = [[_e(r["id"]), f"<code>{_e(r['source'])}</code>", _e(r.get("message")),
                 _e(next((r[c] for c in MATCH_COLUMNS if r.get(c)), ""))] for r in found.examples[st]]
        header = ["id", "source", "message", "matched"]
        if not any(r[3] for r in rows):  # a failure names no other image
            header, rows = header[:3], [r[:3] for r in rows]
        parts.append(f'<h3><span class="dot" style="background:{_color(st)}"></span>{_e(st)} '
                     f'<span class="muted">({plural(found.status[st], "image")}; first {len(rows)})</span></h3>'
                     + _table(header, rows))
    body = "".join(parts) or '<p class="muted">every image was packed or is a duplicate</p>'
    return "<h2>Examples of images not packed</h2>" + body


def _timings_section(out: Output) -> str:
    s = out.summary
    if not s:
        return '<h2>Timings</h2><p class="muted">no summary.json in this output</p>'
    keys = [("wall_time_s", "wall time (s)"), ("images_this_run", "images processed by the last run"),
            ("images_per_s", "images/s"), ("cpus", "CPUs"), ("images_per_s_per_cpu", "images/s per CPU")]
    rows = [[_e(label), s[k]] for k, label in keys if k in s]
    retries = s.get("storage_retries") or {}
    rows.append(["storage retries", ", ".join(f"{k} {v:,}" for k, v in retries.items()) or "none"])
    phases = [(k, float(v)) for k, v in (s.get("phase_seconds") or {}).items()]
    return ("<h2>Timings (the run that finished the output)</h2>" + _table(["", ""], rows, numeric={1})
            + ("<h3>seconds by phase</h3>" + svg_bars(phases, "s") if phases else ""))


def render(out: Output, found: Scan, thumbs: dict) -> str:
    m = out.manifest
    codec = m.get("codec", {})
    images = sum(found.status.values())
    sub = (f"{images:,} images met, {found.status.get('ok', 0):,} packed; canonical "
           f"{codec.get('size', '?')}x{codec.get('size', '?')} q{codec.get('quality', '?')}; tokenizer vocab "
           f"{m.get('tokenizer', {}).get('vocab_size', '?')}; config {str(m.get('config_hash', ''))[:12]}")
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>jpeglm report: {_e(out.uri)}</title><style>{CSS}</style></head><body>"
            f"<h1>jpeglm preprocess report</h1><p class=\"sub\"><code>{_e(out.uri)}</code><br>{_e(sub)}</p>"
            + _status_section(found) + _splits_section(out) + _distributions_section(found)
            + _groups_section(found, thumbs) + _examples_section(found) + _timings_section(out)
            + "</body></html>\n")
