"""``shapes``: arlab's embedded, procedural, class-conditional image set.

The default dataset of the quickstart and the tests: generated from a seed (no download), learnable
in minutes on a CPU by a small tokenizer + AR transformer, and *checkable*: :func:`classify` is a
non-neural checker that tells which shape an image (generated or not) shows.

Content
-------
Every image is ``size x size`` RGB (default 32) with exactly one shape. The 10 classes (label order,
see :data:`CLASSES`) are all symmetric under a horizontal flip, so random flips keep the label:

    0 circle, 1 square, 2 triangle (apex up), 3 inverted triangle (apex down), 4 diamond (a square
    turned 45 degrees), 5 cross (plus sign, arm width 1/3), 6 ring (annulus, hole radius 1/2),
    7 frame (hollow square, hole 1/2), 8 horizontal bar (3:1), 9 vertical bar (1:3)

* size word: ``small`` / ``medium`` / ``large``: the shape's larger extent is uniform in
  [10, 15), [15, 20) or [20, 26) pixels at 32 px, scaled by ``size / 32``;
* position: the centre is uniform (sub-pixel) with the shape's box at least 1 px inside the image;
  the position word is the 3x3 cell (thirds of the image) holding the centre: ``top left``,
  ``top``, ``top right``, ``left``, ``center``, ``right``, ``bottom left``, ``bottom``,
  ``bottom right``;
* colour: one of :data:`COLOURS` (8 saturated colours), jittered by at most 10 per channel;
* background: a muted (near-grey) colour, ``uniform`` or a gentle linear ``gradient`` between two
  muted colours in a random direction; every background pixel is at least :data:`MIN_CONTRAST` (RGB
  Euclidean distance) from the shape colour (the background is resampled until it is);
* edges are anti-aliased: the mask is rendered 4x supersampled and area-downsampled.

Caption grammar: ``"a {size} {colour} {shape} {preposition} {position}"`` with the preposition
``in the`` for corners and the centre, ``at the`` for top/bottom and ``on the`` for left/right, e.g.
``"a small red triangle in the top left"``, ``"a large blue ring at the bottom"``,
``"a medium cyan horizontal bar on the left"``.

Determinism: sample ``i`` of seed ``s`` draws from ``np.random.default_rng([s, i])`` only, so it
depends on ``(s, i)`` alone (any order, any number of processes); its label is ``i % 10``. The
``train`` split holds indices ``0 .. n_train - 1``; the ``test`` split holds indices
``TEST_START + j`` (``TEST_START = 10**9``), a disjoint range of the same seed.

The checker
-----------
:func:`classify` / :func:`classify_batch` (numpy only, vectorised over the batch):

1. background model: a plane ``a + b*x + c*y`` per channel, fitted by least squares to the border
   pixels, refitted once without the border pixels it explains badly;
2. foreground: the RGB distance to the background model, thresholded by Otsu's method (at least
   ``24``; an image whose largest distance is below ``40`` is blank and gets class 0); a soft
   mask rescales the distance between the background and foreground levels to [0, 1];
3. the largest 4-connected foreground component (label propagation with pointer jumping);
4. its soft mask, cropped to a square around the component's box (side = the larger box side, so
   aspect ratio is kept), resampled to 16x16 and averaged with its mirror image (flip invariance);
5. the nearest (L2) of 90 templates, one per class, size word and blur level (sharp, 3x3 box blur,
   twice blurred: generated images are often soft), each the mean of step 4 over images rendered
   by :func:`render` at the queried image size (built once per size in about a second, cached).

Measured on 3000 fresh 32 px images: 99.97% correct (flipped: the same), 99.9% after Gaussian noise
(sigma 8) and a 3x3 box blur; about 3000 images/s per core for :func:`classify_batch`.

Longer than 400 lines because the renderer and the checker share the geometry (the checker's templates
are rendered by the same code), so they must change together.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from arlab.data.shards import MANIFEST, ShardWriter, add_split, new_manifest, read_manifest, write_manifest
from arlab.errors import DataError
from arlab.utils import FileLock

CLASSES: list[str] = [
    "circle", "square", "triangle", "inverted triangle", "diamond",
    "cross", "ring", "frame", "horizontal bar", "vertical bar",
]
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 190, 60),
    "cyan": (30, 200, 220),
    "blue": (40, 80, 230),
    "purple": (140, 60, 210),
    "magenta": (230, 50, 180),
}
SIZES: dict[str, tuple[float, float]] = {"small": (10.0, 15.0), "medium": (15.0, 20.0), "large": (20.0, 26.0)}
POSITIONS: list[list[str]] = [
    ["top left", "top", "top right"],
    ["left", "center", "right"],
    ["bottom left", "bottom", "bottom right"],
]
TEST_START = 10**9  # the test split uses indices TEST_START + j (same seed, disjoint from train)
MIN_CONTRAST = 100.0  # minimum RGB distance between the shape colour and any background pixel
GENERATOR_VERSION = 1
HOLE = 0.5  # inner / outer size of ring and frame
SUPERSAMPLE = 4
_COLOUR_JITTER = 10
_PREPOSITION = {"top": "at the", "bottom": "at the", "left": "on the", "right": "on the"}


@dataclass
class ShapeSample:
    """One generated image: ``image`` (H, W, 3) uint8, ``label`` in range(10), ``caption``, ``meta``.

    ``meta`` keys: ``index``, ``seed``, ``shape`` (class name), ``label``, ``colour`` (name), ``rgb``,
    ``size`` (size word), ``extent`` (px), ``position`` (position word), ``center`` (x, y),
    ``bbox`` (x0, y0, x1, y1 in pixel units, pixel j spans [j, j + 1)), ``background``
    (``uniform`` or ``gradient``) and ``bg_colours`` (one or two RGB triples).
    """

    image: np.ndarray
    label: int
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- rendering


def _box_size(label: int, extent: float) -> tuple[float, float]:
    """Width and height of a class's bounding box for a given (larger) extent."""
    name = CLASSES[label]
    if name == "horizontal bar":
        return extent, extent / 3.0
    if name == "vertical bar":
        return extent / 3.0, extent
    return extent, extent


def _shape_mask(label: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test in box coordinates: u, v in [-1, 1] span the box; v = -1 is the top."""
    name = CLASSES[label]
    au, av = np.abs(u), np.abs(v)
    box = (au <= 1.0) & (av <= 1.0)
    if name == "circle":
        return u * u + v * v <= 1.0
    if name in ("square", "horizontal bar", "vertical bar"):
        return box
    if name == "triangle":
        return box & (au <= (v + 1.0) / 2.0)
    if name == "inverted triangle":
        return box & (au <= (1.0 - v) / 2.0)
    if name == "diamond":
        return au + av <= 1.0
    if name == "cross":
        return box & ((au <= 1.0 / 3.0) | (av <= 1.0 / 3.0))
    if name == "ring":
        rr = u * u + v * v
        return (rr <= 1.0) & (rr > HOLE * HOLE)
    if name == "frame":
        return box & (np.maximum(au, av) > HOLE)
    raise AssertionError(name)


def _coverage(label: int, cx: float, cy: float, w: float, h: float, size: int) -> np.ndarray:
    """(size, size) float32 area coverage of the shape, rendered SUPERSAMPLE x and area-averaged."""
    cov = np.zeros((size, size), np.float32)
    px0, px1 = max(int(np.floor(cx - w / 2)), 0), min(int(np.ceil(cx + w / 2)), size)
    py0, py1 = max(int(np.floor(cy - h / 2)), 0), min(int(np.ceil(cy + h / 2)), size)
    ss = SUPERSAMPLE
    xs = px0 + (np.arange((px1 - px0) * ss) + 0.5) / ss
    ys = py0 + (np.arange((py1 - py0) * ss) + 0.5) / ss
    u = ((xs - cx) / (w / 2))[None, :]
    v = ((ys - cy) / (h / 2))[:, None]
    inside = _shape_mask(label, u, v).astype(np.float32)
    cov[py0:py1, px0:px1] = inside.reshape(py1 - py0, ss, px1 - px0, ss).mean(axis=(1, 3))
    return cov


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation colour: a grey level in [35, 220] with a tint of at most 22 per channel."""
    return np.clip(rng.uniform(35.0, 220.0) + rng.uniform(-22.0, 22.0, 3), 0.0, 255.0)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, list[np.ndarray]]:
    """(size, size, 3) float64 background: uniform or a gentle linear gradient of muted colours."""
    c0 = _muted(rng)
    if rng.random() < 0.5:
        return np.broadcast_to(c0, (size, size, 3)), "uniform", [c0]
    c1 = np.clip(c0 + rng.uniform(-70.0, 70.0) + rng.uniform(-15.0, 15.0, 3), 0.0, 255.0)
    theta = rng.uniform(0.0, 2 * np.pi)
    coords = np.arange(size) + 0.5
    proj = coords[None, :] * np.cos(theta) + coords[:, None] * np.sin(theta)  # (H, W), x along columns
    t = (proj - proj.min()) / (proj.max() - proj.min())
    return c0 + (c1 - c0) * t[..., None], "gradient", [c0, c1]


def _position_word(cx: float, cy: float, size: int) -> str:
    col = min(int(3 * cx / size), 2)
    row = min(int(3 * cy / size), 2)
    return POSITIONS[row][col]


def caption_for(size_word: str, colour: str, shape: str, position: str) -> str:
    """The caption grammar (see the module docstring)."""
    return f"a {size_word} {colour} {shape} {_PREPOSITION.get(position, 'in the')} {position}"


def class_from_caption(caption: str) -> int:
    """The class a caption asks for: the longest class name it contains (``inverted triangle`` before
    ``triangle``); -1 if none."""
    text = f" {caption.lower()} "
    hits = [(len(name), i) for i, name in enumerate(CLASSES) if f" {name} " in text]
    return max(hits)[1] if hits else -1


def render(index: int, seed: int = 0, size: int = 32) -> ShapeSample:
    """Sample ``index`` of the dataset with ``seed`` at ``size`` px; depends on (seed, index) only."""
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be >= 0, got index={index}, seed={seed}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    rng = np.random.default_rng([seed, index])
    label = index % len(CLASSES)
    scale = size / 32.0
    size_word = list(SIZES)[int(rng.integers(len(SIZES)))]
    lo, hi = SIZES[size_word]
    extent = rng.uniform(lo, hi) * scale
    w, h = _box_size(label, extent)
    cx = rng.uniform(1.0 + w / 2, size - 1.0 - w / 2)
    cy = rng.uniform(1.0 + h / 2, size - 1.0 - h / 2)
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    rgb = np.clip(np.array(COLOURS[colour], np.float64)
                  + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3), 0, 255)
    for _ in range(100):
        bg, kind, bg_colours = _background(rng, size)
        if np.sqrt(((bg - rgb) ** 2).sum(-1)).min() >= MIN_CONTRAST:
            break
    else:  # deterministic fallback (never needed with the palette above): black or white
        c = np.zeros(3) if rgb.sum() > 3 * 127.5 else np.full(3, 255.0)
        bg, kind, bg_colours = np.broadcast_to(c, (size, size, 3)), "uniform", [c]
    alpha = _coverage(label, cx, cy, w, h, size)[..., None]
    image = np.rint(bg * (1.0 - alpha) + rgb * alpha).astype(np.uint8)
    position = _position_word(cx, cy, size)
    shape = CLASSES[label]
    meta = {
        "index": int(index), "seed": int(seed), "shape": shape, "label": int(label), "colour": colour,
        "rgb": [int(x) for x in rgb], "size": size_word, "extent": round(float(extent), 3),
        "position": position, "center": [round(float(cx), 3), round(float(cy), 3)],
        "bbox": [round(float(v), 3) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)],
        "background": kind, "bg_colours": [[int(round(float(x))) for x in c] for c in bg_colours],
    }
    return ShapeSample(image, int(label), caption_for(size_word, colour, shape, position), meta)


def generate(n: int, seed: int = 0, size: int = 32, start: int = 0) -> Iterator[ShapeSample]:
    """Samples ``start .. start + n - 1`` (``render`` of each index)."""
    for i in range(start, start + n):
        yield render(i, seed, size)


# ----------------------------------------------------------------------------- the checker

_GRID = 16  # feature resolution
_SUB = 2  # sub-samples per grid cell and axis
_MARGIN = 1.15  # the sampled square is this much larger than the component's box
_MIN_THRESHOLD = 24.0
_BLANK = 40.0
_TEMPLATES: dict[int, tuple[np.ndarray, np.ndarray]] = {}
_TEMPLATE_SEED = 7_777_777
_TEMPLATES_PER_CLASS = 60


def _fit_background(x: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) float32 -> (N, H, W, 3) background model: a plane per channel fitted to the border."""
    n, hgt, wid, _ = x.shape
    border = np.zeros((hgt, wid), bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    ys, xs = np.nonzero(border)
    a = np.stack([np.ones(len(xs)), (xs + 0.5) / wid - 0.5, (ys + 0.5) / hgt - 0.5], 1)  # (B, 3)
    b = x[:, ys, xs, :].astype(np.float64)  # (N, B, 3)
    coef = np.einsum("kb,nbc->nkc", np.linalg.pinv(a), b)  # (N, 3, 3)
    # one robust refit: drop border pixels the plane explains badly (a shape or noise touching it)
    res = np.sqrt(((np.einsum("bk,nkc->nbc", a, coef) - b) ** 2).sum(-1))  # (N, B)
    keep = (res <= np.maximum(3.0 * np.median(res, axis=1, keepdims=True), 12.0)).astype(np.float64)
    ata = np.einsum("bk,nb,bl->nkl", a, keep, a) + 1e-6 * np.eye(3)
    atb = np.einsum("bk,nb,nbc->nkc", a, keep, b)
    coef = np.linalg.solve(ata, atb)
    gy, gx = np.meshgrid((np.arange(hgt) + 0.5) / hgt - 0.5, (np.arange(wid) + 0.5) / wid - 0.5,
                         indexing="ij")
    return (coef[:, 0, None, None, :] + coef[:, 1, None, None, :] * gx[None, :, :, None]
            + coef[:, 2, None, None, :] * gy[None, :, :, None])


def _otsu(d: np.ndarray, bins: int = 256, top: float = 450.0) -> np.ndarray:
    """Per-image Otsu threshold of (N, P) non-negative values -> (N,)."""
    n = d.shape[0]
    idx = np.clip((d * (bins / top)).astype(np.int64), 0, bins - 1)
    hist = np.bincount((idx + bins * np.arange(n)[:, None]).ravel(), minlength=n * bins).reshape(n, bins)
    p = hist / hist.sum(1, keepdims=True)
    centres = (np.arange(bins) + 0.5) * (top / bins)
    w0 = np.cumsum(p, 1)
    mu = np.cumsum(p * centres, 1)
    mu_t = mu[:, -1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        sb = (mu_t * w0 - mu) ** 2 / (w0 * (1.0 - w0))
    sb = np.nan_to_num(sb, nan=-1.0, posinf=-1.0)
    return (np.argmax(sb, 1) + 1) * (top / bins)  # upper edge of the last background bin


def _largest_component(fg: np.ndarray) -> np.ndarray:
    """(N, H, W) bool -> (N, H, W) bool: the largest 4-connected component of each image.

    Label propagation: every foreground pixel starts with its own flat index as label and repeatedly
    takes the smallest label among itself and its 4 neighbours, then follows its label's label (pointer
    jumping); only the images that still change are iterated.
    """
    n, hgt, wid = fg.shape
    hw = hgt * wid
    sentinel = np.int32(hw)  # the label of background pixels
    lab = np.where(fg, np.arange(hw, dtype=np.int32).reshape(1, hgt, wid), sentinel)
    active = np.arange(n)
    while active.size:
        cur, f = lab[active], fg[active]
        m = cur.copy()
        np.minimum(m[:, 1:], cur[:, :-1], out=m[:, 1:])
        np.minimum(m[:, :-1], cur[:, 1:], out=m[:, :-1])
        np.minimum(m[:, :, 1:], cur[:, :, :-1], out=m[:, :, 1:])
        np.minimum(m[:, :, :-1], cur[:, :, 1:], out=m[:, :, :-1])
        m = np.where(f, m, sentinel).reshape(len(active), hw)
        ext = np.concatenate([m, np.full((len(active), 1), sentinel, np.int32)], 1)
        m = np.take_along_axis(ext, m, 1).reshape(cur.shape)  # pointer jumping
        changed = (m != cur).reshape(len(active), -1).any(1)
        lab[active] = m
        active = active[changed]
    flat = lab.reshape(n, hw).astype(np.int64) + (np.arange(n) * (hw + 1))[:, None]
    counts = np.bincount(flat.ravel(), minlength=n * (hw + 1)).reshape(n, hw + 1)[:, :hw]
    best = np.where(counts.max(1) > 0, counts.argmax(1), -1)  # ties: the smallest label
    return fg & (lab == best[:, None, None])


def _dilate(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    out[:, :, 1:] |= m[:, :, :-1]
    out[:, :, :-1] |= m[:, :, 1:]
    return out


def features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 -> (features (N, 16*16) float32, blank (N,) bool): the checker's steps 1-4."""
    x = np.asarray(images, np.float32)
    n, hgt, wid, _ = x.shape
    d = np.sqrt(((x - _fit_background(x)) ** 2).sum(-1)).astype(np.float32)  # (N, H, W)
    flat = d.reshape(n, -1)
    thr = np.maximum(_otsu(flat), _MIN_THRESHOLD)
    blank = flat.max(1) < _BLANK
    fg = d > thr[:, None, None]
    fgf = fg.reshape(n, -1)
    nf, nb = fgf.sum(1), (~fgf).sum(1)
    hi = np.where(nf > 0, (flat * fgf).sum(1) / np.maximum(nf, 1), thr * 2)
    hi = np.maximum(hi, thr)  # foreground level: the mean distance of the foreground
    lo = np.where(nb > 0, (flat * ~fgf).sum(1) / np.maximum(nb, 1), 0.0)  # background level
    soft = np.clip((d - lo[:, None, None]) / np.maximum(hi - lo, 1e-3)[:, None, None], 0.0, 1.0)
    comp = _largest_component(fg)
    blank |= ~comp.reshape(n, -1).any(1)
    soft = soft * _dilate(comp)
    rows, cols = comp.any(2), comp.any(1)  # (N, H), (N, W)
    ar_h, ar_w = np.arange(hgt), np.arange(wid)
    y0 = np.where(rows, ar_h, hgt).min(1)
    y1 = np.where(rows, ar_h, -1).max(1) + 1
    x0 = np.where(cols, ar_w, wid).min(1)
    x1 = np.where(cols, ar_w, -1).max(1) + 1
    cx, cy = (x0 + x1) / 2.0, (y0 + y1) / 2.0
    side = np.maximum(np.maximum(x1 - x0, y1 - y0), 1) * _MARGIN
    g = _GRID * _SUB
    t = (np.arange(g) + 0.5) / g - 0.5  # (g,)
    sx = cx[:, None] + t[None, :] * side[:, None] - 0.5  # (N, g) in pixel-centre coordinates
    sy = cy[:, None] + t[None, :] * side[:, None] - 0.5
    pad = np.pad(soft, ((0, 0), (1, 1), (1, 1)))
    fx0, fy0 = np.floor(sx), np.floor(sy)
    ax, ay = (sx - fx0).astype(np.float32), (sy - fy0).astype(np.float32)
    ix0 = np.clip(fx0.astype(np.int64) + 1, 0, wid + 1)
    ix1 = np.clip(fx0.astype(np.int64) + 2, 0, wid + 1)
    iy0 = np.clip(fy0.astype(np.int64) + 1, 0, hgt + 1)
    iy1 = np.clip(fy0.astype(np.int64) + 2, 0, hgt + 1)
    bi = np.arange(n)[:, None, None]

    def at(iy: np.ndarray, ix: np.ndarray) -> np.ndarray:
        return pad[bi, iy[:, :, None], ix[:, None, :]]  # (N, g, g)

    top = at(iy0, ix0) * (1 - ax[:, None, :]) + at(iy0, ix1) * ax[:, None, :]
    bot = at(iy1, ix0) * (1 - ax[:, None, :]) + at(iy1, ix1) * ax[:, None, :]
    samp = top * (1 - ay[:, :, None]) + bot * ay[:, :, None]
    f = samp.reshape(n, _GRID, _SUB, _GRID, _SUB).mean((2, 4))
    f = (f + f[:, :, ::-1]) / 2.0  # flip invariance
    return f.reshape(n, -1).astype(np.float32), blank


def _box_blur(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> the same blurred by a 3x3 box filter (edges replicated)."""
    h, w = images.shape[1:3]
    pad = np.pad(images.astype(np.float32), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    out = sum(pad[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0
    return np.rint(out).astype(np.uint8)


def _templates(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(T, 256) template features and their (T,) labels for images of ``size`` px (cached)."""
    if size not in _TEMPLATES:
        k = _TEMPLATES_PER_CLASS * len(CLASSES)
        samples = [render(i, _TEMPLATE_SEED, size) for i in range(k)]
        images = np.stack([s.image for s in samples])
        words = list(SIZES)
        group = np.array([s.label * len(words) + words.index(s.meta["size"]) for s in samples])
        temps, labels = [], []
        soft = _box_blur(images)
        for variant in (images, soft, _box_blur(soft)):  # sharp and blurred (generated images are often soft)
            feats, _ = features(variant)
            for gi in np.unique(group):
                temps.append(feats[group == gi].mean(0))
                labels.append(gi // len(words))
        _TEMPLATES[size] = (np.stack(temps).astype(np.float32), np.array(labels, np.int64))
    return _TEMPLATES[size]


def classify_batch(images: np.ndarray, chunk: int = 512) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N,) int64 class indices (a blank image gets 0). See the module docstring."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {images.shape}")
    n = images.shape[0]
    out = np.zeros(n, np.int64)
    if n == 0:
        return out
    temps, tlabels = _templates(max(16, int(round((images.shape[1] * images.shape[2]) ** 0.5))))
    t2 = (temps**2).sum(1)
    for s in range(0, n, chunk):
        f, blank = features(images[s:s + chunk])
        dist = (f**2).sum(1, keepdims=True) - 2.0 * f @ temps.T + t2[None, :]
        pred = tlabels[np.argmin(dist, 1)]
        out[s:s + chunk] = np.where(blank, 0, pred)
    return out


def classify(image: np.ndarray) -> int:
    """(H, W, 3) uint8 -> class index in range(10); non-neural (see the module docstring)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    return int(classify_batch(image[None])[0])


# ----------------------------------------------------------------------------- shards


def _png(image: np.ndarray) -> bytes:

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _generator_block(seed: int, size: int, n_train: int, n_test: int) -> dict[str, int]:
    return {"version": GENERATOR_VERSION, "seed": int(seed), "size": int(size), "n_train": int(n_train),
            "n_test": int(n_test)}


def write_shapes(out_dir: str | os.PathLike, n_train: int = 10000, n_test: int = 1000, seed: int = 0,
                 size: int = 32, shard_size: int = 1000, progress: bool = False) -> dict:
    """Write shards into ``out_dir`` (``train/``, ``test/``, ``dataset.json``); returns the manifest.

    ``train`` holds indices ``0 .. n_train - 1``, ``test`` indices ``TEST_START + j``. Sample keys are the
    zero-padded index (10 digits); each sample has ``png``, ``cls``, ``txt`` (caption) and ``json`` (meta).
    Old ``shard-*.tar`` files in the split folders are removed first.
    """

    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the manifest is written last: no stale one in between
    manifest = new_manifest("shapes", CLASSES, source="arlab.data.shapes", seed=seed, shard_size=shard_size,
                            captions=True, generator=_generator_block(seed, size, n_train, n_test))
    bar = None
    if progress:

        bar = tqdm(total=n_train + n_test, unit="img", desc="shapes", smoothing=0.1)
    try:
        for split, start, count in (("train", 0, n_train), ("test", TEST_START, n_test)):
            split_dir = out / split
            if split_dir.is_dir():
                for old in list(split_dir.glob("shard-*.tar")) + list(split_dir.glob("shard-*.tar.tmp")):
                    old.unlink()
            per_class = dict.fromkeys(CLASSES, 0)
            with ShardWriter(split_dir, shard_size=shard_size) as writer:
                for s in generate(count, seed, size, start):
                    writer.write({"__key__": f"{s.meta['index']:010d}", "png": _png(s.image), "cls": s.label,
                                  "txt": s.caption, "json": s.meta})
                    per_class[CLASSES[s.label]] += 1
                    if bar is not None:
                        bar.update(1)
            add_split(manifest, split, writer.shards, per_class, {f"{size}x{size}": count} if count else {})
    finally:
        if bar is not None:
            bar.close()
    write_manifest(out, manifest)
    return manifest


def _is_current(root: Path, generator: dict[str, int], shard_size: int) -> bool:

    try:
        m = read_manifest(root)
    except (DataError, OSError, ValueError):
        return False
    return (m.get("name") == "shapes" and m.get("generator") == generator
            and m.get("shard_size") == shard_size and m.get("classes") == CLASSES)


def ensure_shapes(root: str | os.PathLike, n_train: int = 10000, n_test: int = 1000, seed: int = 0,
                  size: int = 32, shard_size: int = 1000) -> Path:
    """Make sure ``root`` holds the shapes set with these parameters (generate it if not); returns ``root``.

    Safe for concurrent callers (e.g. DDP ranks): the set is written into a temporary sibling folder and
    renamed into place; a caller that loses the race uses the winner's folder. A folder with other
    parameters (or a broken one) is replaced.
    """
    root = Path(root)
    generator = _generator_block(seed, size, n_train, n_test)
    if _is_current(root, generator, shard_size):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(root.parent / f".{root.name}.lock"):
        if _is_current(root, generator, shard_size):  # another process made it while we waited
            return root
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = root.parent / f".{root.name}.tmp-{tag}"
        try:
            write_shapes(tmp, n_train=n_train, n_test=n_test, seed=seed, size=size, shard_size=shard_size)
            if _is_current(root, generator, shard_size):  # lost the race: use the winner's folder
                return root
            if root.exists():  # stale: move it aside first (a rename is atomic, a delete is not)
                trash = root.parent / f".{root.name}.old-{tag}"
                try:
                    os.replace(root, trash)
                except FileNotFoundError:
                    pass
                else:
                    shutil.rmtree(trash, ignore_errors=True)
            try:
                os.replace(tmp, root)
            except OSError:  # someone else installed theirs in between
                if not _is_current(root, generator, shard_size):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
