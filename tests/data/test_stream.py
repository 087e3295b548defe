"""The shard stream: epoch order, rank balance, worker order, exact resume, corrupt skipping."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from arlab.data.datamodule import ImageDecoder, ShardDataModule, collate_images
from arlab.data.shards import read_manifest
from arlab.data.stream import ShardLoader, ShardStream, epoch_shard_order
from arlab.errors import DataError


def loader(root, *, rank=0, world=1, workers=0, bs=4, seed=0, flip=0.5, train=True, buffer=16):
    m = read_manifest(root)
    info = m["splits"]["train"]
    return ShardLoader([str(root / s["name"]) for s in info["shards"]], [s["count"] for s in info["shards"]],
                       batch_size=bs, seed=seed, rank=rank, world_size=world, num_workers=workers,
                       shuffle_buffer=buffer, decode=ImageDecoder(8, flip if train else 0.0, seed),
                       collate=collate_images, train=train)


def keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def sample_ids(batch) -> torch.Tensor:
    """Recover each sample's index from its pixels (see conftest.make_image_shards)."""
    img = ((batch["image"] + 1) * 127.5).round().long()  # (B, 3, H, W)
    # a flipped image has the id pixel at column W-1
    left = img[:, 0, 0, 0] + 256 * img[:, 1, 0, 0]
    right = img[:, 0, 0, -1] + 256 * img[:, 1, 0, -1]
    flipped = img[:, 2, 0, -1] == 255
    return torch.where(flipped, right, left)


def check_keys_labels_captions(batches) -> None:
    """Every sample's key, label and caption are the ones its pixels encode (conftest.make_image_shards)."""
    for batch in batches:
        ids = sample_ids(batch)
        assert [f"k{i:06d}" for i in ids.tolist()] == batch["key"]
        assert batch["label"].tolist() == [i % 3 for i in ids.tolist()]
        assert batch["caption"] == [f"caption {i}" for i in ids.tolist()]


def test_batches_shapes_labels_and_pixels(image_shards):
    root = image_shards([10, 10, 10])
    ld = loader(root, flip=0.0)
    batches = list(ld)
    assert len(batches) == len(ld) == 30 // 4
    b = batches[0]
    assert b["image"].shape == (4, 3, 8, 8) and b["image"].dtype == torch.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1
    check_keys_labels_captions(batches)
    assert len(set(keys(batches))) == 28  # 7 full batches, no sample twice


def test_flips_happen_and_replay(image_shards):
    root = image_shards([40])
    a, b = list(loader(root, bs=8)), list(loader(root, bs=8))
    flipped = torch.cat([(x["image"][:, 2, 0, -1] > 0.9) for x in a])
    assert 0.2 < flipped.float().mean() < 0.8  # p = 0.5
    for x, y in zip(a, b):
        assert torch.equal(x["image"], y["image"])
    assert torch.equal(torch.cat([sample_ids(x) for x in a]),
                       torch.tensor([int(k[1:]) for k in keys(a)]))


def test_epochs_reshuffle_shards_and_samples(image_shards):
    root = image_shards([8] * 6)
    ld = loader(root)
    e0, e1 = keys(list(ld)), keys(list(ld))
    assert ld.epoch == 2
    assert sorted(e0) == sorted(e1) and e0 != e1
    assert epoch_shard_order(6, 0, 0) != epoch_shard_order(6, 0, 1)
    assert keys(list(loader(root, seed=0))) == e0
    assert keys(list(loader(root, seed=1))) != e0


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_equal_batches_and_disjoint_samples(image_shards, world):
    root = image_shards([10, 10, 10, 5, 7, 3])  # uneven shards: 45 samples
    per_rank = []
    for epoch_keys in range(2):  # two epochs, still balanced
        per_rank = []
        for r in range(world):
            ld = loader(root, rank=r, world=world)
            for _ in range(epoch_keys):
                list(ld)
            batches = list(ld)
            assert len(batches) == len(ld) == 45 // (world * 4)
            per_rank.append(set(keys(batches)))
        for a, b in itertools.combinations(per_rank, 2):
            assert not a & b, "two ranks read the same sample"


def test_shard_order_does_not_depend_on_world_size(image_shards):
    root = image_shards([6] * 8)
    order = epoch_shard_order(8, 0, 0)  # epoch 0's permutation: a function of (n, seed, epoch) only
    for world in (1, 2, 4):
        for r in range(world):
            assert loader(root, rank=r, world=world).spec().rank_shards() == order[r::world]


def test_worker_order_equals_in_process_interleave(image_shards):
    root = image_shards([8] * 6)
    ld = loader(root, workers=2)
    assert ld.num_workers == 2
    with_workers = list(ld)
    spec = loader(root, workers=2).spec()
    in_process = list(ShardStream(spec, ImageDecoder(8, 0.5, 0), collate_images))
    for b in in_process:
        b.pop("_stream")
    assert keys(with_workers) == keys(in_process)
    for x, y in zip(with_workers, in_process):
        assert torch.equal(x["image"], y["image"])


@pytest.mark.parametrize("workers,stop", [(0, 3), (2, 3), (2, 4), (3, 5)])
def test_resume_mid_epoch_is_exact(image_shards, workers, stop):
    root = image_shards([9] * 6)
    full = loader(root, workers=workers)
    ref = list(full) + list(full)  # two epochs uninterrupted
    first = loader(root, workers=workers)
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    state = first.state_dict()
    resumed = loader(root, workers=workers)
    resumed.load_state_dict(state)
    tail = list(resumed) + list(resumed)
    got = head + tail
    assert keys(got) == keys(ref)
    for x, y in zip(got, ref):
        assert torch.equal(x["image"], y["image"])


def test_resume_at_epoch_boundary_starts_next_epoch(image_shards):
    root = image_shards([8] * 4)
    a = loader(root)
    list(a)
    state = a.state_dict()
    assert state["epoch"] == 1 and state["batches_done"] == 0
    b = loader(root)
    b.load_state_dict(state)
    assert keys(list(b)) == keys(list(a))


def test_corrupt_samples_are_skipped_and_counted(image_shards, caplog):
    root = image_shards([10, 10], corrupt_keys=("k000003", "k000015"))
    ld = loader(root, bs=3, buffer=0)
    batches = list(ld)
    assert len(batches) == 20 // 3
    got = keys(batches)
    assert "k000003" not in got and "k000015" not in got
    assert ld.corrupt == 2
    assert ld.state_dict()["corrupt"] == 2
    assert any("corrupt" in r.message for r in caplog.records)


def test_too_few_shards_for_ranks_is_a_clear_error(image_shards):
    root = image_shards([5, 5])
    with pytest.raises(DataError, match="2 shard\\(s\\) cannot feed 3 ranks"):
        loader(root, world=3)


def test_workers_capped_by_shards(image_shards):
    root = image_shards([5, 5, 5])
    ld = loader(root, workers=8)
    assert ld.num_workers == 3
    assert len(list(ld)) == len(ld)


def test_datamodule_reads_manifest_and_validates_splits(image_shards):
    root = image_shards([10, 10])
    cfg = ShardDataModule.Config(root=str(root), image_size=8, batch_size=4, num_workers=0, val_split="")
    dm = ShardDataModule(cfg)
    assert dm.num_classes == 3
    assert len(dm.train_dataloader()) == 5
    assert dm.val_dataloader() == []
    bad = ShardDataModule(ShardDataModule.Config(root=str(root), val_split="validation"))
    with pytest.raises(DataError, match="split 'validation' is not in"):
        bad.setup()


def test_resize_and_center_crop(image_shards):
    root = image_shards([4], size=12)
    dec = ImageDecoder(8, 0.0, 0)
    from arlab.data.shards import iter_shard

    sample = next(iter_shard(next((root / "train").glob("*.tar"))))
    out = dec(sample, 0)
    assert out["image"].shape == (8, 8, 3)
    assert np.all(out["image"][:, :3, 2] > 200) and np.all(out["image"][:, -3:, 2] < 200)


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (3, 1)])
def test_evaluation_covers_every_sample_with_equal_batch_counts(image_shards, world, workers):
    root = image_shards([10, 10, 7, 3, 9])  # 39 samples
    per_rank = [list(loader(root, rank=r, world=world, workers=workers, bs=4, train=False))
                for r in range(world)]
    counts = [10, 10, 7, 3, 9]
    expected = max(-(-sum(counts[r::world]) // 4) for r in range(world))  # the largest rank's need
    assert [len(b) for b in per_rank] == [expected] * world
    seen = [k for batches in per_rank for k in keys(batches)]
    assert set(seen) == {f"k{i:06d}" for i in range(39)}
    if world == 1:
        assert len(seen) == 39  # exactly once, the last batch partial
