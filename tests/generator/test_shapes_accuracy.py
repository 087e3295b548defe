"""The end-to-end claim: minutes of CPU training on shapes give samples of the requested class, for
Token-Shuffle and for the VAR, NAR and caption-conditioned experiments (slow: 8-15 min each)."""

from __future__ import annotations

import pytest

from arlab.config import load_experiment
from arlab.train import fit

# experiment, its tokenizer, generator steps, class accuracy required (chance 10%); the full
# 1500-step experiments' numbers are in docs/generator.md
CASES = [
    ("tokenshuffle-s2", "tokenizer-fsq", 800, 0.3),
    ("nar", "tokenizer-fsq", 800, 0.2),
    ("text-tokenshuffle-s2", "tokenizer-fsq", 800, 0.2),
    ("var", "tokenizer-msvq", 800, 0.2),
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    return tmp_path_factory.mktemp("tokenizers")  # one tokenizer per kind, trained by the first chain


@pytest.mark.slow
@pytest.mark.parametrize("experiment,tokenizer,steps,required", CASES, ids=[c[0] for c in CASES])
def test_samples_show_the_requested_class(tmp_path, arlab_cache, tokenizers, experiment, tokenizer, steps, required):
    exp = load_experiment(f"shapes/{experiment}", [
        f"run.dir={tmp_path / 'gen'}", f"task.tokenizer_ckpt={tokenizers / tokenizer / 'checkpoints' / 'last.ckpt'}",
        f"task.tokenizer_experiment=shapes/{tokenizer}",
        "task.tokenizer_overrides=[trainer.max_steps=600,trainer.val_check_interval=600]",
        f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false", "task.sample_every_n_steps=0",
        "task.eval_samples=200"])
    metrics = fit(exp)
    assert metrics["sample/class_acc"] > required, metrics  # text: the class named in each prompt
