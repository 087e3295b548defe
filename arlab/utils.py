"""Small shared utilities: image grids, file locks, device checks, and outputs that appear complete or not at all."""

from __future__ import annotations

import fcntl
import io
import os
import queue
import re
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
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


# ----------------------------------------------------------------------------- atomic outputs

_TMP, _OLD = "tmp", "old"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sibling(out: Path, tag: str) -> Path:
    return out.parent / f".{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _leftovers(out: Path, tag: str) -> list[tuple[Path, int]]:
    """``.{name}.{tag}-{pid}-{id}`` siblings of ``out`` with their pid."""
    found = []
    for p in out.parent.glob(f".{out.name}.{tag}-*"):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.{tag}-(\d+)-[0-9a-f]+", p.name)
        if m:
            found.append((p, int(m.group(1))))
    return found


def clean_leftovers(out: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of ``out`` left beside it (their process is gone): half-built ``.tmp``
    folders, and ``.old`` copies once ``out`` exists (a writer killed between its two renames leaves
    ``out`` missing and its ``.old`` copy: that copy is put back). Returns the paths removed or restored."""
    out = Path(out)
    done: list[Path] = []
    for tag in (_OLD, _TMP):
        for p, pid in _leftovers(out, tag):
            if _pid_alive(pid) and pid != os.getpid():
                continue
            if tag == _OLD and not out.exists():
                os.replace(p, out)  # the previous complete output: restore it
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            done.append(p)
    return done


@contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """Build the folder ``out`` in a hidden sibling and make it appear complete in one step.

    Yields the build folder. On success the old ``out`` (if any) is renamed aside, the new one renamed
    into place and the old one deleted: ``out`` is always either the old complete folder or the new
    complete one, never a mixture. On an exception the build folder is removed; if the process is
    killed, the next writer of ``out`` removes it (:func:`clean_leftovers`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(out)
    tmp = _sibling(out, _TMP)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists() or out.is_symlink():
        old = _sibling(out, _OLD)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a file so that it appears complete or not at all (temporary sibling, then rename)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)
    return path


def same_or_nested(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths are the same folder or one lies inside the other (after resolving links)."""
    ra, rb = Path(a).resolve(), Path(b).resolve()
    return ra == rb or ra in rb.parents or rb in ra.parents


def png_bytes(image_hwc: np.ndarray) -> bytes:
    """A uint8 (H, W, 3) image as PNG bytes (for :func:`atomic_write`)."""
    buf = io.BytesIO()
    Image.fromarray(image_hwc).save(buf, format="PNG")
    return buf.getvalue()


def npz_bytes(**arrays: Any) -> bytes:
    """Arrays as the bytes of an ``.npz`` file (for :func:`atomic_write`)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


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


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetched(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """The items of ``items`` in order, produced by a background thread up to ``depth`` ahead: Python-side reading
    (tar parsing, PNG decoding) overlaps the consumer's torch kernels, which release the GIL. An exception in the
    thread is raised here, at the item where it happened; a consumer that stops early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, end = threading.Event(), object()

    def put(x: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for x in items:
                if not put(x):
                    return
        except BaseException as e:  # noqa: BLE001 -- handed to the consumer
            put(_Raised(e))
            return
        finally:  # a source left suspended by an early stop closes now (its open files), not at garbage collection
            close = getattr(items, "close", None)
            if close is not None:
                close()
        put(end)

    thread = threading.Thread(target=work, name="arlab-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            x = q.get()
            if x is end:
                return
            if isinstance(x, _Raised):
                raise x.exc
            yield x
    finally:
        stop.set()
        thread.join()
