"""The embedded ``shapes`` set: determinism, content, captions, the checker, shards and ensure_shapes."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arlab.data import shapes
from arlab.data.shapes import (
    CLASSES,
    COLOURS,
    SIZES,
    TEST_START,
    ShapeSample,
    classify,
    classify_batch,
    ensure_shapes,
    generate,
    render,
    write_shapes,
)
from arlab.data.shards import iter_shard, read_manifest

POSITION_GRID = [["top left", "top", "top right"], ["left", "center", "right"],
                 ["bottom left", "bottom", "bottom right"]]
N_CHECK = 2000  # fresh images for the checker's accuracy


@pytest.fixture(scope="module")
def fresh() -> tuple[np.ndarray, np.ndarray, list[ShapeSample]]:
    """(N, 32, 32, 3) images, (N,) labels and the samples of a seed no other test uses."""
    samples = list(generate(N_CHECK, seed=2024, start=5_000))
    return np.stack([s.image for s in samples]), np.array([s.label for s in samples]), samples


def box_blur(images: np.ndarray) -> np.ndarray:
    h, w = images.shape[1:3]
    pad = np.pad(images.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(pad[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def files_and_mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- classes and samples


def test_classes_are_ten_distinct_names():
    assert len(CLASSES) == 10 and len(set(CLASSES)) == 10
    assert CLASSES[8] == "horizontal bar" and CLASSES[9] == "vertical bar"
    assert len(COLOURS) >= 8


@pytest.mark.parametrize("size", [32, 64])
def test_image_dtype_shape_and_labels(size):
    samples = list(generate(40, seed=3, size=size))
    for i, s in enumerate(samples):
        assert isinstance(s, ShapeSample)
        assert s.image.dtype == np.uint8 and s.image.shape == (size, size, 3)
        assert s.label == i % 10 and s.meta["label"] == s.label and s.meta["shape"] == CLASSES[s.label]
        json.dumps(s.meta)  # JSON-serialisable (it goes into the shards)
    assert np.bincount([s.label for s in samples], minlength=10).tolist() == [4] * 10


@pytest.mark.parametrize("size", [32, 64])
def test_shape_inside_image_with_margin_and_contrast(size):
    scale = size / 32
    for s in generate(200, seed=11, size=size):
        x0, y0, x1, y1 = s.meta["bbox"]
        assert x0 >= 1 - 1e-3 and y0 >= 1 - 1e-3 and x1 <= size - 1 + 1e-3 and y1 <= size - 1 + 1e-3, s.meta
        lo, hi = SIZES[s.meta["size"]]
        assert lo * scale - 1e-3 <= max(x1 - x0, y1 - y0) <= hi * scale + 1e-3, s.meta
        img = s.image.astype(np.float64)
        rgb = np.array(s.meta["rgb"], np.float64)
        dist = np.sqrt(((img - rgb) ** 2).sum(-1))
        # the 1 px border is pure background: far from the shape colour (the contrast guarantee)
        border = np.concatenate([dist[0], dist[-1], dist[:, 0], dist[:, -1]])
        assert border.min() >= shapes.MIN_CONTRAST - 1.0, s.meta
        assert dist.min() <= 1.0, s.meta  # the shape is really drawn in its colour
        assert s.meta["background"] in ("uniform", "gradient")
        if s.meta["background"] == "uniform":
            assert np.all(s.image[0, 0] == s.image[-1, -1])


def test_backgrounds_colours_sizes_and_positions_vary():
    metas = [s.meta for s in generate(300, seed=0)]
    assert {m["background"] for m in metas} == {"uniform", "gradient"}
    assert {m["colour"] for m in metas} == set(COLOURS)
    assert {m["size"] for m in metas} == set(SIZES)
    assert len({m["position"] for m in metas}) == 9


def test_antialiased_edges():
    s = render(0, seed=0)  # a circle: edge pixels are mixtures of shape and background
    rgb = np.array(s.meta["rgb"], np.float64)
    dist = np.sqrt(((s.image.astype(np.float64) - rgb) ** 2).sum(-1))
    partial = (dist > 5) & (dist < shapes.MIN_CONTRAST - 5)
    assert partial.sum() >= 8


# ----------------------------------------------------------------------------- determinism


def test_render_is_deterministic_and_seeded():
    a, b = render(17, seed=5), render(17, seed=5)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption and a.meta == b.meta
    assert not np.array_equal(render(17, seed=6).image, a.image)
    assert not np.array_equal(render(27, seed=5).image, a.image)  # same class, other index


def test_generate_start_matches_render():
    got = list(generate(5, seed=9, start=123))
    for k, s in enumerate(got):
        ref = render(123 + k, seed=9)
        assert np.array_equal(s.image, ref.image) and s.caption == ref.caption and s.label == ref.label


def test_render_rejects_bad_arguments():
    with pytest.raises(ValueError):
        render(-1)
    with pytest.raises(ValueError):
        render(0, size=8)


# ----------------------------------------------------------------------------- captions


def test_captions_name_class_colour_size_and_position():
    for s in generate(200, seed=1):
        m = s.meta
        assert s.caption.startswith(f"a {m['size']} {m['colour']} {m['shape']} "), s.caption
        assert s.caption.endswith(f" {m['position']}"), s.caption
        assert m["shape"] == CLASSES[s.label] and m["colour"] in COLOURS
        x0, y0, x1, y1 = m["bbox"]
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        assert m["position"] == POSITION_GRID[min(int(3 * cy / 32), 2)][min(int(3 * cx / 32), 2)], m
    assert render(8, seed=0).caption.split(" ")[3:5] == ["horizontal", "bar"]


# ----------------------------------------------------------------------------- the checker


def test_checker_accuracy_on_fresh_images(fresh):
    images, labels, _ = fresh
    pred = classify_batch(images)
    assert pred.dtype == np.int64 and pred.shape == labels.shape
    acc = float((pred == labels).mean())
    assert acc >= 0.95, f"checker accuracy {acc:.4f} on {len(labels)} fresh images"
    for c, name in enumerate(CLASSES):
        acc_c = float((pred[labels == c] == c).mean())
        assert acc_c >= 0.9, f"checker accuracy on '{name}' is {acc_c:.3f}"
    # classify (one image) agrees with classify_batch
    assert [classify(images[i]) for i in range(20)] == pred[:20].tolist()


def test_checker_is_flip_invariant(fresh):
    images, labels, _ = fresh
    pred = classify_batch(images[:, :, ::-1])
    acc = float((pred == labels).mean())
    assert acc >= 0.95, f"accuracy on flipped images {acc:.4f}"


def test_checker_is_robust_to_noise_and_blur(fresh):
    images, labels, _ = fresh
    rng = np.random.default_rng(0)
    noisy = box_blur(images.astype(np.float64) + rng.normal(0.0, 8.0, images.shape))
    noisy = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    acc = float((classify_batch(noisy) == labels).mean())
    assert acc >= 0.85, f"accuracy on noisy (sigma 8) + 3x3-blurred images {acc:.4f}"


def test_checker_on_blank_and_random_images():
    for img in (np.zeros((32, 32, 3), np.uint8), np.full((32, 32, 3), 180, np.uint8),
                np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)):
        c = classify(img)
        assert isinstance(c, int) and 0 <= c < 10
    assert classify_batch(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0,)


def test_checker_at_64px():
    samples = list(generate(100, seed=77, size=64))
    pred = classify_batch(np.stack([s.image for s in samples]))
    acc = float((pred == np.array([s.label for s in samples])).mean())
    assert acc >= 0.9, f"checker accuracy {acc:.3f} at 64 px"


def test_checker_tells_drawn_shapes_apart():
    """Hand-drawn binary shapes (not from render): the checker reads geometry, not dataset quirks."""
    img = np.full((32, 32, 3), 90, np.uint8)
    yy, xx = np.mgrid[0:32, 0:32]
    cases = {
        "square": (abs(xx - 15.5) <= 7) & (abs(yy - 15.5) <= 7),
        "horizontal bar": (abs(xx - 15.5) <= 9) & (abs(yy - 15.5) <= 3),
        "vertical bar": (abs(xx - 15.5) <= 3) & (abs(yy - 15.5) <= 9),
        "circle": (xx - 15.5) ** 2 + (yy - 15.5) ** 2 <= 81,
        "ring": ((xx - 15.5) ** 2 + (yy - 15.5) ** 2 <= 100) & ((xx - 15.5) ** 2 + (yy - 15.5) ** 2 > 25),
    }
    for name, mask in cases.items():
        x = img.copy()
        x[mask] = (230, 40, 40)
        assert CLASSES[classify(x)] == name


# ----------------------------------------------------------------------------- shards


def test_write_shapes_manifest_and_samples(tmp_path):
    m = write_shapes(tmp_path / "ds", n_train=50, n_test=20, seed=4, shard_size=16)
    assert m == read_manifest(tmp_path / "ds")
    assert m["name"] == "shapes" and m["classes"] == CLASSES and m["captions"] is True
    assert m["generator"] == {"version": 1, "seed": 4, "size": 32, "n_train": 50, "n_test": 20}
    for split, n, start in (("train", 50, 0), ("test", 20, TEST_START)):
        info = m["splits"][split]
        assert info["count"] == n and sum(s["count"] for s in info["shards"]) == n
        assert [s["count"] for s in info["shards"]] == [16] * (n // 16) + ([n % 16] if n % 16 else [])
        assert info["per_class"] == {c: n // 10 for c in CLASSES}
        assert info["image_sizes"] == {"32x32": n}
        seen = []
        for shard in info["shards"]:
            for sample in iter_shard(tmp_path / "ds" / shard["name"]):
                assert {"png", "cls", "txt", "json"} <= set(sample)
                index = int(sample["__key__"])
                ref = render(index, seed=4)
                assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), ref.image)
                assert int(sample["cls"]) == ref.label
                assert sample["txt"].decode() == ref.caption
                assert json.loads(sample["json"]) == ref.meta
                seen.append(index)
        assert seen == list(range(start, start + n))


def test_write_shapes_is_byte_identical(tmp_path):
    for name in ("a", "b"):
        write_shapes(tmp_path / name, n_train=30, n_test=10, seed=2, shard_size=16, progress=name == "b")
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len([f for f in files_a if f.suffix == ".tar"]) == 3
    for f in files_a:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


# ----------------------------------------------------------------------------- ensure_shapes


def test_ensure_shapes_reuses_and_regenerates(tmp_path):
    root = tmp_path / "cache" / "shapes"
    assert ensure_shapes(root, n_train=20, n_test=10, shard_size=8) == root
    before = files_and_mtimes(root)
    assert ensure_shapes(root, n_train=20, n_test=10, shard_size=8) == root
    assert files_and_mtimes(root) == before  # nothing rewritten
    ensure_shapes(root, n_train=30, n_test=10, shard_size=8)  # other parameters: regenerated
    m = read_manifest(root)
    assert m["generator"]["n_train"] == 30 and m["splits"]["train"]["count"] == 30
    ensure_shapes(root, n_train=30, n_test=10, shard_size=16)  # other sharding: regenerated
    assert read_manifest(root)["shard_size"] == 16
    assert sorted(p.name for p in (root / "train").iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    assert [p.name for p in root.parent.iterdir() if p.name != ".shapes.lock"] == ["shapes"]  # no temp left


def test_ensure_shapes_replaces_a_stale_folder(tmp_path):
    root = tmp_path / "shapes"
    (root / "train").mkdir(parents=True)
    (root / "junk.txt").write_text("old")
    (root / "dataset.json").write_text("{not json")
    ensure_shapes(root, n_train=10, n_test=0, shard_size=8)
    assert not (root / "junk.txt").exists()
    assert read_manifest(root)["splits"]["train"]["count"] == 10


def _check_one_valid_folder(root: Path, n_train: int, n_test: int) -> None:
    m = read_manifest(root)
    assert m["generator"]["n_train"] == n_train and m["splits"]["test"]["count"] == n_test
    assert [p.name for p in root.parent.iterdir() if not p.name.endswith(".lock")] == [root.name]


def test_ensure_shapes_concurrent_processes(tmp_path):
    root = tmp_path / "shapes"
    ctx = mp.get_context("spawn")
    kw = {"n_train": 200, "n_test": 20, "seed": 1, "shard_size": 64}
    procs = [ctx.Process(target=ensure_shapes, args=(root,), kwargs=kw) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    _check_one_valid_folder(root, 200, 20)


def test_ensure_shapes_race_without_lock(tmp_path, monkeypatch):
    """Without the file lock both callers generate; the loser of the rename uses the winner's folder."""

    class NoLock:
        def __init__(self, path):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(shapes, "FileLock", NoLock)
    root = tmp_path / "shapes"
    (root / "train").mkdir(parents=True)  # a stale folder both callers want to replace
    barrier = threading.Barrier(3)
    real_write = shapes.write_shapes
    errors: list[BaseException] = []

    def write_in_step(*args, **kwargs):
        out = real_write(*args, **kwargs)
        barrier.wait(30)  # both have generated before either installs
        return out

    monkeypatch.setattr(shapes, "write_shapes", write_in_step)

    def call() -> None:
        try:
            ensure_shapes(root, n_train=30, n_test=10, shard_size=16)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    barrier.wait(30)
    for t in threads:
        t.join(60)
    assert not errors, errors
    _check_one_valid_folder(root, 30, 10)
