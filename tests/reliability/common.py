"""Shared helpers of the reliability tests: a small ImageFolder on disk, tiny experiments, folder digests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def make_imagefolder(root: Path, n: int = 24, size: int = 16, splits=("train", "test"),
                     classes=("a", "b", "c")) -> Path:
    """``root/<split>/<class>/<i>.png``: n images per split, pixel values encode (split, i)."""
    for si, split in enumerate(splits):
        for i in range(n):
            cls = classes[i % len(classes)]
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            arr = np.full((size, size, 3), (37 * i + 91 * si) % 256, np.uint8)
            arr[: size // 2, :, 1] = 40 * (i % len(classes))
            Image.fromarray(arr).save(d / f"{i:04d}.png")
    return root


def tokenizer_experiment(tmp: Path, data_root: Path, run: Path, steps: int = 4) -> Path:
    body = {"data": {"type": "shards", "root": str(data_root), "image_size": 16, "batch_size": 8, "num_workers": 0,
                     "shuffle_buffer": 16, "flip": 0.0},
            "tokenizer": {"preset": "shapes-fsq", "autoencoder": "tiny", "image_size": 16},
            "task": {"type": "tokenizer", "lr": 1e-3, "warmup_steps": 1, "log_images_every_n_steps": 0,
                     "usage_window": 2},
            "trainer": {"max_steps": steps, "val_check_interval": steps, "check_val_every_n_epoch": None,
                        "limit_val_batches": 1, "checkpoint_every_n_steps": 2, "enable_progress_bar": False,
                        "log_every_n_steps": 1},
            "run": {"dir": str(run)}}
    path = tmp / f"tok-{run.name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def digest(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file below ``folder`` (relative path → hash), hidden lock files excepted."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and p.name != ".lock" and not any(rel.startswith(s) for s in skip):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def arlab(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "ARLAB_LOG": "WARNING"}
    r = subprocess.run([sys.executable, "-m", "arlab", *args], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=600, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"arlab {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r


def manifest(folder: Path) -> dict:
    return json.loads((folder / "dataset.json").read_text())
