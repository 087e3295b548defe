"""`arlab data pack`: ImageFolder (directory or tar archive) -> WebDataset shards."""

from __future__ import annotations

import gzip
import io
import json
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import arlab.data.pack as pack_mod
from arlab.data.pack import pack_imagefolder
from arlab.data.shards import iter_shard, read_manifest
from arlab.errors import DataError

CIFAR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cifar10-jpg.tar.gz"
CLASSES = ["bird", "cat", "dog"]
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "tif", "tiff", "gif")


def encode(arr: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(arr)
    if mode:
        im = im.convert(mode)
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def make_folder(root: Path) -> dict:
    """A small ImageFolder with good and broken files; returns what the packer should make of it.

    ``good[split][path]`` = (bytes, class, caption or None, (w, h), stored extension);
    ``bad`` = {(split, path)} of files that must be reported as corrupt.
    """
    rng = np.random.default_rng(123)
    good: dict[str, dict[str, tuple]] = {"train": {}, "test": {}}
    bad: set[tuple[str, str]] = set()

    def put(split: str, rel: str, data: bytes) -> Path:
        path = root / split / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    for split, n in (("train", 5), ("test", 3)):
        for c, cls in enumerate(CLASSES):
            for j in range(n):
                h, w = (8, 8) if j % 2 == 0 else (6, 10)
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                kind = (j + c) % 4
                if kind == 0:
                    name, data, ext = f"{j:03d}.png", encode(arr, "PNG"), "png"
                elif kind == 1:
                    name, data, ext = f"{j:03d}.jpg", encode(arr, "JPEG"), "jpg"
                elif kind == 2:
                    name, data, ext = f"{j:03d}.jpeg", encode(arr, "JPEG"), "jpg"
                else:
                    name, data, ext = f"{j:03d}.png", encode(arr, "PNG", "L"), "png"
                put(split, f"{cls}/{name}", data)
                caption = None
                if j == 1:
                    caption = f"a {cls} number {j} in {split}"
                    put(split, f"{cls}/{j:03d}.txt", (caption + "\n").encode())
                good[split][f"{cls}/{name}"] = (data, cls, caption, (w, h), ext)
    # not images: ignored
    put("train", "cat/notes.md", b"# notes")
    (root / "README").write_text("an ImageFolder")
    # broken files
    big = encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    put("train", "cat/truncated.jpg", big[: len(big) // 2])
    put("train", "dog/noise.png", rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
    put("test", "bird/empty.jpg", b"")
    bad |= {("train", "cat/truncated.jpg"), ("train", "dog/noise.png"), ("test", "bird/empty.jpg")}
    return {"good": good, "bad": bad}


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "imagefolder"
    return root, make_folder(root)


def read_split(out: Path, manifest: dict, split: str) -> list[dict[str, bytes]]:
    samples = []
    for shard in manifest["splits"][split]["shards"]:
        samples += list(iter_shard(out / shard["name"]))
    return samples


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/shard-*.tar"))}


def pack(src: Path, out: Path, **kw) -> dict:
    kw.setdefault("shard_size", 4)
    kw.setdefault("progress", False)
    kw.setdefault("workers", 1)
    return pack_imagefolder(src, out, **kw)


def make_tar(src: Path, dest: Path, mode: str, wrap: str | None) -> Path:
    """Tar ``src`` with members in a scrambled order (listing order must not matter)."""
    paths = sorted(src.rglob("*"))
    random.Random(7).shuffle(paths)
    with tarfile.open(dest, mode) as tar:
        for p in paths:
            arcname = p.relative_to(src).as_posix()
            tar.add(p, arcname=f"{wrap}/{arcname}" if wrap else arcname, recursive=False)
    return dest


# ----------------------------------------------------------------------------- round trip


def test_round_trip(folder, tmp_path):
    src, want = folder
    out = tmp_path / "out"
    m = pack(src, out)
    assert read_manifest(out)["splits"] == m["splits"]
    assert m["classes"] == CLASSES
    assert m["captions"] is True
    assert m["shard_size"] == 4 and m["seed"] == 0 and m["name"] == "imagefolder"
    assert set(m["splits"]) == {"train", "test"}
    for split, good in want["good"].items():
        samples = read_split(out, m, split)
        assert [s["__key__"] for s in samples] == [f"{i:08d}" for i in range(len(good))]
        seen = set()
        for s in samples:
            meta = json.loads(s["json"])
            data, cls, caption, (w, h), ext = good[meta["path"]]
            seen.add(meta["path"])
            assert [k for k in s if k in IMAGE_KEYS] == [ext]
            assert s[ext] == data  # the original bytes, never re-encoded
            assert meta == {"path": meta["path"], "class": cls, "width": w, "height": h}
            assert m["classes"][int(s["cls"])] == cls
            if caption is None:
                assert "txt" not in s
            else:
                assert s["txt"].decode() == caption
        assert seen == set(good)  # every good image exactly once
        info = m["splits"][split]
        assert info["count"] == len(good)
        assert info["per_class"] == dict(Counter(v[1] for v in good.values()))
        assert info["image_sizes"] == {f"{w}x{h}": n for (w, h), n in
                                       sorted(Counter(v[3] for v in good.values()).items())}
        counts = [s["count"] for s in info["shards"]]
        assert counts[:-1] == [4] * (len(counts) - 1) and 1 <= counts[-1] <= 4 and sum(counts) == len(good)
        assert [s["name"] for s in info["shards"]] == [f"{split}/shard-{i:06d}.tar" for i in range(len(counts))]
        files = sorted(p.name for p in (out / split).iterdir())
        assert files == [f"shard-{i:06d}.tar" for i in range(len(counts))]  # no leftovers
    assert sorted(out.iterdir()) == sorted([out / "dataset.json", out / "train", out / "test"])


def test_corrupt_files_are_listed_and_skipped(folder, tmp_path):
    src, want = folder
    out = tmp_path / "out"
    m = pack(src, out)  # does not raise
    assert {(c["split"], c["path"]) for c in m["corrupt"]} == want["bad"]
    assert all(isinstance(c["error"], str) and c["error"] for c in m["corrupt"])
    errors = {c["path"]: c["error"] for c in m["corrupt"]}
    assert "truncated" in errors["cat/truncated.jpg"]
    assert "empty" in errors["bird/empty.jpg"]
    assert read_manifest(out)["corrupt"] == m["corrupt"]
    for split in ("train", "test"):
        paths = {json.loads(s["json"])["path"] for s in read_split(out, m, split)}
        assert not paths & {p for s, p in want["bad"]}
        assert "cat/notes.md" not in paths


def test_decompression_bombs_are_skipped(folder, tmp_path, monkeypatch):
    src, want = folder
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # every 8x8 / 10x6 image is now a "bomb"
    m = pack(src, tmp_path / "out")
    bombs = {(c["split"], c["path"]) for c in m["corrupt"] if c["error"].startswith("DecompressionBombError")}
    assert bombs >= {(split, path) for split, good in want["good"].items() for path in good}
    assert m["splits"]["train"]["count"] == m["splits"]["test"]["count"] == 0
    assert read_manifest(tmp_path / "out")["splits"]["train"]["shards"] == []


def test_jpeg_and_tiff_extensions_are_normalised(tmp_path):
    src = tmp_path / "src"
    arr = np.zeros((4, 4, 3), np.uint8)
    (src / "val" / "a").mkdir(parents=True)
    (src / "val" / "a" / "x.JPEG").write_bytes(encode(arr, "JPEG"))
    (src / "val" / "a" / "y.tiff").write_bytes(encode(arr, "TIFF"))
    m = pack(src, tmp_path / "out")
    samples = read_split(tmp_path / "out", m, "val")
    exts = sorted(k for s in samples for k in s if k in IMAGE_KEYS)
    assert exts == ["jpg", "tif"]
    assert sorted(json.loads(s["json"])["path"] for s in samples) == ["a/x.JPEG", "a/y.tiff"]


# ----------------------------------------------------------------------------- archives


@pytest.mark.parametrize("mode,suffix,wrap", [
    ("w", ".tar", None),
    ("w", ".tar", "wrapper"),
    ("w:gz", ".tar.gz", None),
    ("w:gz", ".tgz", "imagefolder"),
    ("w:bz2", ".tar.bz2", "x"),
    ("w:xz", ".tar.xz", None),
])
def test_archive_gives_the_same_shards_as_the_directory(folder, tmp_path, mode, suffix, wrap):
    src, _ = folder
    ref = pack(src, tmp_path / "ref")
    archive = make_tar(src, tmp_path / f"input{suffix}", mode, wrap)
    m = pack(archive, tmp_path / "from_tar")
    assert shard_bytes(tmp_path / "from_tar") == shard_bytes(tmp_path / "ref")
    assert m["splits"] == ref["splits"] and m["classes"] == ref["classes"]
    assert m["corrupt"] == ref["corrupt"]
    assert m["name"] == "input" and m["source"] == str(archive)
    # the temporary uncompressed copy is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["imagefolder", "ref", "from_tar", archive.name])


def test_wrapping_directory_is_stripped(folder, tmp_path):
    src, _ = folder
    ref = pack(src, tmp_path / "ref")
    outer = tmp_path / "outer"
    shutil.copytree(src, outer / src.name)  # outer/imagefolder/train/... (the output must lie outside the input)
    m = pack(outer, tmp_path / "wrapped", splits=["train", "test"])
    assert shard_bytes(tmp_path / "wrapped") == shard_bytes(tmp_path / "ref")
    assert m["splits"] == ref["splits"]


# ----------------------------------------------------------------------------- determinism


def test_seed_determines_the_order(folder, tmp_path):
    src, _ = folder
    a = pack(src, tmp_path / "a", seed=1)
    pack(src, tmp_path / "b", seed=1)
    c = pack(src, tmp_path / "c", seed=2)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    for split in ("train", "test"):
        sa, sc = read_split(tmp_path / "a", a, split), read_split(tmp_path / "c", c, split)
        paths_a = [json.loads(s["json"])["path"] for s in sa]
        paths_c = [json.loads(s["json"])["path"] for s in sc]
        assert paths_a != paths_c and sorted(paths_a) == sorted(paths_c)
        content = lambda ss: Counter((next(s[k] for k in IMAGE_KEYS if k in s), s["cls"]) for s in ss)
        assert content(sa) == content(sc)
    assert paths_a != sorted(paths_a)  # shuffled, not in file order


def test_split_selection_keeps_order_and_class_indices(folder, tmp_path):
    src, _ = folder
    full = pack(src, tmp_path / "full")
    m = pack(src, tmp_path / "test_only", splits=["test"])
    assert list(m["splits"]) == ["test"] and m["classes"] == full["classes"]
    assert m["splits"]["test"] == full["splits"]["test"]
    assert shard_bytes(tmp_path / "test_only") == {
        k: v for k, v in shard_bytes(tmp_path / "full").items() if k.startswith("test/")}
    assert {c["split"] for c in m["corrupt"]} == {"test"}


def test_workers_do_not_change_the_output(folder, tmp_path, monkeypatch):
    src, _ = folder
    pools = []

    class Pool(pack_mod.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pack_mod, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(pack_mod, "_BATCH_ITEMS", 3)  # many small tasks: results arrive out of order
    one = pack(src, tmp_path / "w1", workers=1)
    assert pools == []
    two = pack(src, tmp_path / "w2", workers=2)
    assert len(pools) == 1
    auto = pack(src, tmp_path / "w0", workers=0)
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2") == shard_bytes(tmp_path / "w0")
    assert one["splits"] == two["splits"] == auto["splits"]
    assert one["corrupt"] == two["corrupt"] == auto["corrupt"]


# ----------------------------------------------------------------------------- errors


def test_error_missing_src(tmp_path):
    with pytest.raises(DataError, match="nope"):
        pack(tmp_path / "nope", tmp_path / "out")


def test_error_not_an_archive(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello, not a tar\n" * 100)
    with pytest.raises(DataError, match="notes.txt") as e:
        pack(bad, tmp_path / "out")
    assert "neither a directory nor a tar" in str(e.value)
    gz = tmp_path / "fake.tar.gz"  # gzip, but not of a tar
    gz.write_bytes(gzip.compress(b"x" * 5000))
    with pytest.raises(DataError, match="fake.tar.gz"):
        pack(gz, tmp_path / "out")
    assert not (tmp_path / "out" / "dataset.json").exists()


def test_error_empty_folder(tmp_path):
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "cat" / "readme.md").write_text("no images")
    with pytest.raises(DataError, match="empty") as e:
        pack(tmp_path / "empty", tmp_path / "out")
    assert "no images" in str(e.value)


def test_error_no_split_folders(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(encode(np.zeros((4, 4, 3), np.uint8), "PNG"))
    with pytest.raises(DataError, match="no split folders in .*flat"):
        pack(tmp_path / "flat", tmp_path / "out")


def test_error_unknown_split(folder, tmp_path):
    src, _ = folder
    with pytest.raises(DataError, match="'tset'") as e:
        pack(src, tmp_path / "out", splits=["tset"])
    assert "test, train" in str(e.value) and "Did you mean 'test'" in str(e.value)


def test_error_bad_shard_size(folder, tmp_path):
    src, _ = folder
    with pytest.raises(DataError, match="shard_size .* got 0"):
        pack(src, tmp_path / "out", shard_size=0)


def test_existing_output_needs_overwrite(folder, tmp_path):
    src, _ = folder
    out = tmp_path / "out"
    pack(src, out, shard_size=2)
    before = shard_bytes(out)
    assert len([k for k in before if k.startswith("train/")]) == 8
    with pytest.raises(DataError, match=str(out)) as e:
        pack(src, out, shard_size=100)
    assert "overwrite" in str(e.value)
    assert shard_bytes(out) == before  # untouched
    m = pack(src, out, shard_size=100, overwrite=True)
    assert sorted(shard_bytes(out)) == ["test/shard-000000.tar", "train/shard-000000.tar"]
    assert read_manifest(out)["splits"] == m["splits"]
    assert m["splits"]["train"]["shards"] == [{"name": "train/shard-000000.tar", "count": 15}]


def test_unfinished_output_needs_overwrite(folder, tmp_path):
    src, _ = folder
    out = tmp_path / "out"
    pack(src, out)
    (out / "dataset.json").unlink()  # as if the pack had crashed before the manifest
    with pytest.raises(DataError, match="unfinished"):
        pack(src, out)
    pack(src, out, overwrite=True)
    assert read_manifest(out)["splits"]["train"]["count"] == 15


# ----------------------------------------------------------------------------- CIFAR-10


@pytest.mark.cifar
def test_pack_cifar10(tmp_path):
    if not CIFAR.exists():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR.resolve()} (see ../shared/data/README.md)")
    out = tmp_path / "cifar10"
    m = pack_imagefolder(CIFAR, out, shard_size=5000, progress=False)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert m["classes"] == classes and m["corrupt"] == []
    assert read_manifest(out)["splits"] == m["splits"]
    for split, n in (("train", 50_000), ("test", 10_000)):
        info = m["splits"][split]
        assert info["count"] == n and info["per_class"] == dict.fromkeys(classes, n // 10)
        assert info["image_sizes"] == {"32x32": n}
        assert [s["count"] for s in info["shards"]] == [5000] * (n // 5000)
    # sampled entries: byte-identical to the archive members, with the right label
    rng = random.Random(0)
    wanted: dict[str, tuple[bytes, int]] = {}
    for split in ("train", "test"):
        shards = m["splits"][split]["shards"]
        for shard in (shards[0], shards[-1]):
            for s in iter_shard(out / shard["name"]):
                if rng.random() < 0.05:
                    meta = json.loads(s["json"])
                    assert meta["class"] == meta["path"].split("/")[0]
                    wanted[f"{split}/{meta['path']}"] = (s["jpg"], int(s["cls"]))
    assert len(wanted) > 500
    found = 0
    with tarfile.open(CIFAR, "r|gz") as tar:
        for member in tar:
            if member.name in wanted:
                data, label = wanted[member.name]
                assert tar.extractfile(member).read() == data, member.name
                assert classes[label] == member.name.split("/")[1]
                found += 1
    assert found == len(wanted)
