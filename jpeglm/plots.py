"""Small PNG charts drawn with PIL.ImageDraw (no matplotlib: it would pull in plain Pillow over pillow-simd).

    line_plot({"train": (steps, losses), "validation": (val_steps, val_losses)}, "loss.png",
              title="loss", xlabel="step", ylabel="nats/token")
    line_plot({"raw": (steps, losses), "smoothed": (steps, ema(losses))}, "loss.png", faint={"raw"})
    histogram(values, "sizes.png", title="body size", xlabel="bytes")
"""

from __future__ import annotations

import math
from typing import Collection, Mapping, Sequence

# Colour-blind-safe palette (Okabe-Ito).
COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000"]


def ema(values: Sequence[float], span: float | None = None) -> list[float]:
    """Exponential moving average with bias correction (so it starts at the first value, not at 0), as TensorBoard
    smooths. span: the averaging window in points (weight 1 - 2 / (span + 1)); default ~5% of the points. NaN values
    (e.g. a step of padding only) are skipped: the average carries over them."""
    span = span or max(1.0, len(values) / 20)
    alpha = 2.0 / (span + 1.0)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        v = float(v)
        if math.isfinite(v):
            avg = (1 - alpha) * avg + alpha * v
            weight = (1 - alpha) * weight + alpha
        out.append(avg / weight if weight else float("nan"))
    return out


def _faint(hex_color: str, keep: float = 0.35) -> str:
    """The colour mixed with white: what a raw series drawn under its smoothed line looks like."""
    rgb = [int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(255 - (255 - c) * keep):02x}" for c in rgb)


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:g}" if abs(v) >= 1 else f"{v:.3g}"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow builds without FreeType take no size
        return ImageFont.load_default()


def _frame(size, title, xlabel, ylabel, xlo, xhi, ylo, yhi, log_y=False):
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(18), _font(13)
    left, right, top, bottom = 80, 30, 45, 60
    box = (left, top, w - right, h - bottom)

    def tx(x):
        return box[0] + (x - xlo) / ((xhi - xlo) or 1) * (box[2] - box[0])

    def fy(y):
        return math.log10(y) if log_y else y

    flo, fhi = fy(ylo), fy(yhi)

    def ty(y):
        return box[3] - (fy(y) - flo) / ((fhi - flo) or 1) * (box[3] - box[1])

    draw.rectangle(box, outline="black")
    for t in nice_ticks(xlo, xhi):
        x = tx(t)
        draw.line([(x, box[3]), (x, box[3] + 5)], fill="black")
        draw.line([(x, box[1]), (x, box[3])], fill="#e5e5e5")
        draw.text((x, box[3] + 8), _fmt(t), fill="black", font=small, anchor="ma")
    yticks = [10**k for k in range(math.floor(flo), math.ceil(fhi) + 1)] if log_y else nice_ticks(ylo, yhi)
    for t in yticks:
        if not ylo <= t <= yhi:
            continue
        y = ty(t)
        draw.line([(box[0] - 5, y), (box[0], y)], fill="black")
        draw.line([(box[0], y), (box[2], y)], fill="#e5e5e5")
        draw.text((box[0] - 8, y), _fmt(t), fill="black", font=small, anchor="rm")
    draw.rectangle(box, outline="black")
    draw.text((w / 2, 12), title, fill="black", font=font, anchor="ma")
    draw.text(((box[0] + box[2]) / 2, h - 22), xlabel, fill="black", font=small, anchor="ma")
    label = Image.new("RGB", (max(1, int(draw.textlength(ylabel, font=small)) + 4), 18), "white")
    ImageDraw.Draw(label).text((2, 1), ylabel, fill="black", font=small)
    label = label.rotate(90, expand=True)
    img.paste(label, (8, int((box[1] + box[3]) / 2 - label.size[1] / 2)))
    return img, draw, tx, ty, box


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    log_y: bool = False,
    size: tuple[int, int] = (960, 540),
    faint: Collection[str] = (),
) -> str:
    """Draw each named (xs, ys) series as a line (a single point as a dot) and save a PNG at path. Series named in
    `faint` are drawn first, thin and pale, in the colour of the series that follows them (raw under smoothed)."""
    pts = {
        name: [(float(x), float(y)) for x, y in zip(xs, ys) if math.isfinite(float(y)) and (not log_y or float(y) > 0)]
        for name, (xs, ys) in series.items()
    }
    all_x = [x for p in pts.values() for x, _ in p]
    all_y = [y for p in pts.values() for _, y in p]
    if not all_x:
        all_x, all_y = [0.0, 1.0], [1.0, 2.0]
    xlo, xhi = min(all_x), max(all_x)
    ylo, yhi = min(all_y), max(all_y)
    if not log_y:
        pad = (yhi - ylo) * 0.05 or abs(yhi) * 0.05 or 1.0
        ylo, yhi = ylo - pad, yhi + pad
    img, draw, tx, ty, box = _frame(size, title, xlabel, ylabel, xlo, xhi, ylo, yhi, log_y)
    small = _font(13)
    # A faint series shares the colour of the next full one; faint ones are drawn first so full lines stay on top.
    colors, k = {}, 0
    for name in pts:
        colors[name] = COLORS[k % len(COLORS)]
        k += name not in faint
    order = [n for n in pts if n in faint] + [n for n in pts if n not in faint]
    for name in order:
        p, pale = pts[name], name in faint
        color = _faint(colors[name]) if pale else colors[name]
        xy = [(tx(x), ty(y)) for x, y in p]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=1 if pale else 2)
        for x, y in xy if len(xy) <= 50 and not pale else []:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
    for i, name in enumerate(pts):
        color = _faint(colors[name]) if name in faint else colors[name]
        ly = box[1] + 10 + 20 * i
        draw.line([(box[2] - 170, ly + 7), (box[2] - 145, ly + 7)], fill=color, width=3)
        draw.text((box[2] - 138, ly), name, fill="black", font=small)
    img.save(path)
    return path


def histogram(values: Sequence[float], path: str, title: str = "", xlabel: str = "", bins: int = 50,
              size: tuple[int, int] = (960, 540)) -> str:
    """Bar chart of value counts in `bins` equal-width bins; saves a PNG at path."""
    vals = [float(v) for v in values if math.isfinite(float(v))]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    width = (hi - lo) / bins
    counts = [0] * bins
    for v in vals:
        counts[min(bins - 1, int((v - lo) / width))] += 1
    img, draw, tx, ty, _ = _frame(size, title, xlabel, "count", lo, hi, 0, max(counts) * 1.05 or 1)
    for i, c in enumerate(counts):
        if c:
            draw.rectangle([tx(lo + i * width) + 1, ty(c), tx(lo + (i + 1) * width) - 1, ty(0)], fill=COLORS[0])
    img.save(path)
    return path
