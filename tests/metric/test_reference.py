"""metric/reference: statistics equal a direct computation, are cached atomically under $ARLAB_CACHE, reused,
and recomputed when the data set's manifest (or the split, size or feature network) changes."""

from __future__ import annotations

import numpy as np
import pytest

from arlab.errors import ConfigError
from arlab.features.base import FeatureNet
from arlab.metric.reference import reference_stats
from tests.conftest import make_image_shards


class CountingNet(FeatureNet):
    """Per-channel mean and std of the image (6-d); counts its batches."""

    def __init__(self, tag: str = "1"):
        self.tag, self.calls = tag, 0

    @property
    def dim(self) -> int:
        return 6

    @property
    def preprocessing(self) -> str:
        return "uint8 channel mean/std"

    def identity(self) -> str:
        return f"counting:{self.tag}"

    def extract(self, images_nhwc):
        self.calls += 1
        x = images_nhwc.reshape(len(images_nhwc), -1, 3).astype(np.float64)
        return np.concatenate([x.mean(1), x.std(1)], 1), None


@pytest.fixture
def shards(tmp_path, monkeypatch):
    monkeypatch.setenv("ARLAB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "set"
    make_image_shards(root, [6, 5], size=8)
    return root, {"type": "shards", "root": str(root), "val_split": "", "image_size": 8, "num_workers": 0}


def test_statistics_equal_a_direct_computation(shards):
    root, node = shards
    net = CountingNet()
    ref = reference_stats(node, "train", net, 8, bank_size=4)
    from arlab.data.datamodule import ImageDecoder
    from arlab.data.shards import iter_shard

    decode = ImageDecoder(8, 0.0, 0)
    images = np.stack([decode(s, 0)["image"] for p in sorted((root / "train").glob("*.tar")) for s in iter_shard(p)])
    f = net.features(images)
    assert ref.n == 11 and ref.bank.shape == (4, 6) and ref.bank.dtype == np.float32
    np.testing.assert_allclose(ref.mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(ref.sigma, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ref.bank, f[:4], rtol=1e-6)


def test_cached_reused_and_recomputed_when_the_manifest_changes(shards, tmp_path):
    root, node = shards
    net = CountingNet()
    first = reference_stats(node, "train", net, 8)
    calls = net.calls
    assert calls > 0 and first.path.parent == tmp_path / "cache" / "reference" and first.path.is_file()
    assert not list(first.path.parent.glob("*.tmp-*"))  # written to a temporary name, then renamed
    again = reference_stats(node, "train", net, 8)
    assert net.calls == calls and again.key == first.key  # from the cache
    np.testing.assert_array_equal(again.sigma, first.sigma)

    make_image_shards(root, [6, 5, 4], size=8)  # the set changes: a new manifest
    changed = reference_stats(node, "train", net, 8)
    assert net.calls > calls and changed.n == 15 and changed.key != first.key

    calls = net.calls
    assert reference_stats(node, "train", CountingNet("2"), 8).key != changed.key  # other weights: other key
    assert reference_stats(node, "train", net, 16).key != changed.key  # other image size: other key
    assert net.calls > calls


def test_a_file_with_another_key_is_not_trusted(shards):
    _, node = shards
    net = CountingNet()
    ref = reference_stats(node, "train", net, 8)
    with open(ref.path, "wb") as f:  # e.g. a stale or foreign file under the same name
        np.savez(f, mu=ref.mu, sigma=ref.sigma, bank=ref.bank, n=np.int64(1), key=np.str_("other"))
    calls = net.calls
    assert reference_stats(node, "train", net, 8).n == 11 and net.calls > calls


def test_unknown_split_names_the_choices(shards):
    _, node = shards
    with pytest.raises(ConfigError, match=r"split 'val' .*splits: train"):
        reference_stats(node, "val", CountingNet(), 8)
