"""Pack an ImageFolder (a directory or a tar archive of one) into WebDataset shards.

Input layout is ``split/class/image`` (one extra wrapping folder such as ``cifar10/train/cat/1.jpg``
is stripped). Every image is fully decoded once with PIL to catch corrupt files, which are listed in
``manifest["corrupt"]`` and skipped; the image bytes themselves are copied, never re-encoded.
Output (see :mod:`.shards`)::

    OUT/dataset.json
    OUT/<split>/shard-000000.tar   samples 00000000.jpg/.cls/.json[/.txt], ...

Each split is written in a seeded shuffled order of its sorted file list, so the shards depend only
on the input files, ``seed`` and ``shard_size``: not on the file system's listing order, on whether
the input was a directory or an archive, nor on the number of decode workers.

Compressed archives (``.tar.gz``/``.tgz``, ``.tar.bz2``, ``.tar.xz``) are decompressed once, as a
stream, into a temporary plain tar next to ``OUT`` whose members are then read by offset; plain
``.tar`` files are read by offset directly. Time and memory stay linear in the archive size.

Longer than 400 lines because it is one pipeline that must stay in one place: it reads every input form
(folders, tar, compressed tar streamed without unpacking), resolves the split/class layout, decodes in
worker processes, and writes shards and the manifest in an order that never leaves a folder that looks
complete.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import multiprocessing
import os
import posixpath
import re
import shutil
import sys
import tarfile
import tempfile
import zlib
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError
from tqdm.auto import tqdm

from arlab.data.images import decode_rgb
from arlab.data.shards import (
    IMAGE_EXTS,
    MANIFEST,
    ShardWriter,
    add_split,
    new_manifest,
    read_manifest,
    write_manifest,
)
from arlab.errors import DataError, did_you_mean, format_choices
from arlab.utils import atomic_dir, same_or_nested

__all__ = ["pack_imagefolder"]

_EXT_ALIASES = {"jpeg": "jpg", "tiff": "tif"}
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz", ".tar")
_BATCH_ITEMS = 64  # images per decode task
_BATCH_BYTES = 16 << 20  # ... or fewer when they are large
_HANDLE = tuple[str, int, int]  # (file, offset, size); size -1 = the whole file


# ----------------------------------------------------------------------------- input listing


KNOWN_SPLITS = frozenset({"train", "training", "test", "testing", "val", "valid", "validation", "dev", "eval"})


def _skip_name(rel: str) -> bool:
    """Hidden files and folders (``.DS_Store``, ``._x.jpg``, ``.ipynb_checkpoints``) and ``__MACOSX``."""
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


def _list_directory(root: Path) -> dict[str, _HANDLE]:
    """Every regular file below ``root``: relative POSIX path -> (path, 0, -1)."""
    files: dict[str, _HANDLE] = {}
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in filenames:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            full = os.path.join(dirpath, name)
            if not _skip_name(rel) and os.path.isfile(full):
                files[rel] = (full, 0, -1)
    return files


def _list_tar(path: Path) -> dict[str, _HANDLE]:
    """Headers of an uncompressed tar, read once in order (the data is skipped by seeking)."""
    files: dict[str, _HANDLE] = {}
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"cannot read tar archive '{path}': {e}") from None
    with tar:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError) as e:
                raise DataError(f"tar archive '{path}' is damaged: {e}") from None
            if member is None:
                break
            tar.members.clear()  # keep memory flat: offsets are all we need
            if not member.isreg() or member.issparse():
                continue
            rel = posixpath.normpath(member.name.lstrip("/"))
            if rel.startswith("..") or rel == "." or _skip_name(rel):
                continue
            files[rel] = (str(path), member.offset_data, member.size)  # a later duplicate wins
    return files


def _compression(path: Path) -> str | None:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return "gz"
    if magic.startswith(b"BZh"):
        return "bz2"
    if magic.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return None


class _CountingReader(io.RawIOBase):
    """A read-only file that advances a tqdm bar by the (compressed) bytes read through it."""

    def __init__(self, f: BinaryIO, bar: Any):
        self._f, self._bar = f, bar

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._f.readinto(b)  # type: ignore[attr-defined]
        self._bar.update(n)
        return n


def _decompress(src: Path, kind: str, dest: Path, progress: bool) -> None:
    openers = {"gz": lambda f: gzip.GzipFile(fileobj=f), "bz2": bz2.BZ2File, "xz": lzma.LZMAFile}
    with open(src, "rb") as raw, open(dest, "wb") as out, tqdm(
        total=src.stat().st_size, desc=f"unpack {src.name}", unit="B", unit_scale=True,
        disable=not progress, leave=False,
    ) as bar:
        try:
            with openers[kind](_CountingReader(raw, bar)) as stream:
                shutil.copyfileobj(stream, out, 1 << 20)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise DataError(f"cannot decompress '{src}' ({kind}): {e}") from None


def _strip_common_root(files: dict[str, _HANDLE]) -> dict[str, _HANDLE]:
    """Drop one wrapping folder (``root/split/class/img``) when every image sits below it."""
    images = [p for p in files if _image_ext(p)]
    if not images:
        return files
    tops = {p.split("/", 1)[0] for p in images}
    if len(tops) != 1 or any(p.count("/") < 3 for p in images) or next(iter(tops)).lower() in KNOWN_SPLITS:
        return files  # (a lone split folder such as train/ is the split, not a wrapper: train/cat/sub/x.jpg)
    prefix = tops.pop() + "/"
    return {p[len(prefix):]: h for p, h in files.items() if p.startswith(prefix)}


def _image_ext(path: str) -> str | None:
    """The normalised image extension of ``path`` (``jpeg`` -> ``jpg``), or None for other files."""
    ext = posixpath.splitext(path)[1][1:].lower()
    if ext not in IMAGE_EXTS:
        return None
    return _EXT_ALIASES.get(ext, ext)


def _read(handle: _HANDLE, open_files: dict[str, BinaryIO]) -> bytes:
    path, offset, size = handle
    if size < 0:
        with open(path, "rb") as f:
            return f.read()
    f = open_files.get(path)
    if f is None:
        f = open_files[path] = open(path, "rb")
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise OSError(f"archive ended after {len(data)} of {size} bytes")
    return data


# ----------------------------------------------------------------------------- decoding


def _decode_one(data: bytes | None) -> tuple[int, int] | str:
    """(width, height) of a fully decodable image, or the reason it is not one."""
    if data is None:
        return "unreadable"
    if not data:
        return "empty file (0 bytes)"
    try:
        h, w, _ = decode_rgb(data).shape  # every pixel, as the data loader decodes it (orientation applied)
        return (int(w), int(h))
    except UnidentifiedImageError:
        return "UnidentifiedImageError: not an image in a format PIL can read"
    except Image.DecompressionBombError as e:
        return f"DecompressionBombError: {e}"
    except Exception as e:  # noqa: BLE001 -- any failure to decode means a corrupt file
        return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(e).__name__}: {e}")  # no addresses: reproducible


def _decode_batch(blobs: list[bytes | None]) -> list[tuple[int, int] | str]:
    return [_decode_one(b) for b in blobs]


def _init_worker(max_pixels: int | None) -> None:
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False


class _InlineExecutor(Executor):
    """Runs tasks at submit time in this process (``workers=1``), with strict PIL settings."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        future: Future = Future()
        old = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 -- delivered through the future
            future.set_exception(e)
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = old
        return future


def _mp_context() -> multiprocessing.context.BaseContext:
    """``fork`` on Linux: fast, and works from notebooks and unguarded scripts (children only decode
    bytes with PIL). ``spawn`` elsewhere (fork is unsafe on macOS)."""
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def _cpu_count() -> int:
    if hasattr(os, "process_cpu_count"):
        return os.process_cpu_count() or 1  # type: ignore[attr-defined]
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


# ----------------------------------------------------------------------------- packing


@dataclass
class _Item:
    rel: str  # path relative to the split root
    cls: str
    ext: str
    image: _HANDLE
    caption: _HANDLE | None


def _archive_stem(src: Path) -> str:
    name = src.name
    for suffix in _ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)] or name
    return src.stem or name


def _check_out(src: Path, out: Path, overwrite: bool) -> dict[str, Any] | None:
    """Refuse an output that is the input (or inside it, or holding it), a file, or an existing dataset
    without ``overwrite``; returns the existing manifest (None when there is none)."""
    if same_or_nested(src, out):
        raise DataError(f"output '{out}' and input '{src}' are the same folder or one holds the other; "
                        "choose an output folder outside the input")
    if out.exists() and not out.is_dir():
        raise DataError(f"output '{out}' exists and is not a directory")
    manifest = out / MANIFEST
    if manifest.exists():
        if not overwrite:
            raise DataError(f"'{out}' already holds a dataset ({manifest}); pass overwrite=True "
                            "(--overwrite) to replace it, or choose another output folder")
        return read_manifest(out)
    if not overwrite and out.is_dir() and any(out.rglob("shard-*.tar")):
        raise DataError(f"'{out}' holds shards but no {MANIFEST}; pass overwrite=True (--overwrite) to replace "
                        "them")
    return None


def _carry_over(old: dict[str, Any], old_root: Path, manifest: dict[str, Any], build: Path,
                splits: list[str]) -> None:
    """Keep the splits of an existing dataset that this pack does not replace (``--splits`` with
    ``--overwrite``): their shards are linked (or copied) into the new folder, their manifest entries kept."""
    if list(old.get("classes", [])) != list(manifest["classes"]):
        raise DataError(f"the existing dataset in '{old_root}' has classes {old.get('classes')} but the input has "
                        f"{manifest['classes']}; repack every split (no --splits) or choose another output folder")
    for split, info in old["splits"].items():
        if split in splits:
            continue
        for shard in info["shards"]:
            dst = build / shard["name"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(old_root / shard["name"], dst)
            except OSError:
                shutil.copy2(old_root / shard["name"], dst)
        manifest["splits"][split] = info
        manifest["corrupt"].extend(c for c in old.get("corrupt", []) if c.get("split") == split)


def pack_imagefolder(src: str | os.PathLike, out: str | os.PathLike, *, shard_size: int = 1000,
                     seed: int = 0, splits: list[str] | None = None, name: str | None = None,
                     workers: int = 0, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
    """Pack the ImageFolder ``src`` (directory or tar archive) into shards in ``out``; return the manifest.

    Args:
        src: a folder ``split/class/image`` or a ``.tar``/``.tar.gz``/``.tgz``/``.tar.bz2``/``.tar.xz``
            of one (an extra wrapping top folder is fine). Non-image files are ignored, except
            ``<stem>.txt`` beside an image, which becomes its caption.
        out: output folder; gets ``<split>/shard-NNNNNN.tar`` and ``dataset.json`` (written last).
        shard_size: samples per shard (the last shard of a split may hold fewer).
        seed: seed of the per-split shuffle of the sample order.
        splits: the splits to pack (default: every top-level folder). Class indices always come
            from the sorted class folder names over *all* splits, so they agree between runs.
        name: dataset name in the manifest (default: the name of ``src``).
        workers: decode processes; 0 = one per CPU, 1 = decode in this process. The output does
            not depend on it.
        progress: show tqdm bars (images/s per split).
        overwrite: replace an existing dataset in ``out``; without it an existing ``dataset.json`` is a
            :class:`DataError`. With ``splits``, the existing dataset's other splits are kept.

    The dataset is built in a hidden sibling of ``out`` and renamed into place when complete
    (:func:`arlab.utils.atomic_dir`): an interrupted pack leaves the old dataset (or nothing) in ``out``,
    and its leftovers (a half-built folder, an unpacked archive) are removed by the next pack.

    Each sample holds ``__key__`` = its 8-digit position in the split, the original image bytes
    under their extension (``jpeg`` -> ``jpg``, ``tiff`` -> ``tif``), ``cls`` (class index),
    ``json`` (``path`` relative to the split root, ``class``, ``width``, ``height``) and ``txt`` when
    there is a caption. Files that PIL cannot fully decode are skipped and listed in
    ``manifest["corrupt"]`` as ``{"split", "path", "error"}``.
    """
    src_path, out_path = Path(src).expanduser(), Path(out).expanduser()
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DataError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"seed must be an integer >= 0, got {seed!r}")
    if not isinstance(workers, int) or workers < 0:
        raise DataError(f"workers must be an integer >= 0 (0 = one per CPU), got {workers!r}")
    if not src_path.exists():
        raise DataError(f"input '{src}' does not exist")
    old = _check_out(src_path, out_path, overwrite)  # before any slow work

    with ExitStack() as stack:
        build = stack.enter_context(atomic_dir(out_path))  # exits last: the swap after everything else
        # ---- list the input
        if src_path.is_dir():
            listing = _list_directory(src_path)
        elif src_path.is_file():
            kind = _compression(src_path)
            if kind is not None:
                tmp_root = stack.enter_context(tempfile.TemporaryDirectory(prefix=".input-", dir=build))
                tar_path = Path(tmp_root) / "input.tar"
                _decompress(src_path, kind, tar_path, progress)
                if not tarfile.is_tarfile(tar_path):
                    raise DataError(f"'{src}' is {kind}-compressed but does not hold a tar archive")
            elif tarfile.is_tarfile(src_path):
                tar_path = src_path
            else:
                raise DataError(f"input '{src}' is neither a directory nor a tar archive "
                                "(.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz)")
            listing = _list_tar(tar_path)
        else:
            raise DataError(f"input '{src}' is neither a directory nor a tar archive")

        files = _strip_common_root(listing)
        warnings: list[str] = []
        split_items, classes = _collect(files, str(src), warnings)
        available = sorted(split_items)
        chosen = _choose_splits(splits, available, str(src))

        manifest = new_manifest(name or _archive_stem(src_path.resolve()), classes, source=str(src),
                                seed=int(seed), shard_size=shard_size, captions=False)
        if warnings:
            manifest["warnings"] = warnings
        n_workers = workers or _cpu_count()
        open_files: dict[str, BinaryIO] = {}
        stack.callback(lambda: [f.close() for f in open_files.values()])
        executor: Executor
        if n_workers > 1 and sum(len(split_items[s]) for s in chosen) > _BATCH_ITEMS:
            executor = ProcessPoolExecutor(n_workers, mp_context=_mp_context(),
                                           initializer=_init_worker, initargs=(Image.MAX_IMAGE_PIXELS,))
            stack.callback(executor.shutdown, wait=True, cancel_futures=True)
            window = 4 * n_workers
        else:
            executor, window = _InlineExecutor(), 1

        class_index = {c: i for i, c in enumerate(classes)}
        for split in chosen:
            shards, per_class, sizes = _pack_split(
                split, split_items[split], build, manifest, class_index, int(seed), shard_size,
                executor, window, open_files, progress)
            add_split(manifest, split, shards, per_class, sizes)
        if old is not None:
            _carry_over(old, out_path, manifest, build, chosen)
        write_manifest(build, manifest)
    return manifest


def _pack_split(split: str, items: list[_Item], out: Path, manifest: dict[str, Any],
                class_index: dict[str, int], seed: int, shard_size: int, executor: Executor,
                window: int, open_files: dict[str, BinaryIO], progress: bool,
                ) -> tuple[list[dict[str, Any]], Counter[str], Counter[str]]:
    """Shuffle, read, verify and write one split; corrupt files go to ``manifest["corrupt"]``."""
    items = sorted(items, key=lambda it: it.rel)
    rng = np.random.default_rng([seed, zlib.crc32(split.encode("utf-8"))])
    items = [items[i] for i in rng.permutation(len(items))]
    per_class: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    pending: deque[tuple[list[_Item], list[tuple[bytes | None, str | None, str]], Future]] = deque()
    count = 0
    with ShardWriter(out / split, shard_size) as writer, tqdm(
        total=len(items), desc=f"pack {split}", unit="img", disable=not progress, smoothing=0.1,
    ) as bar:

        def drain(limit: int) -> None:
            nonlocal count
            while len(pending) > limit:
                batch, reads, future = pending.popleft()
                for item, (blob, caption, read_error), result in zip(batch, reads, future.result()):
                    if read_error or isinstance(result, str):
                        manifest["corrupt"].append({"split": split, "path": item.rel,
                                                    "error": read_error or result})
                        bar.set_postfix(skipped=len(manifest["corrupt"]), refresh=False)
                        continue
                    w, h = result
                    sample: dict[str, Any] = {
                        "__key__": f"{count:08d}",
                        item.ext: blob,
                        "cls": class_index[item.cls],
                        "json": {"path": item.rel, "class": item.cls, "width": w, "height": h},
                    }
                    if caption is not None:
                        sample["txt"] = caption
                        manifest["captions"] = True
                    writer.write(sample)
                    count += 1
                    per_class[item.cls] += 1
                    sizes[f"{w}x{h}"] += 1
                bar.update(len(batch))

        for batch in _item_batches(items):
            reads = [_read_item(item, open_files) for item in batch]
            pending.append((batch, reads, executor.submit(_decode_batch, [r[0] for r in reads])))
            drain(window)
        drain(0)
    return writer.shards, per_class, sizes


def _read_item(item: _Item, open_files: dict[str, BinaryIO]) -> tuple[bytes | None, str | None, str]:
    """(image bytes, caption, "") or (None, None, why the files could not be read)."""
    try:
        blob = _read(item.image, open_files)
        caption = None
        if item.caption is not None:
            caption = _read(item.caption, open_files).decode("utf-8", "replace").strip()
        return blob, caption, ""
    except OSError as e:
        return None, None, f"cannot read: {e}"


def _item_batches(items: list[_Item]) -> Iterator[list[_Item]]:
    batch: list[_Item] = []
    nbytes = 0
    for item in items:
        batch.append(item)
        nbytes += max(item.image[2], 64 << 10)  # whole files (size -1): assume 64 KiB
        if len(batch) >= _BATCH_ITEMS or nbytes >= _BATCH_BYTES:
            yield batch
            batch, nbytes = [], 0
    if batch:
        yield batch


def _collect(files: dict[str, _HANDLE], src: str, warnings: list[str] | None = None
             ) -> tuple[dict[str, list[_Item]], list[str]]:
    """Group image files into ``{split: [items]}`` and find the classes over all splits; layouts that
    look wrong (images outside split/class folders, top-level folders that look like classes) are
    reported in ``warnings``."""
    splits: dict[str, list[_Item]] = {}
    classes: set[str] = set()
    n_images = 0
    outside: list[str] = []
    for rel, handle in files.items():
        ext = _image_ext(rel)
        if ext is None:
            continue
        n_images += 1
        parts = rel.split("/")
        if len(parts) < 3:  # an image directly in the root or in a split folder: no class
            outside.append(rel)
            continue
        split, cls = parts[0], parts[1]
        stem = posixpath.splitext(rel)[0]
        caption = files.get(stem + ".txt")
        splits.setdefault(split, []).append(_Item("/".join(parts[1:]), cls, ext, handle, caption))
        classes.add(cls)
    if n_images == 0:
        raise DataError(f"no images ({', '.join(IMAGE_EXTS)}) found in '{src}'")
    if not splits:
        raise DataError(f"no split folders in '{src}': expected the layout split/class/image "
                        "(e.g. train/cat/0001.jpg)")
    if warnings is not None:
        if outside:
            warnings.append(f"{len(outside)} image(s) outside the split/class/image layout were skipped "
                            f"(e.g. {', '.join(sorted(outside)[:3])})")
        per_split = {s: {it.cls for it in items} for s, items in splits.items()}
        unknown = [s for s in splits if s.lower() not in KNOWN_SPLITS]
        if len(splits) > 1 and unknown and all(not (per_split[a] & per_split[b]) for a in splits for b in splits
                                               if a < b):
            warnings.append(f"the top-level folders {', '.join(sorted(splits))} share no class: they look like "
                            "classes, not splits (expected split/class/image, e.g. train/cat/0001.jpg)")
        elif unknown:
            warnings.append(f"split folder(s) {', '.join(sorted(unknown))} have unusual names for splits "
                            f"(expected e.g. {', '.join(sorted(KNOWN_SPLITS)[:4])}); check the layout")
    return splits, sorted(classes)


def _choose_splits(requested: list[str] | None, available: list[str], src: str) -> list[str]:
    if not requested:
        return available
    chosen: list[str] = []
    for split in requested:
        if split not in available:
            raise DataError(f"split '{split}' is not in '{src}' (available: {format_choices(available)})."
                            + did_you_mean(split, available))
        if split not in chosen:
            chosen.append(split)
    return chosen
