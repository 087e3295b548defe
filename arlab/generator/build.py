"""Assembling a :class:`Generator` from an experiment, and loading a trained one without Lightning.

``meta`` is the plain dict the generator task stores in its checkpoint (``vocab_size``, ``grid``,
``scales``, ``num_classes``, ``classes``, ``dataset``, ``tokenizer_ckpt``, ``image_size``): with the
experiment tree it rebuilds the model exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from arlab.config import build, validate_component
from arlab.errors import ConfigError
from arlab.generator.model import Generator
from arlab.rundir import read_task_checkpoint
from arlab.tokenizer.load import load_tokenizer
from arlab.tokenizer.vqgan import VQGANTokenizer


def build_generator(experiment: dict[str, Any], vocab_size: int, scales: list | tuple[int, int], num_classes: int,
                    z_loss: float = 0.0, token_dropout: float = 0.0, quantizer: nn.Module | None = None,
                    loss_chunk: int = 4096) -> Generator:
    """Assemble the generator from an experiment's backbone / order / shuffle / conditioner slots.

    ``scales``: the tokenizer's (h, w) grid or its list of scales; ``quantizer``: the tokenizer's msvq
    (the next-scale order builds its inputs with it); ``loss_chunk``: rows per chunk of the chunked head + CE
    used when the generator is called with ``return_logits=False`` (0: full logits)."""
    backbone = build("backbone", experiment["backbone"])
    order = build("order", experiment.get("order", "raster"))
    shuffle = build("shuffle", experiment.get("shuffle", {"type": "window", "s": 1}), dim=backbone.dim)
    cond = build("conditioner", experiment.get("conditioner", "class"), dim=backbone.dim, num_classes=num_classes)
    return Generator(backbone, order, shuffle, cond, vocab_size, scales, z_loss=z_loss, token_dropout=token_dropout,
                     quantizer=quantizer, loss_chunk=loss_chunk)


def scales_of(meta: dict[str, Any]) -> list[tuple[int, int]]:
    """The token layout's scales from a generator's ``meta`` (one grid, or the msvq scales)."""
    return [(int(p), int(p)) for p in meta.get("scales", [meta["grid"][0]])]


def generator_from_meta(experiment: dict[str, Any], meta: dict[str, Any], task_cfg: Any,
                        tokenizer: VQGANTokenizer | None) -> Generator:
    """The generator a ``task/generator`` run trains: sized by ``meta``; a multi-scale layout binds the
    tokenizer's msvq (frozen) to the next-scale order."""
    scales = scales_of(meta)
    quantizer = None
    if len(scales) > 1:
        if tokenizer is None:
            raise ConfigError("a multi-scale generator needs its tokenizer's quantizer")
        quantizer = tokenizer.quantizer
    return build_generator(experiment, meta["vocab_size"], scales, meta["num_classes"], z_loss=task_cfg.z_loss,
                           token_dropout=task_cfg.token_dropout, quantizer=quantizer, loss_chunk=task_cfg.loss_chunk)


@dataclass
class TrainedGenerator:
    """A trained generator with what sampling needs: its frozen tokenizer, the data ``meta`` and the task
    config (sampling defaults); plain modules, no Lightning."""

    model: Generator
    tokenizer: VQGANTokenizer
    meta: dict[str, Any]
    cfg: Any  # the run's task/generator Config
    experiment: dict[str, Any] = field(default_factory=dict)
    step: int = 0

    def to(self, device: str | torch.device) -> TrainedGenerator:
        self.model.to(device)
        self.tokenizer.to(device)
        return self


def load_generator(path: str | os.PathLike, map_location: str = "cpu") -> TrainedGenerator:
    """A trained ``task/generator`` run from its checkpoint (eval mode); refuses a tokenizer checkpoint whose
    quantizer is not the one the generator was trained with (next-scale binds it)."""
    ckpt, hp = read_task_checkpoint(path, "generator", map_location)
    experiment, meta = hp["experiment"], hp.get("meta")
    if not isinstance(meta, dict) or not isinstance(experiment.get("backbone"), dict):
        raise ConfigError(f"'{path}' is not a readable generator checkpoint (its hyper-parameters lack "
                          f"{'meta' if not isinstance(meta, dict) else 'experiment.backbone'}: not written by "
                          "'arlab train')")
    task = dict(experiment["task"])
    if "eval_metrics" not in task and str(meta.get("dataset", "")).startswith("shapes"):
        task["eval_metrics"] = ["shapes_checker"]  # runs from before metrics were components: scored by the checker
    cfg = validate_component("task", task)[1]
    tokenizer = load_tokenizer(meta["tokenizer_ckpt"], map_location=map_location)
    model = generator_from_meta(experiment, meta, cfg, tokenizer)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    own = model.state_dict()
    changed = [k for k in state if k.startswith("order.quant.") and k in own
               and not torch.equal(own[k], state[k].to(own[k].dtype))]
    if changed:
        raise ConfigError(f"the tokenizer '{meta['tokenizer_ckpt']}' is not the one '{path}' was trained with: "
                          f"its quantizer differs ({changed[0]}, ...); restore that tokenizer checkpoint")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # weights that do not fit the model its own config describes: a damaged file
        raise ConfigError(f"'{path}': its weights do not fit the generator its config describes "
                          f"({str(e).strip().splitlines()[-1].strip()[:200]})") from None
    return TrainedGenerator(model.eval(), tokenizer, meta, cfg, experiment, int(ckpt.get("global_step", 0)))
