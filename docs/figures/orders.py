"""Draw every registered order's decoding step index on its token grid (docs/figures/order-*.png).

    python docs/figures/orders.py   # 8x8 grid (next_scale: msvq scales up to 8x8); s = 1, 2, 4 per order
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

from arlab.generator.layout import Layout
from arlab.config import build
from arlab.registry import get, names

CELL = 28


PATCH = {1: [1, 2, 3, 4, 6, 8], 2: [2, 4, 6, 8], 4: [4, 8]}  # msvq scales that Token-Shuffle s can fuse


def step_grids(order: str, size: int, s: int) -> list[list[list[int]]]:
    """Step index of every token of each map (one grid, or each msvq scale) when the order walks the fused cells."""
    multi = bool(get("order", order).cls.multiscale)
    scales = [(p, p) for p in PATCH[s]] if multi else [(size, size)]
    lay = Layout(scales, s)
    plan = build("order", order).plan(lay)
    step = plan.step_of_slot()
    out = [[[0] * w for _ in range(h)] for h, w in scales]
    for slot in range(plan.length):
        cell = int(plan.perm[slot])
        k, r, c = int(lay.cell_scale[cell]), int(lay.cell_row[cell]), int(lay.cell_col[cell])
        for i in range(s):
            for j in range(s):
                out[k][r * s + i][c * s + j] = int(step[slot])
    return out


def draw(grid: list[list[int]], s: int, title: str, steps: int) -> Image.Image:
    h, w = len(grid), len(grid[0])
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


def panel(grids: list[list[list[int]]], s: int, title: str) -> Image.Image:
    """One panel per map (scales side by side, coarse to fine), under one title."""
    steps = max(max(max(r) for r in g) for g in grids) + 1
    parts = [draw(g, s, "", steps) for g in grids]
    W = max(sum(p.width for p in parts) + 6 * (len(parts) - 1), 8 * len(title))
    canvas = Image.new("RGB", (W, max(p.height for p in parts)), "white")
    x = 0
    for p in parts:
        canvas.paste(p, (x, 0))
        x += p.width + 6
    ImageDraw.Draw(canvas).text((2, 2), title, fill="black")
    return canvas


def main(out_dir: str = "docs/figures", size: int = 8) -> list[Path]:
    out = []
    for order in names("order"):
        panels = []
        for s in (1, 2, 4):
            grids = step_grids(order, size, s)
            steps = max(max(max(r) for r in g) for g in grids) + 1
            panels.append(panel(grids, s, f"{order}, s={s}: {steps} steps"))
        W = max(p.width for p in panels)
        canvas = Image.new("RGB", (W, sum(p.height for p in panels) + 10 * (len(panels) - 1)), "white")
        y = 0
        for p in panels:
            canvas.paste(p, (0, y))
            y += p.height + 10
        path = Path(out_dir) / f"order-{order}.png"
        canvas.save(path)
        out.append(path)
    return out


if __name__ == "__main__":
    for p in main(*sys.argv[1:]):
        print("wrote", p)
