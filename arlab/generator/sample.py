"""Drawing images from a generator: :func:`generate_images` (model + tokenizer → uint8 images) and
``arlab sample`` (:func:`sample_to_files`: a checkpoint → ``samples.png`` and ``samples.npz``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from arlab.errors import ConfigError
from arlab.generator.build import load_generator
from arlab.generator.evaluate import eval_conditions, labels_of_prompts, score
from arlab.generator.model import Generator
from arlab.generator.sampling import check_schedule
from arlab.tokenizer.vqgan import VQGANTokenizer
from arlab.utils import atomic_write, image_grid, npz_bytes, png_bytes, to_uint8


@torch.no_grad()
def generate_images(model: Generator, tokenizer: VQGANTokenizer, cond: Tensor, seed: int, batch_size: int = 100,
                    **opts: Any) -> tuple[np.ndarray, float]:
    """Sample images (N, H, W, 3) uint8 for conditions ``cond`` (labels or caption ids) with sampling options
    ``opts`` (:meth:`Generator.sample`); returns them and the images/s. The model is put in eval mode for
    the call and restored after."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    out, t0 = [], time.perf_counter()
    for i in range(0, len(cond), batch_size):
        codes = model.sample(cond[i:i + batch_size].to(device), generator=g, **opts)
        if model.layout.multiscale:
            codes = tokenizer.unflatten_indices(codes)
        out.append(to_uint8(tokenizer.detokenize(codes)))
    dt = time.perf_counter() - t0
    model.train(was_training)
    return np.concatenate(out), len(cond) / max(dt, 1e-9)


def sampling_options(cfg: Any, cfg_scale: float | None = None, cfg_schedule: str | None = None,
                     temperature: float | None = None, top_k: int | None = None, top_p: float = 1.0) -> dict[str, Any]:
    """Sampling options: the given ones, else the run's task defaults (``sample_cfg`` ...)."""
    schedule = cfg_schedule or cfg.sample_schedule
    check_schedule(schedule)
    return {"cfg_scale": cfg.sample_cfg if cfg_scale is None else cfg_scale, "cfg_schedule": schedule,
            "temperature": cfg.sample_temperature if temperature is None else temperature,
            "top_k": cfg.sample_top_k if top_k is None else top_k, "top_p": top_p}


def sample_to_files(ckpt: str | os.PathLike, out: str | os.PathLike, n: int = 100, batch_size: int = 100,
                    classes: list[int] | None = None, cfg: float | None = None, cfg_schedule: str | None = None,
                    top_k: int | None = None, top_p: float = 1.0, temperature: float | None = None, seed: int = 0,
                    device: str = "cpu", use_cache: bool = True, prompts: list[str] | None = None) -> dict[str, Any]:
    """``arlab sample``: draw ``n`` images (balanced over ``classes``; a text model: ``prompts`` cycled, or
    captions for the classes), write ``samples.png`` and ``samples.npz`` (``images`` N×H×W×3 uint8,
    ``labels`` N (-1 = unknown), ``prompts``) under ``out``; returns a summary."""
    run = load_generator(ckpt).to(device)
    meta, cmod = run.meta, run.model.conditioner
    k = meta["num_classes"]
    explicit = bool(classes)
    classes = list(range(k)) if not classes else classes
    bad = [i for i in classes if not 0 <= i < k]
    if bad:
        raise ConfigError(f"class index {bad[0]} is outside the dataset's classes 0..{k - 1} "
                          f"({', '.join(meta['classes'])})")
    labels = torch.tensor([classes[i % len(classes)] for i in range(n)])
    cond, prompt_list = labels, None
    if prompts:
        if not cmod.accepts_text:
            raise ConfigError(f"--prompt needs a text-conditioned generator; '{ckpt}' is conditioned on class labels "
                              "(use --classes)")
        prompt_list = [prompts[i % len(prompts)] for i in range(n)]
        labels, cond = labels_of_prompts(prompt_list, meta), cmod.encode(prompt_list)
    elif cmod.accepts_text and explicit:  # the classes through the conditioner's caption template
        if not cmod.cfg.template:
            raise ConfigError(f"'{ckpt}' is conditioned on captions and its conditioner has no class template; "
                              "give --prompt instead of --classes")
        cond, prompt_list = cmod.prompts_for_labels(labels, meta["classes"])
    elif cmod.accepts_text:
        cond, labels, prompt_list = eval_conditions(cmod, meta, n)
    opts = sampling_options(run.cfg, cfg, cfg_schedule, temperature, top_k, top_p)
    images, rate = generate_images(run.model, run.tokenizer, cond, seed=seed, batch_size=batch_size,
                                   use_cache=use_cache, **opts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "samples.npz", npz_bytes(images=images, labels=labels.numpy(),
                                                prompts=np.array(prompt_list or [], dtype=str)))
    atomic_write(out / "samples.png", png_bytes(image_grid(images, nrow=min(len(classes), 20))))
    summary: dict[str, Any] = {"n": n, "images_per_s": rate, "steps_per_image": run.model.steps_per_image,
                               **opts, "use_cache": use_cache}
    acc = score(list(run.cfg.eval_metrics), images, labels.numpy(), meta, prefix="")
    summary.update({k: v for k, v in acc.items() if k != "n"})
    return summary
