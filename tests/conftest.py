"""Shared fixtures: small image shard folders made on the fly, hygiene for torch state.

The plug-ins of ``tests/plugins`` (a toy order, backbone and metric from outside the package) are loaded
through ``ARLAB_PLUGINS`` before any test imports arlab's registry, so every registry-parametrized test
checks them like arlab's own components.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arlab.data.shards import ShardWriter, add_split, new_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]
PLUGINS = Path(__file__).resolve().parent / "plugins"
os.environ["ARLAB_PLUGINS"] = os.pathsep.join(
    [p for p in os.environ.get("ARLAB_PLUGINS", "").split(os.pathsep) if p] + [str(PLUGINS)])
CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_image_shards(root: Path, counts: list[int], *, size: int = 8, classes: int = 3,
                      corrupt_keys: tuple[str, ...] = (), split: str = "train") -> dict:
    """Shards with ``counts[i]`` samples in shard i; sample j's pixels encode j (exact checks).

    Key ``kNNNNNN``, label ``j % classes``, pixel (0, 0, 0) = j % 256, (0, 0, 1) = j // 256.
    """
    classes_l = [f"c{i}" for i in range(classes)]
    shards = []
    j = 0
    per_class = dict.fromkeys(classes_l, 0)
    for i, n in enumerate(counts):
        with ShardWriter(root / split, shard_size=10**9, prefix=f"shard{i:03d}") as w:
            for _ in range(n):
                key = f"k{j:06d}"
                arr = np.full((size, size, 3), 128, np.uint8)
                arr[0, 0, 0], arr[0, 0, 1] = j % 256, j // 256
                arr[:, : size // 2, 2] = 255  # left half marked: flips are visible
                data = b"not an image" if key in corrupt_keys else png_bytes(arr)
                w.write({"__key__": key, "png": data, "cls": j % classes, "txt": f"caption {j}"})
                per_class[classes_l[j % classes]] += 1
                j += 1
        shards += w.shards
    m = new_manifest("synthetic", classes_l, shard_size=max(counts))
    add_split(m, split, shards, per_class, {f"{size}x{size}": sum(counts)})
    write_manifest(root, m)
    return m


@pytest.fixture
def image_shards(tmp_path: Path):
    """Factory fixture: ``image_shards(counts, **kw) -> root``."""

    def make(counts: list[int], **kw) -> Path:
        root = tmp_path / f"shards{len(list(tmp_path.iterdir()))}"
        make_image_shards(root, counts, **kw)
        return root

    return make


@pytest.fixture(autouse=True)
def _torch_hygiene():
    """Each test starts with the same RNG state and default dtype."""
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


# Intra-op threads of every test that trains and asserts on the outcome. A CPU float32 reduction
# (conv, matmul, GroupNorm, sums) is split into per-thread partial sums, so the thread count changes
# the last bits of every step, and training amplifies those bits into a different trajectory. Pinned,
# a machine with any number of cores runs the same kernels' schedule as the 2-core machines the
# thresholds were measured on (the thresholds still hold at 1 thread: see the training tests).
TRAIN_THREADS = 2


@contextlib.contextmanager
def pinned_threads(n: int = TRAIN_THREADS) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads and deterministic algorithms (restored after).

    On CPU, with num_workers=0 data loading (the training tests' setting), a run is then
    bit-for-bit repeatable on one machine. It is not across CPUs: oneDNN, MKL and ATen pick
    kernels by instruction set and cache size, and a different kernel rounds differently, which
    moves a trajectory as much as another seed does. Thresholds therefore come from several seeds
    and both thread counts, with a margin (see each training test's docstring).
    """
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)


@pytest.fixture
def train_threads() -> Iterator[None]:
    """Function-scoped :func:`pinned_threads` for tests that train (module fixtures use the context manager)."""
    with pinned_threads():
        yield


@pytest.fixture(scope="session")
def arlab_cache(tmp_path_factory) -> Path:
    """A session-wide ARLAB_CACHE so generated datasets are made once per test run."""
    path = tmp_path_factory.mktemp("arlab-cache")
    old = os.environ.get("ARLAB_CACHE")
    os.environ["ARLAB_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ARLAB_CACHE", None)
    else:
        os.environ["ARLAB_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory, arlab_cache) -> tuple[Path, dict]:
    """A task/classifier run on shapes-tiny, a few steps of a tiny CNN: (checkpoint, final metrics).

    Shared by the feature-network and metric tests (features/classifier reads the checkpoint)."""
    from arlab.config import load_experiment
    from arlab.train import fit

    run = tmp_path_factory.mktemp("classifier") / "run"
    exp = load_experiment("shapes/classifier", [
        "data=shapes-tiny", "data.num_workers=0", "task.widths=[8,16]", "task.depth=1", "task.feature_dim=16",
        "task.warmup_steps=2", "trainer.max_steps=8", "trainer.val_check_interval=8", "trainer.limit_val_batches=2",
        "trainer.checkpoint_every_n_steps=8", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
        f"run.dir={run}"])
    metrics = fit(exp)
    return run / "checkpoints" / "last.ckpt", metrics
