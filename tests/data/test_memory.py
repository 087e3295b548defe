"""``data.in_memory``: the split decoded once and batched from memory yields exactly the stream's batches (same
samples, order and flips for any ranks, workers, shuffle buffer and corrupt samples), so it keeps the stream's
contract (exact balance, per-epoch order, exact resume, corrupt samples counted)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arlab.data.datamodule import ImageDecoder, ShardDataModule, collate_images
from arlab.data.memory import MemoryLoader
from arlab.data.shards import iter_shard, read_manifest
from arlab.data.tokens import TokenDataModule, TokenDecoder, collate_tokens, decode_tokens
from arlab.errors import DataError
from tests.data.test_stream import check_keys_labels_captions, keys, loader


def mem(root, *, rank=0, world=1, workers=0, bs=4, seed=0, flip=0.5, train=True, buffer=16):
    """The in-memory twin of ``test_stream.loader`` (the same arguments)."""
    m = read_manifest(root)
    info = m["splits"]["train"]
    return MemoryLoader([str(root / s["name"]) for s in info["shards"]], [s["count"] for s in info["shards"]],
                        batch_size=bs, seed=seed, rank=rank, world_size=world,
                        decoder=ImageDecoder(8, flip if train else 0.0, seed), collate=collate_images, train=train,
                        num_workers=workers, shuffle_buffer=buffer)


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["key"] == w["key"], i
        assert torch.equal(g["image"], w["image"]) and torch.equal(g["label"], w["label"]), i
        assert g["caption"] == w["caption"], i


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


@pytest.mark.parametrize("world,workers,buffer", [(1, 0, 16), (1, 1, 2000), (1, 2, 5), (2, 2, 16), (3, 1, 0)])
def test_every_epoch_is_the_streams_batches(image_shards, world, workers, buffer):
    """Batch for batch, two epochs, every rank: the same keys, pixels (flips), labels and captions as the shard
    stream with the same seed, ranks, workers and shuffle buffer (uneven shards, a corrupt sample)."""
    root = image_shards([10, 10, 7, 3, 9, 12], corrupt_keys=("k000004",))
    for r in range(world):
        a = mem(root, rank=r, world=world, workers=workers, buffer=buffer, seed=3)
        b = loader(root, rank=r, world=world, workers=workers, buffer=buffer, seed=3)
        assert a.n_streams == b.n_streams and len(a) == len(b)
        for _ in range(2):
            assert_same_batches(list(a), list(b))
        assert a.epoch == b.epoch == 2 and a.corrupt == 1


def test_the_global_random_stream_is_the_streams(image_shards):
    """A DataLoader iterator draws a base seed from torch's global generator: the in-memory loader draws it too,
    so what a run draws afterwards (e.g. CFG class dropout) does not depend on in_memory."""
    root = image_shards([10, 10])
    after = []
    for make in (mem, loader):
        ld = make(root, workers=1)
        torch.manual_seed(11)
        it = iter(ld)
        next(it)
        list(iter(make(root, train=False)))
        after.append(torch.rand(4))
    assert torch.equal(after[0], after[1])


def test_epochs_differ_and_seeds_differ(image_shards):
    root = image_shards([10, 10, 12])
    ld = mem(root, seed=5, flip=0.0)
    e0, e1 = keys(list(ld)), keys(list(ld))
    assert e0 != e1 and sorted(e0) == sorted(e1) and len(set(e0)) == 32
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


@pytest.mark.parametrize("world", [1, 2, 3])
def test_evaluation_is_the_streams_and_covers_every_sample_once(image_shards, world):
    root = image_shards([10, 10, 7, 3, 9])  # 39 samples
    per_rank = [list(mem(root, rank=r, world=world, bs=4, train=False)) for r in range(world)]
    for r, batches in enumerate(per_rank):
        assert_same_batches(batches, list(loader(root, rank=r, world=world, bs=4, train=False)))
    assert len({len(b) for b in per_rank}) == 1  # equal batch counts (short ranks pad with full batches)
    counts = [10, 10, 7, 3, 9]
    own = [sum(counts[r::world]) for r in range(world)]  # rank r reads shards r::W, once, in manifest order
    firsts = [k for r, batches in enumerate(per_rank) for k in keys(batches)[: own[r]]]
    assert sorted(firsts) == [f"k{i:06d}" for i in range(39)]
    if world == 1:
        assert keys(per_rank[0]) == [f"k{i:06d}" for i in range(39)]  # the last batch partial (3)


def test_every_evaluation_pass_starts_from_the_first_batch(image_shards):
    """Lightning cuts validation short (limit_val_batches, the sanity check): the next pass starts again from
    the first batch, as the stream's does, so every validation scores the same samples."""
    root = image_shards([10, 10, 7])
    a, b = mem(root, train=False), loader(root, train=False)
    for ld in (a, b):
        it = iter(ld)
        next(it), next(it)  # a sanity check of 2 batches
    first_a, first_b = list(a)[:3], list(b)[:3]
    assert_same_batches(first_a, first_b)
    assert keys(first_a) == [f"k{i:06d}" for i in range(12)]


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


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_state_resumes_exactly_in_memory(image_shards, workers):
    """The batches are the stream's, so a run can switch in_memory on when it resumes, mid-epoch."""
    root = image_shards([8, 8, 8, 8])
    stream = loader(root, workers=workers)
    it = iter(stream)
    seen = [next(it) for _ in range(3)]
    ld = mem(root, workers=workers)
    ld.load_state_dict(stream.state_dict())
    assert ld.batches_done == 3
    ref = loader(root, workers=workers)
    assert_same_batches(seen + list(ld) + list(ld), list(ref) + list(ref))  # the rest of epoch 0, then epoch 1


@pytest.mark.parametrize("workers,stop", [(0, 3), (2, 3), (2, 4)])
def test_an_in_memory_state_resumes_exactly_in_the_stream(image_shards, workers, stop):
    """The other way: an in-memory checkpoint carries each logical stream's position (raw samples taken,
    corrupt ones included), so the stream resumes it mid-epoch with the batches an uninterrupted run sees."""
    root = image_shards([8, 9, 8, 8], corrupt_keys=("k000010",))
    ld = mem(root, workers=workers)
    it = iter(ld)
    seen = [next(it) for _ in range(stop)]
    state = ld.state_dict()
    assert state["batches_done"] == stop and state["positions"]
    stream = loader(root, workers=workers)
    stream.load_state_dict(state)
    assert stream.batches_done == stop
    ref = loader(root, workers=workers)
    assert_same_batches(seen + list(stream) + list(stream), list(ref) + list(ref))


def test_another_layout_restarts_the_epoch(image_shards, caplog):
    root = image_shards([8, 8])
    a = mem(root, workers=1)
    it = iter(a)
    next(it), next(it)
    state = a.state_dict()
    b = mem(root, workers=2)  # another logical-stream count: another order
    b.load_state_dict(state)
    assert b.batches_done == 0 and len(list(b)) == 4
    assert any("different layout" in r.message for r in caplog.records)
    c = mem(root)
    c.load_state_dict({k: v for k, v in state.items() if k != "n_streams"})  # an older in-memory loader's state
    assert c.batches_done == 0


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


@pytest.mark.parametrize("workers", [1, 2])
def test_datamodule_in_memory_gives_the_streams_batches(image_shards, workers):
    root = image_shards([10, 10, 6])
    make = lambda in_memory: ShardDataModule(ShardDataModule.Config(  # noqa: E731
        root=str(root), image_size=8, batch_size=4, num_workers=workers, shuffle_buffer=7, val_split="",
        in_memory=in_memory), seed=4)
    dm, ref = make(True), make(False)
    ld = dm.train_dataloader()
    assert isinstance(ld, MemoryLoader) and ld.num_workers == 0
    assert len(ld) == len(ref.train_dataloader()) == 6
    assert_same_batches(list(ld), list(ref.train_dataloader()))


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
    for g, w in zip(got, want):  # batch for batch, the stream's
        assert g["key"] == w["key"] and torch.equal(g["tokens"], w["tokens"]) and torch.equal(g["label"], w["label"])
    val = list(dm.val_dataloader())
    assert keys(val) == [f"test{j:03d}" for j in range(6)]
    raw = next(iter_shard(next((root / "train").glob("*.tar"))))
    dec = TokenDecoder()
    assert dec.load(raw)["tokens"].tolist() == decode_tokens(raw, 3)["tokens"].tolist()
    assert dec.augment(dec.load(raw), 7)["key"] == raw["__key__"]
    collate_tokens([dec.load(raw)])  # the decoder's samples collate
