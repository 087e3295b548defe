"""Drawing N images in chunks that survive an interruption: ``<folder>/chunk-00003.npz``.

Chunk ``i`` holds images ``[i·C, min(N, (i+1)·C))`` of the evaluation conditions, drawn with its own seed
:func:`chunk_seed` ``(seed, i)``, so a chunk does not depend on the chunks before it: an interrupted
evaluation run again draws only the missing chunks, and its images equal an uninterrupted run's bit for
bit. Each file is written atomically (temporary name, then rename) and holds ``images`` (n, H, W, 3) uint8,
``labels`` (n,), ``seed``, ``index``, ``seconds`` (the drawing time, so images/s survives a resume) and
``key``: a SHA-256 over what determines the images (checkpoint identity, sampling setting, batch size,
device, the chunk's conditions and seed). A chunk whose key differs (another checkpoint, setting or
condition) or that cannot be read is drawn again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from arlab.utils import atomic_write, npz_bytes

log = logging.getLogger("arlab.eval")


def chunk_seed(seed: int, index: int) -> int:
    """The sampling seed of chunk ``index`` of an evaluation with ``seed`` (63 bits, from SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def chunk_key(base: dict[str, Any], index: int, start: int, end: int, cond_digest: str, seed: int) -> str:
    parts = {**base, "index": index, "start": start, "end": end, "cond": cond_digest, "seed": seed}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Drawn:
    """The concatenated chunks: images (N, H, W, 3) uint8, labels (N,), the drawing seconds summed over every
    chunk (including ones drawn by an earlier, interrupted run) and how many chunks this call drew."""

    images: np.ndarray
    labels: np.ndarray
    seconds: float
    drawn: int
    reused: int


def _read(path: Path, key: str) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                log.info("chunk %s was drawn with other settings (key differs): drawing it again", path)
                return None
            return {k: z[k] for k in ("images", "labels", "seconds")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        log.warning("chunk %s is unreadable (%s): drawing it again", path, e)
        return None


def draw_chunks(folder: Path, cond_digests: list[str], labels_n: np.ndarray, chunk: int, seed: int,
                base_key: dict[str, Any], draw: Callable[[int, int, int], np.ndarray],
                progress: Callable[[int], Any] | None = None) -> Drawn:
    """Images for ``len(labels_n)`` conditions in chunks of ``chunk``, reusing valid chunk files in ``folder``.

    ``draw(start, end, seed)`` makes the uint8 images of conditions ``start:end``; ``cond_digests[i]``
    identifies chunk i's conditions (part of its key); ``progress(k)`` is told of every k images done."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(labels_n)
    images, seconds, drawn, reused = [], 0.0, 0, 0
    for i, start in enumerate(range(0, n, chunk)):
        end = min(n, start + chunk)
        s = chunk_seed(seed, i)
        key = chunk_key(base_key, i, start, end, cond_digests[i], s)
        path = folder / f"chunk-{i:05d}.npz"
        got = _read(path, key)
        if got is None:
            t0 = time.perf_counter()
            ims = draw(start, end, s)
            dt = time.perf_counter() - t0
            if ims.shape[0] != end - start or ims.dtype != np.uint8:
                raise RuntimeError(f"chunk {i}: expected {end - start} uint8 images, got {ims.dtype} {ims.shape}")
            atomic_write(path, npz_bytes(images=ims, labels=np.asarray(labels_n[start:end]), seed=np.uint64(s),
                                         index=np.int64(i), seconds=np.float64(dt), key=np.str_(key)))
            got = {"images": ims, "seconds": np.float64(dt)}
            drawn += 1
        else:
            reused += 1
        images.append(got["images"])
        seconds += float(got["seconds"])
        if progress is not None:
            progress(end - start)
    return Drawn(np.concatenate(images), np.asarray(labels_n), seconds, drawn, reused)
