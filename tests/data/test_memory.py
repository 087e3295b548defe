"""``data.in_memory``: the split decoded once and batched from memory keeps the stream's contract (exact balance,
per-epoch order and flips, exact resume, corrupt samples counted) and yields the stream's batch format."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from arlab.data.datamodule import ImageDecoder, ShardDataModule, collate_images
from arlab.data.memory import MemoryLoader, epoch_permutation
from arlab.data.shards import iter_shard, read_manifest
from arlab.data.tokens import TokenDataModule, TokenDecoder, collate_tokens, decode_tokens
from arlab.errors import DataError
from tests.data.test_stream import check_keys_labels_captions, keys, loader


def mem(root, *, rank=0, world=1, bs=4, seed=0, flip=0.5, train=True):
    m = read_manifest(root)
    info = m["splits"]["train"]
    return MemoryLoader([str(root / s["name"]) for s in info["shards"]], [s["count"] for s in info["shards"]],
                        batch_size=bs, seed=seed, rank=rank, world_size=world,
                        decoder=ImageDecoder(8, flip if train else 0.0, seed), collate=collate_images, train=train)


def test_batches_have_the_streams_format_and_pixels(image_shards):
    root = image_shards([10, 10, 10])
    ld, ref = mem(root, flip=0.0), next(iter(loader(root, flip=0.0)))
    batches = list(ld)
    assert len(batches) == len(ld) == 30 // 4
    b = batches[0]
    assert set(b) == set(ref)
    for k in ("image", "label"):
        assert b[k].shape == ref[k].shape and b[k].dtype == ref[k].dtype
    assert b["image"].is_contiguous()
    check_keys_labels_captions(batches)
    assert len(set(keys(batches))) == 28  # 7 full batches, no sample twice


def test_an_epoch_is_the_seeded_permutation_and_epochs_differ(image_shards):
    root = image_shards([10, 10, 12])
    ld = mem(root, seed=5, flip=0.0)
    e0, e1 = keys(list(ld)), keys(list(ld))
    assert e0 == [f"k{i:06d}" for i in epoch_permutation(32, 5, 0)[:32].tolist()]
    assert e1 == [f"k{i:06d}" for i in epoch_permutation(32, 5, 1)[:32].tolist()]
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert keys(list(mem(root, seed=5, flip=0.0))) == e0  # a new loader, the same seed: the same order
    assert keys(list(mem(root, seed=6, flip=0.0))) != e0


def test_flips_are_the_streams_flips(image_shards):
    """An image's flip is the stream decoder's for the same (seed, epoch, key), in every epoch."""
    root = image_shards([40])
    ld = mem(root, bs=8, seed=2)
    dec = ImageDecoder(8, 0.5, 2)
    raw = {s["__key__"]: s for s in iter_shard(next((root / "train").glob("*.tar")))}
    flipped = []
    for epoch in range(2):
        for batch in ld:
            for key, img in zip(batch["key"], batch["image"]):
                want = collate_images([dec(raw[key], epoch)])["image"][0]
                assert torch.equal(img, want), (epoch, key)
                flipped.append(bool(img[2, 0, -1] > 0.9))
    assert 0.2 < np.mean(flipped) < 0.8


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_equal_batches_and_disjoint_samples(image_shards, world):
    root = image_shards([10, 10, 7, 3, 9])  # 39 samples
    per_rank = [list(mem(root, rank=r, world=world, bs=4)) for r in range(world)]
    expected = 39 // (world * 4)
    assert [len(b) for b in per_rank] == [expected] * world
    drawn = [set(keys(b)) for b in per_rank]
    assert all(len(d) == expected * 4 for d in drawn)  # no sample twice within a rank's epoch
    for i in range(world):
        for j in range(i + 1, world):
            assert not drawn[i] & drawn[j]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_covers_every_sample_in_order_with_equal_batch_counts(image_shards, world):
    root = image_shards([10, 10, 7, 3, 9])  # 39 samples
    per_rank = [list(mem(root, rank=r, world=world, bs=4, train=False)) for r in range(world)]
    expected = math.ceil(math.ceil(39 / world) / 4)  # the largest rank's batches
    assert [len(b) for b in per_rank] == [expected] * world
    for r, batches in enumerate(per_rank):
        own = [f"k{i:06d}" for i in range(r, 39, world)]
        assert keys(batches)[: len(own)] == own  # manifest order, once, then padding from the start
        assert all(len(b["key"]) == 4 for b in batches[-(-len(own) // 4):])  # pad batches are full
    if world == 1:
        assert keys(per_rank[0]) == [f"k{i:06d}" for i in range(39)]  # the last batch partial (3)


@pytest.mark.parametrize("stop", [1, 5, 7])
def test_resume_mid_epoch_is_exact(image_shards, stop):
    root = image_shards([8, 8, 8, 8])  # 8 batches of 4 per epoch
    full = mem(root)
    ref = [keys([b]) for _ in range(2) for b in full]
    a = mem(root)
    it = iter(a)
    got = [keys([next(it)]) for _ in range(stop)]
    state = a.state_dict()
    assert state["epoch"] == 0 and state["batches_done"] == stop
    b = mem(root)
    b.load_state_dict(state)
    got += [keys([x]) for x in b] + [keys([x]) for x in b]
    assert got == ref[: len(got)] and len(got) == 16


def test_resume_from_a_stream_state_restarts_the_epoch(image_shards, caplog):
    root = image_shards([8, 8])
    stream = loader(root)
    it = iter(stream)
    next(it), next(it)
    ld = mem(root)
    ld.load_state_dict(stream.state_dict())
    assert ld.batches_done == 0 and len(list(ld)) == 4
    assert any("different layout" in r.message for r in caplog.records)


def test_corrupt_samples_are_skipped_and_counted(image_shards, caplog):
    root = image_shards([10, 10], corrupt_keys=("k000003", "k000015"))
    ld = mem(root, bs=3)
    batches = list(ld)
    assert len(batches) == 18 // 3
    got = keys(batches)
    assert "k000003" not in got and "k000015" not in got and len(set(got)) == 18
    assert ld.corrupt == 2 and ld.state_dict()["corrupt"] == 2
    assert any("2 corrupt sample(s)" in r.message for r in caplog.records)


def test_too_few_samples_is_a_clear_error(image_shards):
    root = image_shards([3])
    with pytest.raises(DataError, match="3 samples are fewer than one batch of 4"):
        len(mem(root))


def test_datamodule_in_memory_gives_the_streams_samples(image_shards):
    root = image_shards([10, 10])
    make = lambda in_memory: ShardDataModule(ShardDataModule.Config(  # noqa: E731
        root=str(root), image_size=8, batch_size=4, num_workers=1, val_split="", flip=0.0, in_memory=in_memory))
    dm, ref = make(True), make(False)
    ld = dm.train_dataloader()
    assert isinstance(ld, MemoryLoader) and ld.num_workers == 0
    assert len(ld) == len(ref.train_dataloader()) == 5
    got, want = list(ld), list(ref.train_dataloader())
    by_key = {k: img for b in want for k, img in zip(b["key"], b["image"])}
    assert sorted(keys(got)) == sorted(by_key)  # 20 samples, 5 full batches: the same set, another order
    for b in got:
        for k, img in zip(b["key"], b["image"]):
            assert torch.equal(img, by_key[k])


def test_token_decoder_and_token_datamodule_in_memory(tmp_path):
    """Token shards: the in-memory loader yields the stream's token batches (values, dtypes, labels)."""
    from arlab.data.shards import ShardWriter, add_split, new_manifest, write_manifest

    root = tmp_path / "tok"
    m = new_manifest("toy", ["a", "b"], kind="tokens", token_dtype="int16",
                     tokenizer={"checkpoint": "t.ckpt", "vocab_size": 16, "scales": [2], "tokens_per_image": 4,
                                "image_size": 8})
    for split, n in (("train", 24), ("test", 6)):
        with ShardWriter(root / split, shard_size=10) as w:
            for j in range(n):
                w.write({"__key__": f"{split}{j:03d}", "tokens.npy": np.full(4, j % 16, np.int16), "cls": j % 2})
        add_split(m, split, w.shards, {"a": n - n // 2, "b": n // 2})
    write_manifest(root, m)
    make = lambda in_memory: TokenDataModule(TokenDataModule.Config(  # noqa: E731
        root=str(root), batch_size=8, num_workers=0, in_memory=in_memory))
    dm, ref = make(True), make(False)
    got, want = list(dm.train_dataloader()), list(ref.train_dataloader())
    assert len(got) == len(want) == 3
    assert got[0]["tokens"].dtype == want[0]["tokens"].dtype == torch.int64 and got[0]["tokens"].shape == (8, 4)
    rows = lambda bs: sorted((k, t.tolist(), int(y)) for b in bs  # noqa: E731
                             for k, t, y in zip(b["key"], b["tokens"], b["label"]))
    assert rows(got) == rows(want)
    val = list(dm.val_dataloader())
    assert keys(val) == [f"test{j:03d}" for j in range(6)]
    raw = next(iter_shard(next((root / "train").glob("*.tar"))))
    dec = TokenDecoder()
    assert dec.load(raw)["tokens"].tolist() == decode_tokens(raw, 3)["tokens"].tolist()
    assert dec.augment(dec.load(raw), 7)["key"] == raw["__key__"]
    collate_tokens([dec.load(raw)])  # the decoder's samples collate
