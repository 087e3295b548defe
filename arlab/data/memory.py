"""``data.in_memory``: a split decoded once and held in memory, batched by index, in the training process.

The shard stream (:mod:`arlab.data.stream`) reads and decodes the tar shards again every epoch, in a
background worker process. On a 2-core machine that worker competes with the two compute threads: for the
quickstart's generator the token stream cost 8-20% of a training step and for its tokenizer the image stream
6-15%, against batches that were already in memory (one process, ``docs/performance.md`` section 0). A small
set is cheaper to decode once: the embedded shapes set is 11,000 images of 32×32 (34 MB as uint8) and its
tokens 1.4 MB.

**The loader yields exactly the stream's batches**: the same samples in the same order, with the same flips,
for the same ``(seed, rank, world size, num_workers, shuffle_buffer)``. Each ``iter()`` also draws the one number
a ``DataLoader`` iterator draws from torch's global generator. So ``in_memory`` changes where the decoding
happens and how fast a step runs, never what a run computes (``tests/data/test_memory.py`` checks the
two loaders batch for batch, with uneven shards, several ranks and workers, and corrupt samples):

* **Loading.** On first use every shard of the split is read, in manifest order, and each sample decoded once
  by ``decoder.load`` (no augmentation); corrupt samples are counted, logged and skipped. Each shard keeps its
  list of sample slots (a slot is the index of a decoded sample, or -1 for a corrupt one).
* **Training epoch e.** The stream's rules replayed over slots instead of tar members
  (:class:`arlab.data.stream.StreamSpec`): the epoch's shard permutation, shards ``r::W`` to rank r, every
  ``n``-th of those to each of the ``n`` logical streams (``n`` = the stream's worker count), each logical
  stream's seeded shuffle-buffer passes, corrupt slots skipped, its quota of full batches, and the logical
  streams' batches interleaved as a ``DataLoader`` returns them. The buffer's random draws depend only on
  how many samples it has seen, so the slot order is the stream's sample order. ``decoder.augment(sample,
  e)`` then applies the epoch's augmentation (an image's flip is a hash of ``(seed, e, key)``, as in the
  stream).
* **Evaluation.** Rank r reads its shards ``r::W`` in manifest order, once; the last batch may be partial,
  and a rank with fewer samples than the largest pads with full batches from a second pass from its start.
  Every ``iter()`` starts from the first batch, so a validation cut short (``limit_val_batches``) always
  sees the same batches.
* **Resume.** ``state_dict`` is ``(epoch, batches_done)``; a resumed epoch skips the batches done, so the
  rest of the epoch is the one an uninterrupted run would have seen. It also holds each logical stream's
  position (raw samples taken, corrupt ones included), as the stream's state does, so a run can switch
  ``in_memory`` on or off when it resumes, either way, mid-epoch.

A decoder is an object with ``load(raw) -> sample | None`` and ``augment(sample, epoch) -> sample``
(:class:`arlab.data.datamodule.ImageDecoder`, :class:`arlab.data.tokens.TokenDecoder`).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch

from arlab.data.stream import StreamSpec, _read_shards, sample_seed, shuffled_passes, stream_layout
from arlab.errors import DataError

log = logging.getLogger("arlab.data")


class Decoder(Protocol):
    def load(self, raw: dict[str, Any]) -> dict[str, Any] | None: ...

    def augment(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]: ...


class MemoryLoader:
    """Batches of one split from memory: the interface of :class:`arlab.data.stream.ShardLoader`
    (``len``, ``iter``, ``state_dict`` / ``load_state_dict``, ``corrupt``) and its batches, without worker
    processes. ``num_workers`` and ``shuffle_buffer`` are the stream's (they fix its sample order); no worker
    process is started."""

    def __init__(self, shards: list[str], counts: list[int], *, batch_size: int, seed: int, rank: int,
                 world_size: int, decoder: Decoder, collate: Callable[[list[dict]], dict], train: bool = True,
                 name: str = "train", num_workers: int = 0, shuffle_buffer: int = 0):
        if not 0 <= rank < world_size:
            raise DataError(f"{name}: rank {rank} is not in [0, {world_size})")
        self.n_streams, self.batches_per_epoch = stream_layout(len(shards), counts, batch_size=batch_size,
                                                               world_size=world_size, num_workers=num_workers,
                                                               train=train, name=name)
        self.shards, self.counts = shards, counts
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.decoder, self.collate, self.train, self.name = decoder, collate, train, name
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.num_workers = 0  # no worker process: batches are built in the training process
        self.epoch, self.batches_done = 0, 0
        self.positions: dict[int, int] = {}  # logical stream -> raw samples taken this epoch (the stream's state)
        self.corrupt = 0  # samples skipped as corrupt when the split was loaded
        self._samples: list[dict[str, Any]] | None = None
        self._slots: list[list[int]] = []  # per shard: sample index of each raw sample, -1 if corrupt

    # ------------------------------------------------------------------------------ data
    @property
    def samples(self) -> list[dict[str, Any]]:
        """Every valid sample of the split, decoded (loaded on first use)."""
        if self._samples is None:
            t0 = time.perf_counter()
            samples: list[dict[str, Any]] = []
            slots: list[list[int]] = []
            corrupt = 0
            for path in self.shards:  # one shard at a time: the stream's order is per shard
                slots.append([])
                for raw in _read_shards([path]):
                    out = self.decoder.load(raw)
                    if out is None:
                        corrupt += 1
                        slots[-1].append(-1)
                        continue
                    slots[-1].append(len(samples))
                    samples.append(out)
            if corrupt:
                self.corrupt += corrupt
                log.warning("%s: skipped %d corrupt sample(s) of %d", self.name, corrupt, len(samples) + corrupt)
            if len(samples) < sum(self.counts) - corrupt:
                log.warning("%s: read %d samples where the manifest lists %d (unreadable shards are skipped)",
                            self.name, len(samples) + corrupt, sum(self.counts))
            log.info("%s: %d samples decoded into memory in %.1f s", self.name, len(samples),
                     time.perf_counter() - t0)
            self._samples, self._slots = samples, slots
        return self._samples

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _spec(self) -> StreamSpec:
        return StreamSpec(self.shards, self.counts, self.batch_size, self.seed, self.epoch, self.rank,
                          self.world_size, self.n_streams, self.batches_per_epoch, self.shuffle_buffer,
                          evaluation=not self.train)

    def _slots_of(self, shard_ids: list[int]) -> Iterator[int]:
        return itertools.chain.from_iterable(self._slots[i] for i in shard_ids)

    def _passes(self, shard_ids: list[int], seed: int) -> Iterator[int]:
        """The stream's shuffled passes (:func:`arlab.data.stream.shuffled_passes`) over these shards' slots."""
        return shuffled_passes(lambda: self._slots_of(shard_ids), self.shuffle_buffer, seed,
                               f"shards {[self.shards[i] for i in shard_ids]}")

    def _take(self, slots: Iterator[int], todo: int, partial: bool = False) -> list[tuple[np.ndarray, int]]:
        """At most ``todo`` batches of valid sample indices (corrupt slots skipped), as the stream batches them,
        each with its stream position: the raw samples taken from ``slots`` up to its end (corrupt ones too)."""
        out: list[tuple[np.ndarray, int]] = []
        batch: list[int] = []
        pos = 0
        if todo <= 0:
            return out
        for slot in slots:
            pos += 1
            if slot < 0:
                continue
            batch.append(slot)
            if len(batch) == self.batch_size:
                out.append((np.asarray(batch), pos))
                batch = []
                if len(out) == todo:
                    return out
        if partial and batch:
            out.append((np.asarray(batch), pos))
        return out

    # ------------------------------------------------------------------------------ iteration
    def _epoch_batches(self) -> list[tuple[int, np.ndarray, int]]:
        """This rank's batches of the current epoch as (logical stream, sample indices, stream position)."""
        self.samples  # noqa: B018 -- loads the split and its slots on first use
        s = self._spec()
        if not self.train:
            ids = s.rank_shards()
            first = self._take(self._slots_of(ids), s.batches_per_epoch, partial=True)
            pad = self._take(self._passes(ids, 0), s.batches_per_epoch - len(first))
            return [(0, idx, pos) for idx, pos in first + pad]
        per_stream = [self._take(self._passes(s.stream_shards(lg), sample_seed(s.seed, s.epoch, s.rank, lg,
                                                                                "shuffle")), s.quota(lg))
                      for lg in range(s.n_streams)]
        return [(k % s.n_streams, *per_stream[k % s.n_streams][k // s.n_streams]) for k in range(s.batches_per_epoch)]

    def _batch(self, idx: np.ndarray) -> dict[str, Any]:
        samples = self.samples
        return self.collate([self.decoder.augment(samples[i], self.epoch) for i in idx.tolist()])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not self.train:  # evaluation always starts from its first batch, as the stream's does: every
            self.batches_done, self.positions = 0, {}  # validation cut short by limit_val_batches sees the same batches
        if self.batches_done >= self.batches_per_epoch:
            self.epoch, self.batches_done, self.positions = self.epoch + 1, 0, {}
        # A DataLoader iterator draws its workers' base seed from torch's global generator; draw it too, so the
        # run's later random numbers (a generator's class dropout for CFG) are the ones the stream's run draws.
        torch.empty((), dtype=torch.int64).random_()
        batches = self._epoch_batches()
        return self._iterate(batches[self.batches_done :], len(batches))

    def _iterate(self, todo: list[tuple[int, np.ndarray, int]], n_batches: int) -> Iterator[dict[str, Any]]:
        for stream, idx, pos in todo:
            batch = self._batch(idx)
            self.positions[stream] = pos  # where the stream's logical stream would stand: its state resumes us
            self.batches_done += 1
            if self.batches_done >= n_batches:  # epoch done: the next iter() starts e+1
                self.epoch, self.batches_done, self.positions = self.epoch + 1, 0, {}
            yield batch

    # ------------------------------------------------------------------------------ Lightning's _Stateful
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done,
                "positions": {str(k): v for k, v in self.positions.items()}, "world_size": self.world_size,
                "n_streams": self.n_streams, "seed": self.seed, "corrupt": self.corrupt, "in_memory": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        # the stream's state resumes exactly too (the same batches); a state without n_streams is an older
        # in-memory loader's, whose epochs were a full permutation
        same = (state.get("world_size") == self.world_size and state.get("seed") == self.seed
                and state.get("n_streams") == self.n_streams)
        if same:
            self.batches_done = int(state["batches_done"])
            self.positions = {int(k): int(v) for k, v in state.get("positions", {}).items()}
        else:
            log.warning("%s: resumed from a %s with a different layout (world size, workers or seed, or an older "
                        "in-memory loader); epoch %d restarts from its first batch", self.name,
                        "stream" if not state.get("in_memory") else "loader", self.epoch)
            self.batches_done, self.positions = 0, {}
