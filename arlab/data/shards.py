"""WebDataset shard writing and the ``dataset.json`` manifest.

A shard is a POSIX tar file in WebDataset layout: the members of one sample share a key and
differ by extension (``000042.png``, ``000042.cls``, ``000042.txt``, ``000042.json``). Every
writer in arlab (``arlab data pack``, the embedded ``shapes`` set, ``arlab tokenize``) goes
through :class:`ShardWriter`, so all shard folders share one manifest format:

.. code-block:: text

    OUT/dataset.json               manifest (see :func:`new_manifest`)
    OUT/<split>/shard-000000.tar   ``shard_size`` samples each (the last one may hold fewer)

Shards are written to ``*.tar.tmp`` and renamed when complete, so a crash never leaves a
half-written shard that looks finished. Tar headers carry no timestamps or owners: the same
samples always give byte-identical shards.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from arlab.errors import DataError

MANIFEST = "dataset.json"
FORMAT = "arlab-shards/1"
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp", "ppm", "tif", "tiff", "gif")


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (int, float)):
        return str(value).encode("utf-8")
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True).encode("utf-8")
    if hasattr(value, "tobytes") and hasattr(value, "dtype"):  # numpy array -> .npy bytes

        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        return buf.getvalue()
    raise TypeError(f"cannot write a {type(value).__name__} into a shard")


class ShardWriter:
    """Writes samples into ``out_dir/prefix-NNNNNN.tar`` shards of ``shard_size`` samples.

    A sample is a dict with ``"__key__"`` (no dots, unique within the split) and one entry per
    extension: ``bytes`` are written as they are, ``str`` as UTF-8, ``int`` as its decimal text,
    ``dict``/``list`` as JSON and numpy arrays as ``.npy``. Use as a context manager; ``shards``
    lists ``{"name", "count"}`` for every finished shard, names relative to ``out_dir``.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_size: int = 1000, prefix: str = "shard"):
        if shard_size < 1:
            raise DataError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.prefix = prefix
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self._tmp = self.out_dir / (name + ".tmp")
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _finish(self) -> None:
        assert self._tar is not None and self._tmp is not None
        self._tar.close()
        final = self._tmp.with_suffix("")  # drop ".tmp"
        os.replace(self._tmp, final)
        self.shards.append({"name": final.name, "count": self._count})
        self._tar, self._tmp = None, None

    def write(self, sample: Mapping[str, Any]) -> None:
        key = sample.get("__key__")
        if not key or "." in str(key) or "/" in str(key):
            raise ValueError(f"sample key must be non-empty without '.' or '/', got {key!r}")
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext, value in sample.items():
            if ext.startswith("__"):
                continue
            data = _as_bytes(value)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count >= self.shard_size:
            self._finish()

    def close(self) -> list[dict[str, Any]]:
        if self._tar is not None and self._count > 0:
            self._finish()
        elif self._tar is not None:  # opened but empty: never publish it
            self._tar.close()
            assert self._tmp is not None
            self._tmp.unlink(missing_ok=True)
            self._tar = None
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (its ``.tmp`` file); finished shards stay."""
        if self._tar is not None:
            self._tar.close()
            assert self._tmp is not None
            self._tmp.unlink(missing_ok=True)
            self._tar = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def iter_shard(path: str | os.PathLike) -> Iterator[dict[str, bytes]]:
    """Yield the raw samples of one shard as ``{"__key__": key, ext: bytes, ...}`` dicts."""
    current: dict[str, Any] | None = None
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            key, _, ext = base.partition(".")
            if current is not None and current["__key__"] != key:
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            f = tar.extractfile(member)
            assert f is not None
            current[ext] = f.read()
    if current is not None:
        yield current


# ----------------------------------------------------------------------------- manifest


def new_manifest(name: str, classes: list[str], *, source: str = "", seed: int = 0,
                 shard_size: int = 1000, kind: str = "images", **extra: Any) -> dict[str, Any]:
    """A fresh manifest; ``add_split`` fills in ``splits``.

    Keys: ``format``, ``name``, ``kind`` (``images`` or ``tokens``), ``source``, ``classes``,
    ``seed``, ``shard_size``, ``splits`` (per split: ``count``, ``per_class`` by class name,
    ``shards`` as ``{"name": "<split>/shard-000000.tar", "count"}``, ``image_sizes`` as
    ``{"WxH": n}``), ``corrupt`` (``{"split", "path", "error"}`` per skipped input file), plus
    any ``extra`` keys (e.g. captions: true, tokenizer metadata).
    """
    return {
        "format": FORMAT,
        "name": name,
        "kind": kind,
        "source": source,
        "classes": list(classes),
        "seed": seed,
        "shard_size": shard_size,
        "splits": {},
        "corrupt": [],
        **extra,
    }


def add_split(manifest: dict[str, Any], split: str, shards: list[dict[str, Any]],
              per_class: Mapping[str, int], image_sizes: Mapping[str, int] | None = None) -> None:
    manifest["splits"][split] = {
        "count": int(sum(s["count"] for s in shards)),
        "per_class": {c: int(per_class.get(c, 0)) for c in manifest["classes"]},
        "shards": [{"name": f"{split}/{s['name']}", "count": int(s["count"])} for s in shards],
        "image_sizes": dict(sorted((image_sizes or {}).items())),
    }


def write_manifest(out_dir: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write ``dataset.json`` atomically (it is the last file a writer produces)."""
    path = Path(out_dir) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``root/dataset.json``: an arlab manifest (format, name, classes, splits with their
    shards; token shards also their tokenizer) whose listed shards all exist; a one-line DataError naming
    the file and what is missing otherwise."""
    root = Path(root)
    path = root / MANIFEST if root.is_dir() or not root.suffix else root
    if not path.exists():
        raise DataError(
            f"no {MANIFEST} in '{root}': not an arlab shard folder "
            "(make one with 'arlab data pack SRC OUT')"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): not an "
                        "arlab manifest") from None
    except OSError as e:
        raise DataError(f"{path} cannot be read: {e.strerror or e}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path} is not an arlab manifest: {problem} (arlab writes it with 'arlab data pack', "
                        "'arlab data shapes' or 'arlab tokenize')")
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            if not (path.parent / shard["name"]).exists():
                raise DataError(f"{path}: shard '{shard['name']}' of split '{split}' is missing")
    return manifest


def _manifest_problem(m: Any) -> str:
    """What keeps ``m`` from being a usable manifest ("" when nothing)."""
    if not isinstance(m, dict):
        return f"it holds a JSON {type(m).__name__}, not an object"
    missing = [k for k in ("format", "name", "classes", "splits") if k not in m]
    if missing:
        return f"missing {', '.join(repr(k) for k in missing)}"
    if m["format"] != FORMAT:
        return f"format {m['format']!r} is not {FORMAT!r}"
    if not isinstance(m["classes"], list) or not all(isinstance(c, str) for c in m["classes"]):
        return "'classes' must be a list of class names"
    if not isinstance(m["splits"], dict):
        return "'splits' must be an object of split name -> {count, shards}"
    for split, info in m["splits"].items():
        if not isinstance(info, dict) or not isinstance(info.get("count"), int):
            return f"split '{split}' has no 'count'"
        shards = info.get("shards")
        if not isinstance(shards, list) or not all(isinstance(s, dict) and isinstance(s.get("name"), str)
                                                   and isinstance(s.get("count"), int) for s in shards):
            return f"split '{split}' has no 'shards' list of {{name, count}}"
    kind = m.get("kind", "images")
    if kind not in ("images", "tokens"):
        return f"kind {kind!r} is not images or tokens"
    if kind == "tokens":
        tok = m.get("tokenizer")
        need = ("checkpoint", "vocab_size", "scales", "tokens_per_image", "image_size")
        lacking = [k for k in need if not isinstance(tok, dict) or k not in tok]
        if lacking:
            return f"token shards without 'tokenizer' {', '.join(lacking)}"
    return ""
