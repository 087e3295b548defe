"""Combinations that can only fail are refused when the config is loaded, before a tokenizer is trained or
data tokenized: the tokenizer's token maps (from its checkpoint, else from the experiment that would train
it) are checked against the Token-Shuffle window and the order."""

from __future__ import annotations

import pytest

from arlab.config import load_experiment
from arlab.errors import ConfigError

MISSING = "task.tokenizer_ckpt=/nonexistent/tokenizer/last.ckpt"


@pytest.mark.parametrize("experiment,overrides,pattern", [
    ("shapes/tokenshuffle-s4", ["task.tokenizer_experiment=shapes/tokenizer-msvq"],
     r"Token-Shuffle s=4 needs every scale divisible by 4.*of the tokenizer experiment shapes/tokenizer-msvq"),
    ("shapes/var", ["task.tokenizer_experiment=shapes/tokenizer-fsq"],
     r"order 'next_scale' predicts scale by scale and needs a multi-scale tokenizer.*single 8x8 grid"),
    ("shapes/raster", ["shuffle.s=4", "task.tokenizer_overrides=[tokenizer.image_size=24,data.image_size=24]"],
     r"Token-Shuffle s=4 needs every token grid divisible by 4; 6x6 is not"),
    ("shapes/nar", ["task.tokenizer_experiment=shapes/tokenizer-msvq"],
     r"order 'neighbor' walks one token grid, but the tokenizer is multi-scale"),
])
def test_impossible_layouts_are_refused_at_config_time(experiment, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_experiment(experiment, [MISSING, *overrides])


def test_possible_layouts_load():
    load_experiment("shapes/tokenshuffle-s4", [MISSING])  # FSQ 8x8 with s=4: fine
    load_experiment("shapes/var", [MISSING])
