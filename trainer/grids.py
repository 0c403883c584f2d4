"""Image grids of samples, each cell labelled in plain words with how its sample ended.

    make_grid([[prompt, completion, original], ...], [["prompt", "complete", "original"], ...]).save("grid.png")

Labels (`ending_label`): "complete" (the model closed the image and nothing had to be fixed), "cut at N tokens"
(the token limit or the model's context ended it first; the rest of the image is grey), "repaired" (the model
closed the image, but its stream needed fixing: a header, a stray marker, restart markers out of order or missing).
"""

from __future__ import annotations

from PIL import Image, ImageDraw

LABEL_HEIGHT = 14
MIN_CELL = 128  # small images (64x64) are enlarged (nearest neighbour: pixels stay visible) so labels fit


def ending_label(stop: str, complete: bool, tokens: int) -> str:
    """How a sample ended, for a person: stop is the sampler's reason ("eos", "eoi" or "max_tokens"), complete
    the repair report's verdict, tokens the sample's length (prompt included)."""
    if stop == "max_tokens":
        return f"cut at {tokens:,} tokens"
    return "complete" if complete else "repaired"


def make_grid(rows: list[list[Image.Image]], labels: list[list[str]] | None = None, cell: int | None = None,
              gap: int = 4) -> Image.Image:
    """Rows of images as one RGB image, a label above each cell. cell: the cell size (default: the largest image,
    at least MIN_CELL)."""
    ncols = max(len(r) for r in rows)
    if cell is None:
        cell = max(MIN_CELL, *(max(im.size) for row in rows for im in row))
    label_h = LABEL_HEIGHT if labels else 0
    grid = Image.new("RGB", (ncols * (cell + gap) + gap, len(rows) * (cell + gap + label_h) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            x, y = gap + j * (cell + gap), gap + i * (cell + gap + label_h)
            if im.size != (cell, cell):
                im = im.resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(im.convert("RGB"), (x, y + label_h))
            if labels:
                draw.text((x + 2, y + 1), labels[i][j], fill=(0, 0, 0))
    return grid


def square_rows(items: list, cols: int | None = None) -> list[list]:
    """A flat list as rows of a square-ish grid."""
    import math

    cols = cols or max(1, math.ceil(math.sqrt(len(items))))
    return [items[i : i + cols] for i in range(0, len(items), cols)]
