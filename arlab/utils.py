"""Small shared utilities: image grids, file locks, device checks (no arlab imports beyond errors)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from arlab.errors import ConfigError


def image_grid(images_nhwc: np.ndarray, nrow: int, pad: int = 1) -> np.ndarray:
    """(N, H, W, 3) uint8 → one (rows·(H+pad)+pad, nrow·(W+pad)+pad, 3) uint8 image, row-major, white gaps."""
    n, h, w, _ = images_nhwc.shape
    rows = (n + nrow - 1) // nrow
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images_nhwc):
        r, c = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return out


def to_uint8(x_b3hw: Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8 numpy (clamped, rounded)."""
    return x_b3hw.float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def pairs_grid(x_b3hw: Tensor, xrec_b3hw: Tensor, nrow: int = 8) -> np.ndarray:
    """Inputs next to reconstructions (x0, r0, x1, r1, ...) as one uint8 (H, W, 3) grid."""
    pairs = torch.stack([x_b3hw, xrec_b3hw.float()], dim=1).flatten(0, 1)
    return image_grid(to_uint8(pairs.detach()), nrow=nrow)


class FileLock:
    """An exclusive ``flock`` on ``path`` (created if needed) for the ``with`` block: one process at a time
    makes a shared output (a generated dataset, token shards); best effort where locks are unsupported."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.fd = Path(path), None

    def __enter__(self) -> FileLock:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            if self.fd is not None:
                os.close(self.fd)
            self.fd = None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def check_device(device: str) -> str:
    """``device`` when torch can use it on this machine (cpu, cuda, cuda:N, mps, ...); else a ConfigError
    saying why not (before any model is loaded onto it)."""
    if device == "cpu":
        return device
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"'{device}' is not a device name (cpu, cuda, cuda:N, mps)") from None
    if d.type == "cpu":
        return device
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device '{device}' is not available: torch sees no CUDA GPU on this machine (use cpu)")
        if d.index is not None and d.index >= n:
            raise ConfigError(f"device '{device}' is not available: torch sees {n} CUDA GPU(s), cuda:0..cuda:{n - 1}")
        return device
    backend = getattr(torch.backends, d.type, None) if d.type == "mps" else getattr(torch, d.type, None)
    available = getattr(backend, "is_available", None)
    if callable(available) and available():
        return device
    raise ConfigError(f"device '{device}' is not available on this machine (use cpu)")
