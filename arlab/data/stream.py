"""A resumable, rank-balanced stream of batches over WebDataset shards.

webdataset alone gets four things wrong for DDP training (see ``docs/data.md``): it repeats the
same shard order every epoch unless seeded per epoch, gives ranks unequal sample counts (DDP
hangs), ties shuffles to the world size, and cannot resume mid-epoch. This module owns those
rules and uses webdataset for reading tar shards:

* **Epoch order.** Epoch ``e`` permutes the split's shards with ``rng(seed, e)``; the permutation
  does not depend on the number of ranks or workers.
* **Split by node and worker.** Rank ``r`` of ``W`` reads shards ``perm[r::W]``; its
  ``num_workers`` logical streams read every ``num_workers``-th of those, in shuffled passes (a
  seeded shuffle buffer); a stream starts another pass only if its rank holds fewer samples than
  the balanced share, so it never runs dry and never repeats a sample before it has to.
* **Equal length.** Every rank yields exactly ``batches_per_epoch = total // (W * batch_size)``
  full batches, stream ``l`` producing batches ``l, l + n, l + 2n, ...``, which is the order a
  ``DataLoader`` with ``n`` workers returns them in. Evaluation reads each rank's shards once in
  order (shards ``r::W`` of the manifest) in as many batches as the largest rank needs (its last
  batch may be partial; shorter ranks pad with full batches from a second pass), so evaluation
  covers every sample, exactly once on a single rank.
* **Resume.** Each batch carries its stream's position (samples taken from the shuffle buffer);
  :class:`ShardLoader` keeps ``(epoch, batches_done, positions)`` as its ``state_dict`` (Lightning
  stores it in checkpoints), and a resumed stream fast-forwards through the tar bytes without
  decoding. Random flips are a hash of ``(seed, epoch, key)``, so they replay exactly.
* **Corrupt samples** are skipped inside the stream (the next sample takes their place, so counts
  stay equal), counted, and reported by the loader.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from arlab.errors import DataError

log = logging.getLogger("arlab.data")

Decode = Callable[[dict[str, Any], int], "dict[str, Any] | None"]


def sample_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across processes and Python runs, unlike hash())."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def epoch_shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """The shard permutation of one epoch; independent of ranks and workers."""
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(n_shards).tolist()


@dataclass
class StreamSpec:
    """Everything a worker needs to produce its batches of one epoch (picklable)."""

    shards: list[str]  # shard paths of the split, in manifest order
    counts: list[int]  # samples per shard
    batch_size: int
    seed: int
    epoch: int
    rank: int
    world_size: int
    n_streams: int  # logical streams per rank (= DataLoader workers, or 1 in-process)
    batches_per_epoch: int
    shuffle_buffer: int
    evaluation: bool = False  # one ordered pass, partial last batch (wraps only to pad short ranks)
    skip_batches: int = 0  # batches of this epoch already consumed (resume)
    positions: dict[int, int] = field(default_factory=dict)  # stream -> samples taken (resume)

    def rank_shards(self) -> list[int]:
        if self.evaluation:  # fixed order: manifest shards r, r + W, ...
            return list(range(len(self.shards)))[self.rank :: self.world_size]
        order = epoch_shard_order(len(self.shards), self.seed, self.epoch)
        return order[self.rank :: self.world_size]

    def stream_shards(self, stream: int) -> list[int]:
        return self.rank_shards()[stream :: self.n_streams]

    def quota(self, stream: int, upto: int | None = None) -> int:
        """Batches that ``stream`` produces among the first ``upto`` batches of the epoch."""
        n = self.batches_per_epoch if upto is None else upto
        return n // self.n_streams + (1 if stream < n % self.n_streams else 0)


class _ShuffleBuffer:
    """A seeded reservoir shuffle (deterministic for a given input order and seed)."""

    def __init__(self, source: Iterator[dict[str, Any]], size: int, seed: int):
        self.source, self.size, self.rng = source, size, random.Random(seed)
        self.buf: list[dict[str, Any]] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.size <= 1:
            yield from self.source
            return
        for sample in self.source:
            if len(self.buf) < self.size:
                self.buf.append(sample)
                continue
            i = self.rng.randrange(len(self.buf))
            self.buf[i], out = sample, self.buf[i]
            yield out
        while self.buf:  # only reached for finite sources
            yield self.buf.pop(self.rng.randrange(len(self.buf)))


def _read_shards(paths: list[str]) -> Iterator[dict[str, Any]]:
    """Raw samples (bytes per extension) of ``paths``, one pass; unreadable tars are skipped."""
    stream = wds.tarfile_samples([{"url": p} for p in paths], handler=wds.warn_and_continue)
    yield from stream


def shuffled_passes(read: Callable[[], Iterator[Any]], buffer: int, seed: int, what: str) -> Iterator[Any]:
    """Shuffled passes over what ``read()`` yields, forever: pass n through a shuffle buffer seeded with
    ``(seed, n)``, every item once per pass, so a stream visits each of its samples once before it wraps (a
    stream wraps only when its rank holds fewer samples than the balanced per-rank share). The in-memory
    loader runs the same passes over sample slots (:mod:`arlab.data.memory`)."""
    for n in itertools.count():
        empty = True
        for item in _ShuffleBuffer(read(), buffer, sample_seed(seed, n)):
            empty = False
            yield item
        if empty:
            raise DataError(f"no readable samples in {what}")


def _passes(paths: list[str], buffer: int, seed: int) -> Iterator[dict[str, Any]]:
    """:func:`shuffled_passes` over the raw samples of the shards ``paths``."""
    return shuffled_passes(lambda: _read_shards(paths), buffer, seed, f"shards {paths}")


def stream_layout(n_shards: int, counts: list[int], *, batch_size: int, world_size: int, num_workers: int,
                  train: bool, name: str) -> tuple[int, int]:
    """(logical streams per rank, batches per epoch) of a split: the shard stream's layout, which the in-memory
    loader keeps too. Streams are capped by the shards each rank holds (evaluation: one); a training epoch is
    ``total // (W·B)`` full batches on every rank, an evaluation pass as many batches as the largest rank needs."""
    if n_shards < world_size:
        raise DataError(f"{name}: {n_shards} shard(s) cannot feed {world_size} ranks (each rank reads distinct "
                        "shards); repack with a smaller --shard-size")
    min_rank_shards = n_shards // world_size
    if not train:  # evaluation: one ordered stream per rank (one background worker at most)
        num_workers = min(num_workers, 1)
    n_streams = max(1, min(num_workers, min_rank_shards)) if num_workers > 0 else 1
    if num_workers > n_streams:
        log.warning("%s: %d workers for %d shard(s) per rank; using %d", name, num_workers, min_rank_shards,
                    n_streams)
    total = sum(counts)
    if train:
        batches = total // (world_size * batch_size)
    else:  # every rank can compute every rank's share from the manifest: size for the largest
        batches = max(-(-sum(counts[r::world_size]) // batch_size) for r in range(world_size))
    if batches == 0:
        raise DataError(f"{name}: {total} samples are fewer than one batch of {batch_size} "
                        f"on each of {world_size} rank(s)")
    return n_streams, batches


class ShardStream(IterableDataset):
    """The batches of one rank for one epoch (see the module docstring)."""

    def __init__(self, spec: StreamSpec, decode: Decode, collate: Callable[[list[dict]], dict]):
        super().__init__()
        self.spec, self.decode, self.collate = spec, decode, collate

    def _batches(self, raw: Iterator[dict[str, Any]], todo: int, logical: int = 0, pos: int = 0,
                 partial: bool = False) -> Iterator[dict[str, Any]]:
        """Decode raw samples into at most ``todo`` full batches (corrupt ones skipped and counted);
        with ``partial``, a final short batch when ``raw`` ends first. Each batch carries its
        stream position (raw samples taken), for resuming."""
        batch: list[dict[str, Any]] = []
        corrupt = 0
        if todo <= 0:
            return
        for sample in raw:
            pos += 1
            out = self.decode(sample, self.spec.epoch)
            if out is None:
                corrupt += 1
                continue
            batch.append(out)
            if len(batch) == self.spec.batch_size:
                yield self._emit(batch, logical, pos, corrupt)
                batch, corrupt, todo = [], 0, todo - 1
                if todo == 0:
                    return
        if partial and batch:
            yield self._emit(batch, logical, pos, corrupt)

    def _emit(self, batch: list[dict[str, Any]], logical: int, pos: int, corrupt: int) -> dict[str, Any]:
        collated = self.collate(batch)
        collated["_stream"] = torch.tensor([logical, pos, corrupt])
        return collated

    def _stream(self, logical: int) -> Iterator[dict[str, Any]]:
        s = self.spec
        if s.evaluation:
            # the rank's shards in order, once (last batch may be partial); a rank with fewer samples
            # than the largest pads with full batches from further passes (DDP needs equal counts)
            paths = [s.shards[i] for i in s.rank_shards()]
            done = 0
            for batch in self._batches(_read_shards(paths), s.batches_per_epoch, partial=True):
                done += 1
                yield batch
            yield from self._batches(_passes(paths, 0, 0), s.batches_per_epoch - done)
            return
        paths = [s.shards[i] for i in s.stream_shards(logical)]
        raw = _passes(paths, s.shuffle_buffer, sample_seed(s.seed, s.epoch, s.rank, logical, "shuffle"))
        pos = s.positions.get(logical, 0)
        for _ in range(pos):  # fast-forward on resume: tar bytes only, no decoding
            next(raw)
        todo = s.quota(logical) - s.quota(logical, s.skip_batches)
        yield from self._batches(raw, todo, logical, pos)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, n_physical = (info.id, info.num_workers) if info else (0, 1)
        s = self.spec
        if n_physical != s.n_streams and not (info is None and s.n_streams >= 1):
            raise RuntimeError(f"stream spec for {s.n_streams} workers run with {n_physical}")
        if info is None:  # in-process: interleave the logical streams exactly like a DataLoader
            its = [self._stream((p + s.skip_batches) % s.n_streams) for p in range(s.n_streams)]
            active = list(range(len(its)))
            while active:
                for p in list(active):
                    try:
                        yield next(its[p])
                    except StopIteration:
                        active.remove(p)
            return
        # DataLoader asks workers round-robin from worker 0: rotate so worker 0 continues the epoch
        yield from self._stream((physical + s.skip_batches) % s.n_streams)


class ShardLoader:
    """The train/val loader: a ``DataLoader`` per epoch, with Lightning-compatible state.

    Lightning saves ``state_dict()`` in checkpoints and calls ``load_state_dict`` before the
    first ``iter()`` on resume. ``len()`` is the exact number of batches per epoch on every rank.
    """

    def __init__(self, shards: list[str], counts: list[int], *, batch_size: int, seed: int, rank: int,
                 world_size: int, num_workers: int, shuffle_buffer: int, decode: Decode,
                 collate: Callable[[list[dict]], dict], train: bool = True, name: str = "train"):
        self.n_streams, self.batches_per_epoch = stream_layout(len(shards), counts, batch_size=batch_size,
                                                               world_size=world_size, num_workers=num_workers,
                                                               train=train, name=name)
        self.num_workers = self.n_streams if num_workers > 0 else 0
        self.shards, self.counts = shards, counts
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.decode, self.collate, self.train, self.name = decode, collate, train, name
        self.epoch, self.batches_done = 0, 0
        self.positions: dict[int, int] = {}
        self.corrupt = 0  # samples skipped as corrupt, this rank, since construction

    def __len__(self) -> int:
        return self.batches_per_epoch

    def spec(self) -> StreamSpec:
        return StreamSpec(self.shards, self.counts, self.batch_size, self.seed, self.epoch, self.rank,
                          self.world_size, self.n_streams, self.batches_per_epoch, self.shuffle_buffer,
                          not self.train, self.batches_done, dict(self.positions))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.batches_done >= self.batches_per_epoch:
            self.epoch, self.batches_done, self.positions = self.epoch + 1, 0, {}
        dataset = ShardStream(self.spec(), self.decode, self.collate)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                            persistent_workers=False, pin_memory=False,
                            prefetch_factor=4 if self.num_workers else None)
        return self._count(iter(loader))

    def _count(self, it: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for batch in it:
            stream, pos, corrupt = (int(v) for v in batch.pop("_stream"))
            self.positions[stream] = pos
            if corrupt:
                self.corrupt += corrupt
                log.warning("%s: skipped %d corrupt sample(s) (rank %d, %d so far)", self.name, corrupt,
                            self.rank, self.corrupt)
            self.batches_done += 1
            if self.batches_done >= self.batches_per_epoch:  # epoch done: the next iter() starts e+1
                self.epoch, self.batches_done, self.positions = self.epoch + 1, 0, {}
            yield batch

    # Lightning's _Stateful protocol ------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_done": self.batches_done,
                "positions": {str(k): v for k, v in self.positions.items()}, "n_streams": self.n_streams,
                "world_size": self.world_size, "seed": self.seed, "corrupt": self.corrupt}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.corrupt = int(state.get("corrupt", 0))
        same_layout = (state.get("n_streams") == self.n_streams and state.get("world_size") == self.world_size
                       and state.get("seed") == self.seed)
        if same_layout:
            self.batches_done = int(state["batches_done"])
            self.positions = {int(k): int(v) for k, v in state["positions"].items()}
        else:
            log.warning("%s: resumed with a different world size, worker count or seed; epoch %d restarts "
                        "from its first batch", self.name, self.epoch)
            self.batches_done, self.positions = 0, {}
