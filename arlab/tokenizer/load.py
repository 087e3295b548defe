"""Loading a trained tokenizer from a ``task/tokenizer`` checkpoint (frozen, eval mode)."""

from __future__ import annotations

import os

from arlab.config import build
from arlab.errors import ConfigError
from arlab.rundir import read_task_checkpoint
from arlab.tokenizer.vqgan import VQGANTokenizer


def load_tokenizer(path: str | os.PathLike, map_location: str = "cpu") -> VQGANTokenizer:
    """The frozen tokenizer of a ``task/tokenizer`` checkpoint (eval mode, no gradients); its experiment is
    kept as ``tokenizer.source_experiment``."""
    ckpt, hp = read_task_checkpoint(path, "tokenizer", map_location)
    exp = hp["experiment"]
    if "tokenizer" not in exp:
        raise ConfigError(f"'{path}' is not a readable tokenizer checkpoint (its experiment has no 'tokenizer': not "
                          "written by 'arlab train')")
    tok: VQGANTokenizer = build("tokenizer", exp["tokenizer"])
    state = {k.removeprefix("tokenizer."): v for k, v in ckpt["state_dict"].items() if k.startswith("tokenizer.")}
    try:
        tok.load_state_dict(state)
    except RuntimeError as e:  # weights that do not fit the model its own config describes: a damaged file
        raise ConfigError(f"'{path}': its weights do not fit the tokenizer its config describes "
                          f"({str(e).strip().splitlines()[-1].strip()[:200]})") from None
    tok.eval().requires_grad_(False)
    tok.source_experiment = exp
    return tok
