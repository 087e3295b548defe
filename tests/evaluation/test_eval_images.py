"""``arlab eval --images A --reference B``: image sets from .npz files, image folders and packed splits,
FID 0 for identical sets and > 0 for shifted ones, the real-vs-real floor, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from arlab.data.shapes import render
from arlab.errors import ArlabError
from arlab.evaluation.images import eval_images, load_image_set

from .test_eval_generator import KEYS, arlab


def shapes(n: int, offset: int = 10**9) -> tuple[np.ndarray, np.ndarray]:
    s = [render(offset + i) for i in range(n)]
    return np.stack([x.image for x in s]), np.array([x.label for x in s])


def save_npz(path, images, labels=None):
    np.savez(path, images=images, **({"labels": labels} if labels is not None else {}))
    return str(path)


def save_folder(root, images):
    for i, im in enumerate(images):  # nested folders, png and jpg names: found recursively, sorted by path
        d = root / f"part{i // 20}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"{i:04d}.png")
    return str(root)


@pytest.fixture
def net(tiny_classifier):
    return {"type": "classifier", "checkpoint": str(tiny_classifier[0]), "device": "cpu"}


def test_identical_sets_score_fid_zero_and_a_shifted_set_more(tmp_path, net):
    images, labels = shapes(40)
    a = save_npz(tmp_path / "a.npz", images, labels)
    b = save_folder(tmp_path / "pngs", images)
    assert np.array_equal(load_image_set(b).images, images)  # png round trip, path order
    metrics = ["fid", "kid", "precision_recall"]
    same, _ = eval_images(a, b, metrics=metrics, features=net)
    v = same["settings"][0]["metrics"]
    assert v["fid"] == pytest.approx(0.0, abs=1e-6) and v["precision"] == v["recall"] == 1.0
    assert v["fid_n_ref"] == 40
    noisy = images.astype(int) + np.random.default_rng(0).integers(-80, 81, images.shape)
    shifted = save_npz(tmp_path / "s.npz", np.clip(noisy, 0, 255).astype(np.uint8))  # the same images, noisy
    other, path = eval_images(shifted, b, metrics=metrics, features=net, out=tmp_path / "r.json")
    w = other["settings"][0]["metrics"]
    assert w["fid"] > 0.01 and w["precision"] < 0.5 and w["recall"] < 0.5  # (the tiny CNN's features are small)
    assert abs(v["kid"]) < w["kid"] / 10  # unbiased: about 0 (not exactly: the diagonal terms) on identical sets
    saved = json.loads(path.read_text())
    assert KEYS <= set(saved) and saved["kind"] == "images" and saved["n"] == 40
    assert saved["directions"] == {"fid": "min", "kid": "min", "precision": "max", "recall": "max"}
    assert saved["features"].startswith("classifier") and saved["reference"] == b


def test_real_vs_real_floor_on_packed_splits(tmp_path, net):
    """shapes-tiny test vs train: a small FID, far below noise vs train; the split's labels reach the checker."""
    real, _ = eval_images("shapes-tiny:test", "shapes-tiny:train", metrics=["fid", "shapes_checker"],
                          features=net)
    noise = np.random.default_rng(0).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    fake, _ = eval_images(save_npz(tmp_path / "noise.npz", noise), "shapes-tiny:train", metrics=["fid"], features=net)
    r = real["settings"][0]["metrics"]
    assert 0 <= r["fid"] < fake["settings"][0]["metrics"]["fid"] / 10
    assert r["class_acc"] > 0.99 and real["n"] == 200 and r["fid_n_ref"] == 2000


def test_the_cli_writes_the_report(tmp_path, capsys):
    images, labels = shapes(20)
    a = save_npz(tmp_path / "a.npz", images, labels)
    rc, out, err = arlab(capsys, "eval", "--images", a, "--reference", save_folder(tmp_path / "b", images),
                         "--metrics", "shapes_checker", "--out", str(tmp_path / "r.json"))
    assert rc == 0, err
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["settings"][0]["metrics"]["class_acc"] > 0.9 and f"wrote {tmp_path / 'r.json'}" in out


def test_unreadable_image_sets_are_refused_in_one_line(tmp_path):
    images, _ = shapes(4)
    folder = save_folder(tmp_path / "mixed", images)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "mixed" / "zz.png")
    with pytest.raises(ArlabError, match=r"is 16x16, but .* is 32x32; the images of a folder must share one size"):
        load_image_set(folder)
    np.savez(tmp_path / "bad.npz", pictures=images)
    with pytest.raises(ArlabError, match=r"has no 'images' array \(it has: pictures\)"):
        load_image_set(str(tmp_path / "bad.npz"))
    with pytest.raises(ArlabError, match=r"split 'val' is not in .*dataset.json \(splits: train, test\)"):
        load_image_set("shapes-tiny:val")
    with pytest.raises(ArlabError, match="has splits train, test: name one"):
        load_image_set("shapes-tiny")
    with pytest.raises(ArlabError, match="neither an image folder, an .npz, a shard folder nor a data preset"):
        load_image_set("shapez:test")
    small = save_npz(tmp_path / "small.npz", np.zeros((4, 16, 16, 3), np.uint8))
    with pytest.raises(ArlabError, match="--images are 16x16 but --reference 32x32"):
        eval_images(small, save_npz(tmp_path / "big.npz", images), metrics=["shapes_checker"])
