"""``data.in_memory``: a split decoded once and held in memory, batched by index, in the training process.

The shard stream (:mod:`arlab.data.stream`) reads and decodes the tar shards again every epoch, in a
background worker process. On a 2-core machine that worker competes with the two compute threads: for the
quickstart's generator the token stream cost 8-20% of a training step and for its tokenizer the image stream
8%, against batches that were already in memory (one process, ``docs/performance.md`` section 0). A small
set is cheaper to decode once: the embedded shapes set is 11,000 images of 32×32 (34 MB as uint8) and its
tokens 1.4 MB.

The loader keeps the stream's contract (exact per-rank balance, resumable state, corrupt samples counted and
skipped, per-epoch augmentation replayed by hash), with a full shuffle in place of shard order + buffer:

* **Loading.** On first use every shard of the split is read in manifest order and each sample decoded once
  by ``decoder.load`` (no augmentation); corrupt samples are counted, logged and skipped. Every rank holds
  the whole split.
* **Training epoch e.** The N samples are permuted by ``rng(seed, e)``; rank r of W takes positions
  ``r, r + W, ...`` and yields ``batches_per_epoch = N // (W·B)`` full batches, so ranks are disjoint and
  equal. ``decoder.augment(sample, e)`` applies the epoch's augmentation (an image's flip is a hash of
  ``(seed, e, key)``, as in the stream).
* **Evaluation.** Rank r takes samples ``r, r + W, ...`` in manifest order, once; the last batch may be
  partial, and a rank with fewer samples than the largest pads with full batches from its own start.
* **Resume.** ``state_dict`` is ``(epoch, batches_done)``; a resumed epoch skips the batches done, so the
  rest of the epoch is the one an uninterrupted run would have seen.

A decoder is an object with ``load(raw) -> sample | None`` and ``augment(sample, epoch) -> sample``
(:class:`arlab.data.datamodule.ImageDecoder`, :class:`arlab.data.tokens.TokenDecoder`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from arlab.data.stream import _read_shards
from arlab.errors import DataError

log = logging.getLogger("arlab.data")


class Decoder(Protocol):
    def load(self, raw: dict[str, Any]) -> dict[str, Any] | None: ...

    def augment(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]: ...


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of one training epoch (independent of ranks)."""
    return np.random.default_rng([seed, epoch, 0x4D454D]).permutation(n)


class MemoryLoader:
    """Batches of one split from memory: the interface of :class:`arlab.data.stream.ShardLoader`
    (``len``, ``iter``, ``state_dict`` / ``load_state_dict``, ``corrupt``), without worker processes."""

    def __init__(self, shards: list[str], counts: list[int], *, batch_size: int, seed: int, rank: int,
                 world_size: int, decoder: Decoder, collate: Callable[[list[dict]], dict], train: bool = True,
                 name: str = "train"):
        if not 0 <= rank < world_size:
            raise DataError(f"{name}: rank {rank} is not in [0, {world_size})")
        self.shards, self.counts = shards, counts
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.decoder, self.collate, self.train, self.name = decoder, collate, train, name
        self.num_workers = 0
        self.epoch, self.batches_done = 0, 0
        self.corrupt = 0  # samples skipped as corrupt when the split was loaded
        self._samples: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------------------ data
    @property
    def samples(self) -> list[dict[str, Any]]:
        """Every valid sample of the split, decoded (loaded on first use)."""
        if self._samples is None:
            t0 = time.perf_counter()
            samples, corrupt = [], 0
            for raw in _read_shards(self.shards):
                out = self.decoder.load(raw)
                if out is None:
                    corrupt += 1
                    continue
                samples.append(out)
            if corrupt:
                self.corrupt += corrupt
                log.warning("%s: skipped %d corrupt sample(s) of %d", self.name, corrupt, len(samples) + corrupt)
            if len(samples) < sum(self.counts) - corrupt:
                log.warning("%s: read %d samples where the manifest lists %d (unreadable shards are skipped)",
                            self.name, len(samples) + corrupt, sum(self.counts))
            log.info("%s: %d samples decoded into memory in %.1f s", self.name, len(samples),
                     time.perf_counter() - t0)
            self._samples = samples
        return self._samples

    @property
    def batches_per_epoch(self) -> int:
        n, w, b = len(self.samples), self.world_size, self.batch_size
        per_rank = n // w if self.train else -(-n // w)  # evaluation: the largest rank's share
        batches = per_rank // b if self.train else -(-per_rank // b)
        if batches == 0:
            raise DataError(f"{self.name}: {n} samples are fewer than one batch of {b} on each of {w} rank(s)")
        return batches

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _rank_indices(self) -> np.ndarray:
        n = len(self.samples)
        if not self.train:
            return np.arange(n)[self.rank :: self.world_size]
        order = epoch_permutation(n, self.seed, self.epoch)
        return order[self.rank :: self.world_size][: self.batches_per_epoch * self.batch_size]

    def _batch(self, idx: np.ndarray) -> dict[str, Any]:
        samples = self.samples
        return self.collate([self.decoder.augment(samples[i], self.epoch) for i in idx.tolist()])

    # ------------------------------------------------------------------------------ iteration
    def batch_indices(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch, as sample indices."""
        idx, b, n = self._rank_indices(), self.batch_size, self.batches_per_epoch
        batches = [idx[k : k + b] for k in range(0, len(idx), b)]
        while len(batches) < n:  # evaluation, a short rank: full batches from its start
            batches.append(np.resize(idx, b))
        return batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batches_done >= self.batches_per_epoch:
            self.epoch, self.batches_done = self.epoch + 1, 0
        batches = self.batch_indices()
        return self._iterate(batches[self.batches_done :], len(batches))

    def _iterate(self, todo: list[np.ndarray], n_batches: int) -> Iterator[dict[str, Any]]:
        for idx in todo:
            batch = self._batch(idx)
            self.batches_done += 1
            if self.batches_done >= n_batches:  # epoch done: the next iter() starts e+1
                self.epoch, self.batches_done = self.epoch + 1, 0
            yield batch

    # ------------------------------------------------------------------------------ Lightning's _Stateful
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "world_size": self.world_size,
                "seed": self.seed, "corrupt": self.corrupt, "in_memory": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        same = (state.get("in_memory") and state.get("world_size") == self.world_size
                and state.get("seed") == self.seed)
        if same:
            self.batches_done = int(state["batches_done"])
        else:
            log.warning("%s: resumed from a %s with a different layout (in-memory, world size or seed); epoch %d "
                        "restarts from its first batch", self.name,
                        "stream" if not state.get("in_memory") else "loader", self.epoch)
            self.batches_done = 0
