"""Run directories tell the truth: resuming with another config is refused (config.yaml untouched), a
moved run resumes where it is, last.ckpt is never shadowed by last-v1.ckpt, a second writer is refused
naming the first's pid, and Ctrl-C says how to resume (exit 130)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest
import pytorch_lightning as pl
import torch
import yaml

from arlab.cli import main
from arlab.config import load_experiment
from arlab.data.pack import pack_imagefolder
from arlab.errors import ConfigError, Interrupted
from arlab.train import fit

from .common import REPO, make_imagefolder, tokenizer_experiment


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    data = tmp / "packed"
    pack_imagefolder(make_imagefolder(tmp / "src"), data, shard_size=10, workers=1, progress=False)
    exp_file = tokenizer_experiment(tmp, data, tmp / "run")
    fit(load_experiment(exp_file))
    return tmp, data, exp_file, tmp / "run"


def weights(ckpt) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def test_config_yaml_says_the_run_is_its_folder(trained):
    _, _, _, run = trained
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["run"]["dir"] == "."
    assert load_experiment(run / "config.yaml").run.dir == str(run)


def test_resume_with_changed_hyperparameters_is_refused_and_config_kept(trained):
    _, _, exp_file, run = trained
    before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"holds a run with another config \(task.lr: 0.001 -> 0.002\)"):
        fit(load_experiment(exp_file, ["task.lr=0.002"]))
    with pytest.raises(ConfigError, match=r"tokenizer.autoencoder.ch: 32 -> 16"):  # another architecture
        fit(load_experiment(exp_file, ["tokenizer.autoencoder.ch=16"]))
    assert (run / "config.yaml").read_text() == before
    with pytest.raises(ConfigError, match="would train from scratch over the checkpoints"):
        fit(load_experiment(exp_file, ["run.resume=never"]))


class StopAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_a_moved_run_resumes_in_its_new_folder(trained, tmp_path):
    tmp, data, _, _ = trained
    run = tmp_path / "half"
    fit(load_experiment(tokenizer_experiment(tmp_path, data, run)), callbacks=[StopAt(2)])  # stopped at step 2
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    fit(load_experiment(moved / "config.yaml"))  # resumes the copy, where it is
    assert torch.load(moved / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before  # the original untouched


def test_resuming_from_a_checkpoint_elsewhere_never_writes_last_v1(trained, tmp_path):
    tmp, data, _, run = trained
    other = tmp_path / "other"
    exp = load_experiment(tokenizer_experiment(tmp_path, data, other, steps=6),
                          [f"run.resume={run / 'checkpoints' / 'step-2.ckpt'}"])
    (other / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "last.ckpt", other / "checkpoints" / "last.ckpt")  # a stale last.ckpt
    fit(exp)
    names = sorted(p.name for p in (other / "checkpoints").iterdir())
    assert "last-v1.ckpt" not in names and "last.ckpt" in names
    assert torch.load(other / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_a_second_writer_is_refused_naming_the_first(trained, tmp_path):
    tmp, data, _, _ = trained
    exp_file = tokenizer_experiment(tmp_path, data, tmp_path / "busy")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from arlab.rundir import RunLock\n"
        f"with RunLock(Path({str(tmp_path / 'busy')!r})):\n    print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=f"in use by another arlab train \\(pid {holder.pid}\\)"):
            fit(load_experiment(exp_file))
    finally:
        holder.kill()
        holder.wait()
    time.sleep(0.1)
    fit(load_experiment(exp_file))  # the lock went with the killed holder


def test_ctrl_c_says_how_to_resume_and_exits_130(trained, tmp_path, monkeypatch, capsys):
    tmp, data, _, _ = trained
    run = tmp_path / "int"
    exp_file = tokenizer_experiment(tmp_path, data, run, steps=6)

    class CtrlC(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                raise KeyboardInterrupt

    with pytest.raises(Interrupted, match=f"resume with: arlab train {run / 'config.yaml'}"):
        fit(load_experiment(exp_file), callbacks=[CtrlC()])
    from arlab import train as train_mod

    real_fit = train_mod.fit
    monkeypatch.setattr(train_mod, "fit", lambda exp: real_fit(exp, callbacks=[CtrlC()]))
    assert main(["train", str(exp_file), "run.dir=" + str(tmp_path / "int2")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("arlab: interrupted at step 3; resume with: arlab train")
