"""``arlab eval`` of a generator checkpoint: N images per sampling setting with balanced conditions
(:func:`arlab.generator.evaluate.eval_conditions`), drawn in resumable chunks
(``<run>/eval/<name>/samples/<setting>/chunk-NNNNN.npz``, :mod:`arlab.evaluation.chunks`), scored by the
chosen metrics, reported in ``<run>/eval/<name>.json`` and TensorBoard."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from arlab.evaluation.chunks import draw_chunks
from arlab.evaluation.report import log_tensorboard, make_report, primary_setting, write_report
from arlab.evaluation.settings import Setting, sweep
from arlab.evaluation.suites import choose_metrics, directions, provenance
from arlab.generator.build import load_generator
from arlab.generator.evaluate import eval_conditions, score
from arlab.generator.sample import generate_images
from arlab.utils import FileLock

log = logging.getLogger("arlab.eval")
GRID_MAX = 100  # images of the best setting in the TensorBoard grid


def checkpoint_identity(ckpt: Path, step: int) -> dict[str, Any]:
    """What identifies the weights cheaply: resolved path, size, modification time, global step."""
    st = ckpt.stat()
    return {"checkpoint": str(ckpt.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "step": step}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def eval_generator(ckpt: Path, run: Path, name: str | None, *, n: int | None = None, metrics: list[str] | None = None,
                   sweep_opts: dict[str, Any] | None = None, seed: int = 0, batch_size: int = 100, chunk: int = 250,
                   device: str = "cpu", use_cache: bool = True, progress: bool = True,
                   tensorboard: bool = True) -> tuple[dict[str, Any], Path]:
    """Draw, score and report every setting of the sweep; returns (report, path of the JSON). ``n`` None: the
    run's ``task.eval_samples`` (else 1000); ``name`` None: ``n<N>``."""
    trained = load_generator(ckpt).to(device)
    n = n or trained.cfg.eval_samples or 1000
    name = name or f"n{n}"
    meta, model = trained.meta, trained.model
    settings: list[Setting] = sweep(trained.cfg, **(sweep_opts or {}))
    names, skipped = choose_metrics(metrics, list(trained.cfg.eval_metrics), str(meta.get("dataset", "")))
    dirs = directions(names)
    cond, labels, prompts = eval_conditions(model.conditioner, meta, n)
    digests = [_digest(cond[i: i + chunk]) for i in range(0, n, chunk)]
    ident = checkpoint_identity(ckpt, trained.step)
    folder = run / "eval" / name
    results, grids = [], {}
    from tqdm.auto import tqdm

    with FileLock(run / "eval" / f".{name}.lock"), tqdm(total=n * len(settings), unit="img", disable=not progress,
                                                        desc=f"eval {name}") as bar:
        for setting in settings:
            bar.set_postfix_str(setting.id)
            opts = setting.options()

            def draw(start: int, end: int, s: int, opts: dict[str, Any] = opts) -> np.ndarray:
                return generate_images(model, trained.tokenizer, cond[start:end], seed=s, batch_size=batch_size,
                                       use_cache=use_cache, **opts)[0]

            base = {**ident, "setting": setting.as_dict(), "batch_size": batch_size, "device": device,
                    "use_cache": use_cache}
            got = draw_chunks(folder / "samples" / setting.id, digests, labels.numpy(), chunk, seed, base, draw,
                              bar.update)
            values = score(names, got.images, got.labels, meta, prefix="")
            values.pop("n", None)
            results.append({"id": setting.id, "setting": setting.as_dict(), "metrics": values, "n": len(got.images),
                            "images_per_s": len(got.images) / max(got.seconds, 1e-9), "chunks_drawn": got.drawn,
                            "chunks_reused": got.reused})
            grids[setting.id] = got.images[:GRID_MAX]
            log.info("%s: %s", setting.id, ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        feats, refs = provenance(names, meta.get("images"))
        report = make_report(name=name, kind="generator", checkpoint=str(ckpt), step=trained.step, run=str(run), n=n,
                             features=feats, reference=refs, results=results, directions=dirs, seed=seed,
                             chunk=chunk, batch_size=batch_size, device=device, metrics_used=names, skipped=skipped,
                             dataset=meta.get("dataset"), steps_per_image=model.steps_per_image,
                             prompts=prompts[:10] if prompts else None)
        path = write_report(run / "eval" / f"{name}.json", report)
    if tensorboard:
        best = primary_setting(report, list(dirs))  # by the first ranked output of the first metric
        log_tensorboard(run, report, grids.get(best) if best else None, min(int(meta["num_classes"]), 20), best)
    return report, path
