"""Loading a trained tokenizer from a ``task/tokenizer`` checkpoint (frozen, eval mode)."""

from __future__ import annotations

import os

from arlab.config import build
from arlab.rundir import read_task_checkpoint
from arlab.tokenizer.vqgan import VQGANTokenizer


def load_tokenizer(path: str | os.PathLike, map_location: str = "cpu") -> VQGANTokenizer:
    """The frozen tokenizer of a ``task/tokenizer`` checkpoint (eval mode, no gradients); its experiment is
    kept as ``tokenizer.source_experiment``."""
    ckpt, hp = read_task_checkpoint(path, "tokenizer", map_location)
    exp = hp["experiment"]
    tok: VQGANTokenizer = build("tokenizer", exp["tokenizer"])
    state = {k.removeprefix("tokenizer."): v for k, v in ckpt["state_dict"].items() if k.startswith("tokenizer.")}
    tok.load_state_dict(state)
    tok.eval().requires_grad_(False)
    tok.source_experiment = exp
    return tok
