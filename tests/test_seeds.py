"""``arlab train EXP --seeds``: sibling runs per seed sharing one upstream tokenizer, finished seeds skipped on
a re-run, an interrupted one resumed, another config refused; and the FLOP counts ``arlab train`` records."""

from __future__ import annotations

import json

import pytest
import yaml

from arlab.cli import main
from tests.conftest import pinned_threads
from tests.generator.test_module import generator_body, tokenizer_body, write


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, arlab_cache):
    """A tiny generator (2 steps) whose tokenizer (4 steps) is missing, trained for seeds 0 and 1."""
    tmp = tmp_path_factory.mktemp("seeds")
    tok = tokenizer_body(tmp / "unused")
    tok["trainer"].update(max_steps=4, val_check_interval=4, checkpoint_every_n_steps=4)
    tok_exp = write(tmp / "tok.yaml", tok)
    ckpt = tmp / "tok" / "checkpoints" / "last.ckpt"
    gen = generator_body(tmp, ckpt, tok_exp, "unused", steps=2)
    gen["task"]["eval_samples"] = 2
    gen["trainer"]["checkpoint_every_n_steps"] = 1
    gen_exp = write(tmp / "gen.yaml", gen)
    argv = ["train", str(gen_exp), "--seeds", "0,1", f"run.dir={tmp / 'gen'}"]
    with pinned_threads():
        assert main(argv) == 0
    return tmp, argv


def test_each_seed_trains_into_its_sibling_run_and_the_tokenizer_is_shared(seeded):
    tmp, _ = seeded
    runs = [tmp / "gen" / f"seed{k}" for k in (0, 1)]
    configs = [yaml.safe_load((r / "config.yaml").read_text()) for r in runs]
    assert [c["run"]["seed"] for c in configs] == [0, 1]
    assert configs[0]["task"]["tokenizer_ckpt"] == configs[1]["task"]["tokenizer_ckpt"]
    tok_ckpt = tmp / "tok" / "checkpoints" / "last.ckpt"
    assert tok_ckpt.stat().st_mtime < (runs[1] / "config.yaml").stat().st_mtime  # trained once, before seed 1
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    assert all(m["train/steps"] == 2 for m in metrics)
    assert metrics[0]["train/loss"] != metrics[1]["train/loss"]  # another initialisation and data order


def test_a_seed_gives_the_same_run_whether_or_not_its_tokens_had_to_be_made(seeded):
    """Seed 0's first run tokenized the images in its process (loading a tokenizer draws random numbers for its
    initial weights); run again with the token shards in place, it must train the same model."""
    tmp, argv = seeded
    again = tmp / "again"
    with pinned_threads():
        assert main(["train", argv[1], "run.seed=0", f"run.dir={again}"]) == 0
    first = json.loads((tmp / "gen" / "seed0" / "metrics.json").read_text())
    second = json.loads((again / "metrics.json").read_text())
    assert second["train/loss"] == first["train/loss"] and second["val/ce"] == first["val/ce"]


def test_train_records_flops_per_image_per_checkpoint_and_in_total(seeded):
    tmp, _ = seeded
    run = tmp / "gen" / "seed0"
    m = json.loads((run / "metrics.json").read_text())
    side = json.loads((run / "checkpoints" / "flops.json").read_text())
    assert side["images_per_step"] == 16 and side["train_per_image"] == m["flops/train_per_image"] > 0
    assert m["flops/train_total"] == pytest.approx(2 * 16 * m["flops/train_per_image"])
    assert side["train_at_step"] == {"1": pytest.approx(side["train_per_step"]),
                                     "2": pytest.approx(m["flops/train_total"])}
    assert m["flops/sample_per_image"] > 0 and m["flops/analytic_6nt_per_image"] > 0
    assert 0.8 < m["flops/train_per_image"] / m["flops/analytic_6nt_per_image"] < 1.5
    tok = json.loads((tmp / "tok" / "metrics.json").read_text())  # the tokenizer's autoencoder, no sampling
    assert tok["flops/train_per_image"] > 0 and "flops/sample_per_image" not in tok and tok["model/params"] > 0


def test_a_rerun_skips_finished_seeds_and_resumes_an_interrupted_one(seeded, capsys):
    tmp, argv = seeded
    runs = [tmp / "gen" / f"seed{k}" for k in (0, 1)]
    before = (runs[0] / "metrics.json").stat().st_mtime_ns
    (runs[1] / "metrics.json").unlink()  # as if seed 1 was killed before it finished
    capsys.readouterr()
    with pinned_threads():
        assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"seed 0: {runs[0]} (skipped)" in out and f"seed 1: {runs[1]} (resumed)" in out
    assert (runs[0] / "metrics.json").stat().st_mtime_ns == before
    assert json.loads((runs[1] / "metrics.json").read_text())["train/steps"] == 2


def test_seed_errors_are_one_line(seeded, capsys):
    tmp, argv = seeded
    assert main([*argv, "trainer.max_steps=5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds a run with another config (trainer.max_steps: 2 -> 5)" in err
    assert main([*argv, "run.seed=3"]) == 2
    assert "--seeds and the override 'run.seed=3' both set run.seed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", argv[1], "--seeds", "0,0"])
    assert "seed 0 is repeated" in capsys.readouterr().err
    assert main(["train", str(tmp / "gen" / "seed0" / "config.yaml"), "--seeds", "2"]) == 2
    assert "is a run directory" in capsys.readouterr().err
