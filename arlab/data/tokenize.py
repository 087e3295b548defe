"""``arlab tokenize``: encode image shards into token shards with a frozen tokenizer.

Per sample the token shard holds ``tokens.npy`` (int16/int32, shape (L,): the index map
flattened row-major, or every scale of a multi-scale tokenizer concatenated, coarsest first),
``cls``, ``txt`` (when the source has captions) and ``json`` (source key, flipped). The manifest
(``kind: tokens``) records the tokenizer checkpoint, its sha256, vocabulary size, scales and the
tokenizer config, so generators can check they match before training. With ``flip`` each image is
also encoded mirrored (key suffix ``_f``), LlamaGen's ten-crop-free augmentation.

Corrupt source images are counted, listed in the manifest and skipped. The whole token folder is
built in a hidden sibling and renamed into place when complete (:func:`arlab.utils.atomic_dir`), so an
interrupted run never leaves a folder that looks complete, nor mixes the shards of two tokenizers.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from arlab.data.datamodule import ImageDecoder, collate_images
from arlab.data.shards import (
    MANIFEST,
    ShardWriter,
    add_split,
    iter_shard,
    new_manifest,
    read_manifest,
    write_manifest,
)
from arlab.errors import DataError
from arlab.tokenizer.load import load_tokenizer
from arlab.utils import atomic_dir, prefetched, same_or_nested


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tokenize_shards(ckpt: str | Path, src: str | Path, out: str | Path, *, splits: list[str] | None = None,
                    flip: bool = False, batch_size: int = 256, device: str = "cpu",
                    shard_size: int | None = None, overwrite: bool = False, progress: bool = True) -> dict:
    """Encode the image shards of ``src`` into token shards under ``out``; returns the manifest.

    The token folder is built beside ``out`` and renamed into place when complete: an interrupted run
    (``--overwrite`` included) leaves ``out`` as it was, never shards of two tokenizers under one
    manifest."""
    out = Path(out)
    if same_or_nested(src, out):
        raise DataError(f"output '{out}' and input '{src}' are the same folder or one holds the other; "
                        "choose an output folder outside the image shards")
    if out.exists() and not out.is_dir():
        raise DataError(f"output '{out}' exists and is not a directory")
    if (out / MANIFEST).exists() and not overwrite:
        raise DataError(f"'{out}' already holds a {MANIFEST}; pass overwrite=True (--overwrite) to replace it")
    with atomic_dir(out) as build:
        return _tokenize(ckpt, src, out, build, splits, flip, batch_size, device, shard_size, progress)


def _tokenize(ckpt: str | Path, src: str | Path, out: Path, build: Path, splits: list[str] | None, flip: bool,
              batch_size: int, device: str, shard_size: int | None, progress: bool) -> dict:
    tok = load_tokenizer(ckpt, map_location=device).to(device)
    src_m = read_manifest(src)
    if src_m.get("kind", "images") != "images":
        raise DataError(f"'{src}' holds {src_m.get('kind')} shards; tokenize needs image shards")
    splits = splits or list(src_m["splits"])
    for s in splits:
        if s not in src_m["splits"]:
            raise DataError(f"split '{s}' is not in '{src}' (splits: {', '.join(src_m['splits'])})")
    size = tok.cfg.image_size
    decode = ImageDecoder(size, 0.0, 0)
    dtype = np.int16 if tok.codebook_size <= np.iinfo(np.int16).max + 1 else np.int32
    shard_size = shard_size or int(src_m.get("shard_size", 1000)) * (2 if flip else 1)
    meta = {
        "checkpoint": str(Path(ckpt).resolve()), "sha256": sha256_file(ckpt),
        "vocab_size": tok.codebook_size, "scales": tok.scales, "tokens_per_image": tok.tokens_per_image,
        "image_size": size, "multiscale": tok.multiscale, "config": tok.source_experiment["tokenizer"],
    }
    manifest = new_manifest(src_m["name"], src_m["classes"], source=str(src), seed=src_m.get("seed", 0),
                            shard_size=shard_size, kind="tokens", tokenizer=meta, flip=flip,
                            captions=bool(src_m.get("captions")), token_dtype=np.dtype(dtype).name)
    root = Path(src)
    rates: dict[str, float] = {}
    for split in splits:
        info = src_m["splits"][split]
        per_class = dict.fromkeys(src_m["classes"], 0)
        total = info["count"] * (2 if flip else 1)
        bar = tqdm(total=total, desc=f"tokenize {split}", unit="tok-img", disable=not progress, smoothing=0.1)
        t0 = time.perf_counter()
        with ShardWriter(build / split, shard_size=shard_size) as writer:
            # decoding (tar parsing, PNG) in a background thread, one batch ahead of the encoder
            for samples in prefetched(_decoded_batches(root, split, info, decode, batch_size, manifest["corrupt"])):
                x = collate_images(samples)["image"].to(device)
                for view, suffix in [(x, "")] + ([(x.flip(-1), "_f")] if flip else []):
                    tokens = tok.flatten_indices(tok.tokenize(view)).cpu().numpy().astype(dtype)
                    for s, t in zip(samples, tokens):
                        sample = {"__key__": s["key"] + suffix, "tokens.npy": t, "cls": s["label"],
                                  "json": {"source_key": s["key"], "flipped": bool(suffix)}}
                        if s["caption"]:
                            sample["txt"] = s["caption"]
                        writer.write(sample)
                        if 0 <= s["label"] < len(src_m["classes"]):
                            per_class[src_m["classes"][s["label"]]] += 1
                    bar.update(len(samples))
        bar.close()
        dt = time.perf_counter() - t0
        add_split(manifest, split, writer.shards, per_class)
        rates[split] = round(manifest["splits"][split]["count"] / max(dt, 1e-9), 1)
    write_manifest(build, manifest)  # no timings in it: the same inputs give the same bytes
    return {**manifest, "samples_per_s": rates}


def _decoded_batches(root: Path, split: str, info: dict, decode: ImageDecoder, batch_size: int,
                     corrupt: list[dict]) -> Iterator[list[dict[str, Any]]]:
    """Decoded samples of one split in manifest order, in lists of ``batch_size``; corrupt ones recorded."""
    pending: list[dict[str, Any]] = []
    for shard in info["shards"]:
        for raw in iter_shard(root / shard["name"]):
            decoded = decode(raw, 0)
            if decoded is None:
                corrupt.append({"split": split, "path": f"{shard['name']}:{raw['__key__']}",
                                "error": "image could not be decoded"})
                continue
            pending.append(decoded)
            if len(pending) == batch_size:
                yield pending
                pending = []
    if pending:
        yield pending


def read_tokens(sample: dict[str, bytes]) -> np.ndarray:
    """The (L,) token array of a raw token-shard sample."""

    return np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
