"""task/generator: the experiment chain, token shards, resume exactness, sampling CLI, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from arlab.config import load_experiment
from arlab.errors import ConfigError
from arlab.generator.build import load_generator
from arlab.generator.sample import sample_to_files
from arlab.train import fit
from tests.conftest import pinned_threads


def write(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body))
    return path


def tokenizer_body(run: Path) -> dict:
    return {"data": {"preset": "shapes-tiny", "num_workers": 0, "batch_size": 32},
            "tokenizer": {"preset": "shapes-fsq", "autoencoder": "tiny"},
            "task": {"type": "tokenizer", "lr": 2e-3, "warmup_steps": 5, "log_images_every_n_steps": 0},
            "trainer": {"max_steps": 30, "val_check_interval": 30, "check_val_every_n_epoch": None,
                        "limit_val_batches": 1, "checkpoint_every_n_steps": 30, "enable_progress_bar": False},
            "run": {"dir": str(run)}}


def generator_body(tmp: Path, ckpt: Path, tok_exp: Path, run: str, shuffle: int = 2, steps: int = 12) -> dict:
    return {"data": {"type": "tokens", "images": "shapes-tiny", "tokenizer_ckpt": "${task.tokenizer_ckpt}",
                     "batch_size": 16, "num_workers": 0, "shuffle_buffer": 64},
            "backbone": "tiny", "order": "raster", "shuffle": f"s{shuffle}", "conditioner": "class",
            "task": {"type": "generator", "tokenizer_ckpt": str(ckpt), "tokenizer_experiment": str(tok_exp),
                     "lr": 1e-3, "warmup_steps": 2, "sample_every_n_steps": 0, "eval_samples": 20,
                     "eval_metrics": ["shapes_checker"]},
            "trainer": {"max_steps": steps, "val_check_interval": steps, "check_val_every_n_epoch": None,
                        "limit_val_batches": 1, "checkpoint_every_n_steps": steps, "enable_progress_bar": False,
                        "log_every_n_steps": 1},
            "run": {"dir": str(tmp / run)}}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, arlab_cache):
    """One generator experiment whose tokenizer does not exist yet: the whole chain runs.

    Its train/ce after 12 steps, over run.seed 0-2 x 1 and 2 threads: 5.89-6.07 (bound ln 1000 + 0.1 = 7.01).
    """
    tmp = tmp_path_factory.mktemp("gen")
    ckpt = tmp / "tok" / "checkpoints" / "last.ckpt"
    tok_exp = write(tmp / "tok.yaml", tokenizer_body(tmp / "unused"))
    exp = load_experiment(write(tmp / "gen.yaml", generator_body(tmp, ckpt, tok_exp, "gen")))
    with pinned_threads():  # one trajectory per machine, whatever its core count (tests/conftest.py)
        metrics = fit(exp)
    return tmp, ckpt, tok_exp, exp, metrics


def test_the_chain_trains_the_tokenizer_tokenizes_and_trains_the_generator(chain):
    tmp, ckpt, _, exp, metrics = chain
    assert ckpt.is_file()  # the tokenizer was trained into the checkpoint's run directory
    tokens = tmp / "tok" / "tokens" / "shapes-tiny" / "dataset.json"
    m = json.loads(tokens.read_text())
    assert m["kind"] == "tokens" and m["splits"]["train"]["count"] == 2000
    run = Path(exp.run.dir)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["train/steps"] == 12 and saved["sample/steps_per_image"] == 64  # tiny AE: 16x16 grid, s=2
    assert 0 <= saved["sample/class_acc"] <= 1 and saved["sample/images_per_s"] > 0
    assert {"train/ce_pos0", "train/ce_pos3", "val/ce"} <= set(saved)
    assert saved["train/ce"] < np.log(1000) + 0.1  # FSQ [8,5,5,5]: uniform CE is ln 1000
    assert (run / "samples.png").is_file()


def test_sample_cli_writes_grid_and_npz_and_is_deterministic(chain, tmp_path):
    _, _, _, exp, _ = chain
    ckpt = Path(exp.run.dir) / "checkpoints" / "last.ckpt"
    a = sample_to_files(ckpt, tmp_path / "a", n=6, classes=[2, 5], cfg=2.0, seed=3)
    b = sample_to_files(ckpt, tmp_path / "b", n=6, classes=[2, 5], cfg=2.0, seed=3)
    za, zb = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    assert za["images"].shape == (6, 32, 32, 3) and za["images"].dtype == np.uint8
    assert za["labels"].tolist() == [2, 5, 2, 5, 2, 5]
    assert np.array_equal(za["images"], zb["images"]) and a["steps_per_image"] == 64
    assert (tmp_path / "a" / "samples.png").is_file() and "class_acc" in b
    r = subprocess.run([sys.executable, "-m", "arlab", "sample", str(ckpt), "--n", "4", "--classes", "10",
                        "--out", str(tmp_path / "c")], capture_output=True, text=True)
    assert r.returncode == 2 and "class index 10 is outside the dataset's classes 0..9" in r.stderr
    tok = Path(exp.tree["task"]["tokenizer_ckpt"])
    with pytest.raises(ConfigError, match="is not a generator checkpoint"):
        load_generator(tok)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_from_a_mid_run_checkpoint_reproduces_the_uninterrupted_losses(chain, optimizer):
    """Also with task.optimizer=muon: MuonAdamW's momentum buffers and Adam moments come back from the checkpoint."""
    tmp, ckpt, tok_exp, _, _ = chain
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def losses(run: Path) -> dict[int, float]:
        ev = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
        ev.Reload()
        return {e.step: e.value for e in ev.Scalars("train/loss")}

    full = generator_body(tmp, ckpt, tok_exp, f"full-{optimizer}", steps=10)
    full["task"]["eval_samples"] = 0
    full["task"]["optimizer"] = optimizer
    full["conditioner"] = {"preset": "class", "dropout": 0.5}  # label dropout draws from the RNG
    fit(load_experiment(write(tmp / "full.yaml", full)))
    part = json.loads(json.dumps(full))
    part["run"]["dir"] = str(tmp / f"part-{optimizer}")
    part["trainer"]["checkpoint_every_n_steps"] = 5
    import pytorch_lightning as pl

    class StopAt5(pl.Callback):  # a crash after step 5: same max_steps, so the same LR schedule
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 5:
                trainer.should_stop = True

    fit(load_experiment(write(tmp / "part.yaml", part)), callbacks=[StopAt5()])
    assert (tmp / f"part-{optimizer}" / "checkpoints" / "step-5.ckpt").is_file()
    fit(load_experiment(write(tmp / "part.yaml", part)))  # same run directory: resumes from last.ckpt (step 5)
    a, b = losses(tmp / f"full-{optimizer}"), losses(tmp / f"part-{optimizer}")
    assert sorted(a) == list(range(10)) and sorted(b) == list(range(10))
    for step in range(5, 10):
        assert a[step] == pytest.approx(b[step], abs=1e-6), (step, a, b)


def test_generator_config_errors_before_work(chain, tmp_path):
    tmp, ckpt, tok_exp, _, _ = chain
    body = generator_body(tmp, ckpt, tok_exp, "bad")
    body["task"]["vocab_size"] = 512
    from arlab.task.generator import GeneratorModule

    exp = load_experiment(write(tmp_path / "v.yaml", body))
    with pytest.raises(ConfigError, match="task.vocab_size=512 does not match the tokenizer's vocabulary 1000"):
        GeneratorModule.data_meta(exp.config("task"), exp.build("data", seed=0))
    body = generator_body(tmp, ckpt, tok_exp, "bad")
    body["task"]["sample_schedule"] = "cosin"
    with pytest.raises(ConfigError, match="CFG schedule 'cosin' does not exist.*Did you mean 'cosine'"):
        load_experiment(write(tmp_path / "s.yaml", body))
    body = generator_body(tmp, tmp_path / "missing.ckpt", tok_exp, "bad")
    body["task"]["tokenizer_experiment"] = ""
    with pytest.raises(ConfigError, match="does not exist and task.tokenizer_experiment is empty"):
        fit(load_experiment(write(tmp_path / "m.yaml", body)))
    with pytest.raises(ConfigError, match="shuffle window s=3"):
        load_experiment(write(tmp_path / "w.yaml", generator_body(tmp, ckpt, tok_exp, "bad")), ["shuffle.s=3"])


def test_non_finite_loss_stops_with_step_and_batch(chain, monkeypatch, tmp_path):
    tmp, ckpt, tok_exp, _, _ = chain
    from arlab.generator import model as gm

    orig = gm.Generator.forward

    def nan_forward(self, codes, labels, **kw):
        out = orig(self, codes, labels, **kw)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(gm.Generator, "forward", nan_forward)
    body = generator_body(tmp, ckpt, tok_exp, "nan", steps=3)
    body["run"]["dir"] = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match="non-finite generator loss nan at step 0 \\(batch 0, keys"):
        fit(load_experiment(write(tmp_path / "nan.yaml", body)))


@pytest.mark.parametrize("kind", ["var", "nar", "text"])
def test_baseline_experiments_train_reload_and_sample(chain, kind, tmp_path):
    """VAR (msvq tokenizer, next-scale), NAR (neighbor) and the caption-conditioned model run the whole
    path: chain, training with their own logs, checkpoint reload, ``arlab sample``."""
    tmp, ckpt, tok_exp, _, _ = chain
    body = generator_body(tmp, ckpt, tok_exp, f"{kind}", steps=6)
    body["run"]["dir"] = str(tmp_path / kind)
    if kind == "var":  # its own msvq tokenizer: the tiny autoencoder at f=4 gives the 8x8 latent of msvq-8x8
        tok = tokenizer_body(tmp_path / "unused")
        tok["tokenizer"] = {"preset": "shapes-msvq", "autoencoder": {"preset": "tiny", "ch_mult": [1, 2, 2]}}
        tok["trainer"]["max_steps"] = tok["trainer"]["val_check_interval"] = 10
        tok["trainer"]["checkpoint_every_n_steps"] = 10
        body["task"]["tokenizer_ckpt"] = str(tmp_path / "msvq" / "checkpoints" / "last.ckpt")
        body["task"]["tokenizer_experiment"] = str(write(tmp_path / "msvq.yaml", tok))
        body["order"], body["shuffle"] = "next_scale", "s1"
        body["task"]["sample_schedule"] = "var"
    elif kind == "nar":
        body["order"] = "neighbor"
    else:
        body["conditioner"] = "text"
    metrics = fit(load_experiment(write(tmp_path / f"{kind}.yaml", body)))
    steps = {"var": 6, "nar": 15, "text": 64}[kind]  # 6 scales; 8 + 8 - 1 anti-diagonals of 2x2 windows; 256 / 4
    assert metrics["sample/steps_per_image"] == steps and 0 <= metrics["sample/class_acc"] <= 1
    if kind == "var":
        assert {"train/ce_scale0", "train/ce_scale5", "val/ce_scale5"} <= set(metrics)
    last = tmp_path / kind / "checkpoints" / "last.ckpt"
    module = load_generator(last)
    prompts = ["a large red ring in the center"] if kind == "text" else None
    s = sample_to_files(last, tmp_path / f"{kind}-samples", n=4, seed=1, prompts=prompts)
    z = np.load(tmp_path / f"{kind}-samples" / "samples.npz")
    assert z["images"].shape == (4, 32, 32, 3) and s["steps_per_image"] == steps and "class_acc" in s
    if kind == "text":
        assert z["labels"].tolist() == [6] * 4 and z["prompts"].tolist() == prompts * 4  # ring, read from the caption
        with pytest.raises(ConfigError, match="no class template; give --prompt instead of --classes"):
            sample_to_files(last, tmp_path / "y", n=2, classes=[1])
        with pytest.raises(ConfigError, match="--prompt needs a text-conditioned generator"):
            sample_to_files(ckpt.parent.parent.parent / "gen" / "checkpoints" / "last.ckpt", tmp_path / "x", n=2,
                            prompts=prompts)
    else:
        assert module.model.conditioner.registry_key == "conditioner/class"
    if kind == "var":  # the bound msvq is checked against the tokenizer on reload
        import torch

        ck = torch.load(last, map_location="cpu", weights_only=True)
        ck["state_dict"]["model.order.quant.embedding.weight"] += 1.0
        torch.save(ck, tmp_path / "other.ckpt")
        with pytest.raises(ConfigError, match="is not the one .* was trained with: its quantizer differs"):
            load_generator(tmp_path / "other.ckpt")


def test_bf16_training_with_the_fused_optimizer_clips_the_gradients(chain, tmp_path, monkeypatch):
    """The GPU configuration's optimizer path on a CPU: bf16-mixed autocast, fused AdamW and gradient clipping
    (Lightning's own clip_gradients refuses fused optimizers under mixed precision; arlab clips them itself).
    Every step clips to task.grad_clip: the clipped norm is at most the bound."""
    tmp, ckpt, tok_exp, _, _ = chain
    body = generator_body(tmp, ckpt, tok_exp, "bf16", steps=4)
    body["trainer"]["precision"] = "bf16-mixed"
    body["task"]["grad_clip"] = 0.05  # small enough that every step clips
    body["task"]["eval_samples"] = 0
    body["run"]["dir"] = str(tmp_path / "bf16")
    norms: list[tuple[float, float]] = []
    original = torch.nn.utils.clip_grad_norm_

    def recording(params, max_norm, *args, **kwargs):
        params = list(params)
        before = original(params, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params]))
        norms.append((float(before), float(after)))
        return before

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    with pinned_threads():
        metrics = fit(load_experiment(write(tmp_path / "bf16.yaml", body)))
    assert np.isfinite(metrics["train/loss"])
    assert len(norms) == 4, norms  # once per step
    assert all(before > 0.05 and after <= 0.05 * 1.001 for before, after in norms), norms
