"""Draw every registered order's decoding step index on its token grid (docs/figures/order-*.png).

    python docs/figures/orders.py            # 8x8 grid; raster and Token-Shuffle s=2, s=4 for each order
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

from arlab.registry import build, names

CELL = 28


def step_grid(order: str, h: int, w: int, s: int) -> list[list[int]]:
    """Step index of every token of an h×w grid when the order walks the (h/s, w/s) fused grid."""
    plan = build("order", order).plan(h // s, w // s)
    step = plan.step_of_slot()
    out = [[0] * w for _ in range(h)]
    for slot in range(plan.length):
        cell = int(plan.perm[slot])
        r, c = divmod(cell, w // s)
        for i in range(s):
            for j in range(s):
                out[r * s + i][c * s + j] = int(step[slot])
    return out


def draw(grid: list[list[int]], s: int, title: str) -> Image.Image:
    h, w = len(grid), len(grid[0])
    steps = max(max(r) for r in grid) + 1
    img = Image.new("RGB", (w * CELL + 1, h * CELL + 18), "white")
    d = ImageDraw.Draw(img)
    d.text((2, 2), title, fill="black")
    for r in range(h):
        for c in range(w):
            k = grid[r][c]
            shade = int(235 - 150 * k / max(steps - 1, 1))
            x0, y0 = c * CELL, 16 + r * CELL
            d.rectangle([x0, y0, x0 + CELL, y0 + CELL], fill=(shade, shade, 255), outline=(200, 200, 200))
            d.text((x0 + 5, y0 + 8), str(k), fill="black")
    for r in range(0, h + 1, s):  # window borders
        d.line([0, 16 + r * CELL, w * CELL, 16 + r * CELL], fill="black", width=2 if s > 1 else 1)
    for c in range(0, w + 1, s):
        d.line([c * CELL, 16, c * CELL, 16 + h * CELL], fill="black", width=2 if s > 1 else 1)
    return img


def main(out_dir: str = "docs/figures", size: int = 8) -> list[Path]:
    out = []
    for order in names("order"):
        panels = [draw(step_grid(order, size, size, s), s, f"{order}, s={s}: {size * size // (s * s)} slots")
                  for s in (1, 2, 4)]
        W = sum(p.width for p in panels) + 10 * (len(panels) - 1)
        canvas = Image.new("RGB", (W, max(p.height for p in panels)), "white")
        x = 0
        for p in panels:
            canvas.paste(p, (x, 0))
            x += p.width + 10
        path = Path(out_dir) / f"order-{order}.png"
        canvas.save(path)
        out.append(path)
    return out


if __name__ == "__main__":
    for p in main(*sys.argv[1:]):
        print("wrote", p)
