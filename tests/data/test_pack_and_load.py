"""An unseen ImageFolder (mixed sizes and formats, broken files) packs, reports, and loads."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from arlab.data.datamodule import ShardDataModule
from arlab.data.pack import pack_imagefolder


def test_foreign_imagefolder_with_broken_files_packs_and_streams(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "flowers"
    sizes = [(48, 40), (64, 64), (40, 56), (33, 33)]
    n = 0
    for split, per in (("train", 12), ("val", 4)):
        for cls in ("daisy", "rose", "tulip"):
            d = src / split / cls
            d.mkdir(parents=True)
            for i in range(per):
                w, h = sizes[(n + i) % len(sizes)]
                arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
                fmt = "JPEG" if i % 2 else "PNG"
                Image.fromarray(arr).save(d / f"img{i}.{'jpg' if fmt == 'JPEG' else 'png'}", format=fmt)
            n += per
    good = (src / "train" / "rose" / "img1.jpg").read_bytes()
    (src / "train" / "rose" / "broken.jpg").write_bytes(good[: len(good) // 3])  # truncated JPEG
    (src / "train" / "tulip" / "noise.png").write_bytes(b"\x89PNG not really")
    (src / "val" / "daisy" / "empty.jpg").write_bytes(b"")

    m = pack_imagefolder(src, tmp_path / "shards", shard_size=5, progress=False)
    assert sorted(c["path"] for c in m["corrupt"]) == ["daisy/empty.jpg", "rose/broken.jpg", "tulip/noise.png"]
    assert m["splits"]["train"]["count"] == 36 and m["splits"]["val"]["count"] == 12
    assert set(m["splits"]["train"]["image_sizes"]) == {"48x40", "64x64", "40x56", "33x33"}

    cfg = ShardDataModule.Config(root=str(tmp_path / "shards"), val_split="val", image_size=32, batch_size=4,
                                 num_workers=2, shuffle_buffer=16)
    dm = ShardDataModule(cfg, seed=1)
    assert dm.classes == ["daisy", "rose", "tulip"]
    train = list(dm.train_dataloader())
    val = list(dm.val_dataloader())
    assert len(train) == 36 // 4 and len(val) == 12 // 4
    for b in train + val:
        assert b["image"].shape == (4, 3, 32, 32) and torch.isfinite(b["image"]).all()
        assert set(b["label"].tolist()) <= {0, 1, 2}
    keys = [k for b in val for k in b["key"]]
    assert len(set(keys)) == 12  # evaluation sees every sample once
