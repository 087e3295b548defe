"""``arlab eval`` of a tokenizer checkpoint: reconstructions of its data's validation split (or ``--split``).

Per image, on the float reconstruction clamped to [−1, 1] (as the training logs): PSNR (data range 1 after
mapping to [0, 1]) and SSIM (Wang et al. 2004: Gaussian window 11, σ 1.5; :func:`arlab.metrics.ssim`),
averaged; codebook ``usage`` (share of the K codes used at least once over the split) and ``perplexity``
(exp entropy of the index histogram); and **rFID**: the Fréchet distance between the features of the
uint8 reconstructions and of the originals of the same images, on ``--features`` (else the dataset
suite's network), left out with its reason (``"skipped"``) when that network cannot be built here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from arlab.config import build
from arlab.data.datamodule import ShardDataModule
from arlab.errors import ArlabError, ConfigError
from arlab.evaluation.report import log_tensorboard, make_report, write_report
from arlab.evaluation.suites import suite_for
from arlab.metric.fid import frechet_distance, gaussian_stats
from arlab.metric.reference import split_images
from arlab.metrics import CodebookUsage, psnr, ssim
from arlab.tokenizer.load import load_tokenizer
from arlab.utils import to_uint8

log = logging.getLogger("arlab.eval")
DIRECTIONS = {"psnr": "max", "ssim": "max", "usage": "max", "perplexity": "max", "rfid": "min"}


def from_uint8(images_nhwc: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [−1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def reconstruction_scores(x_b3hw: Tensor, rec_b3hw: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image (PSNR, SSIM) of reconstructions against inputs, both (B, 3, H, W) in [−1, 1] (rec clamped)."""
    rec = rec_b3hw.float().clamp(-1, 1)
    return psnr(rec, x_b3hw), ssim(rec, x_b3hw)


def eval_tokenizer(ckpt: Path, run: Path, name: str, *, step: int, n: int = 0, split: str | None = None,
                   features: str | None = None, batch_size: int = 100, device: str = "cpu",
                   tensorboard: bool = True) -> tuple[dict[str, Any], Path]:
    """Reconstruct ``n`` images (0: all) of the split, score them, write ``<run>/eval/<name>.json``."""
    tok = load_tokenizer(ckpt).to(device)
    dm = build("data", tok.source_experiment["data"], seed=0, where=f"the data of {ckpt}")
    if not isinstance(dm, ShardDataModule):
        raise ConfigError(f"the tokenizer's data is {type(dm).__name__}, not an image set; cannot evaluate it")
    dm.setup()
    assert dm.manifest is not None
    split = split or dm.cfg.val_split or "test"
    if split not in dm.manifest["splits"]:
        raise ConfigError(f"--split '{split}' is not a split of {dm.root} (splits: {', '.join(dm.manifest['splits'])})")
    usage = CodebookUsage(tok.codebook_size)
    psnrs, ssims, originals, recs = [], [], [], []
    seconds = 0.0
    for images, _ in split_images(dm, split, tok.cfg.image_size, n if n > 0 else -1):
        for i in range(0, len(images), batch_size):
            batch = images[i: i + batch_size]
            x = from_uint8(batch).to(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                rec, q = tok(x)
            seconds += time.perf_counter() - t0
            p, s = reconstruction_scores(x, rec)
            psnrs.append(p.cpu())
            ssims.append(s.cpu())
            usage.update(q.indices)
            originals.append(batch)
            recs.append(to_uint8(rec))
    total = sum(len(b) for b in originals)
    if total == 0:
        raise ConfigError(f"split '{split}' of {dm.root} has no readable images")
    values = {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean()),
              "usage": usage.usage(), "perplexity": usage.perplexity()}
    dataset = str(dm.manifest.get("name", ""))
    feats, skipped = {}, {}
    net_node = features or (suite_for(dataset) or {}).get("features") or "inception"
    try:
        net = build("features", net_node, where="--features")
        fo = net.features(np.concatenate(originals), batch_size)
        fr = net.features(np.concatenate(recs), batch_size)
        values["rfid"] = frechet_distance(*gaussian_stats(fr), *gaussian_stats(fo))
        feats["rfid"] = net.identity()
    except ArlabError as e:
        if features:  # named explicitly: it must work
            raise
        skipped["rfid"] = str(e)
        log.warning("rFID left out: %s", e)
    result = {"id": "reconstruction", "setting": {"cfg": None, "schedule": None, "temperature": None, "top_k": None,
                                                  "top_p": None},
              "metrics": values, "n": total, "images_per_s": total / max(seconds, 1e-9)}
    report = make_report(name=name, kind="tokenizer", checkpoint=str(ckpt), step=step, run=str(run), n=total,
                         features=feats, reference={"rfid": f"{dataset}:{split}"} if feats else {},
                         results=[result], directions=DIRECTIONS, dataset=dataset, split=split,
                         codebook_size=tok.codebook_size, tokens_per_image=tok.tokens_per_image, skipped=skipped,
                         device=device)
    path = write_report(run / "eval" / f"{name}.json", report)
    if tensorboard:  # originals next to their reconstructions
        pairs = np.stack([originals[0][:32], recs[0][:32]], axis=1).reshape(-1, *originals[0].shape[1:])
        log_tensorboard(run, report, pairs, 8, "reconstruction")
    return report, path
