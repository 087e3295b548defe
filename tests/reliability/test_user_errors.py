"""User errors print one line ``arlab: error: ...`` and exit 2 (no traceback; ``--debug`` / ``ARLAB_DEBUG=1`` show it):
damaged checkpoints (sample, tokenize, resume), out-of-range command-line options, config values training would
reject, a run.dir that is a file, non-UTF-8 YAML, foreign manifests, a text conditioner without captions, and
messages that must name the real source of a value and a clean dotted key."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from arlab import rundir
from arlab.cli import build_parser, main
from arlab.config import load_experiment
from arlab.data.shards import ShardWriter, add_split, new_manifest, write_manifest
from arlab.data.tokenize import tokenize_shards
from arlab.errors import ConfigError
from arlab.train import fit
from tests.conftest import make_image_shards, png_bytes

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("ARLAB_DEBUG", raising=False)


def cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def one_line_error(rc: int, err: str, *needles: str) -> str:
    """Exit 2, exactly one ``arlab: error:`` line on stderr (the last), no traceback; returns that line."""
    errors = [line for line in err.splitlines() if line.startswith("arlab: error:")]
    assert rc == 2, err
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    assert "Traceback" not in err
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def write_yaml(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body))
    return path


def tokenizer_body(shards: Path, run: Path) -> dict:
    return {"data": {"type": "shards", "root": str(shards), "image_size": 16, "batch_size": 8, "num_workers": 0,
                     "val_split": "", "shuffle_buffer": 0},
            "tokenizer": {"preset": "shapes-fsq", "autoencoder": "tiny", "image_size": 16},
            "task": {"type": "tokenizer", "warmup_steps": 0, "log_images_every_n_steps": 0, "usage_window": 2},
            "trainer": {"max_steps": 2, "checkpoint_every_n_steps": 2, "enable_progress_bar": False,
                        "log_every_n_steps": 1, "limit_val_batches": 0},
            "run": {"dir": str(run)}}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A tiny real tokenizer checkpoint (2 steps on 16 synthetic images) and damaged variants of it."""
    tmp = tmp_path_factory.mktemp("lab")
    shards = tmp / "shards"
    make_image_shards(shards, [16], size=8)
    tok_exp = write_yaml(tmp / "tok.yaml", tokenizer_body(shards, tmp / "tok"))
    fit(load_experiment(tok_exp))
    ckpt = tmp / "tok" / "checkpoints" / "last.ckpt"
    data = ckpt.read_bytes()
    bad = tmp / "bad"
    bad.mkdir()
    (bad / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    (bad / "empty.ckpt").write_bytes(b"")
    (bad / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    (bad / "text.ckpt").write_text("these are my notes, not a checkpoint\n")
    with zipfile.ZipFile(bad / "zip.ckpt", "w") as z:
        z.writestr("notes/readme.txt", "a zip, not a checkpoint")
    (bad / "pickle.ckpt").write_bytes(pickle.dumps({"a": zipfile.ZipFile}))  # a pickle of something else
    torch.save([1, 2, 3], bad / "list.ckpt")
    torch.save({"state_dict": {}, "epoch": 0}, bad / "nohp.ckpt")
    generator_like = {"hyper_parameters": {"experiment": {"task": {"type": "generator"}}, "meta": {}},
                      "state_dict": {}, "optimizer_states": [{}], "loops": {}}
    torch.save(generator_like, tmp / "generator-task.ckpt")
    full = torch.load(ckpt, weights_only=True)
    torch.save({k: v for k, v in full.items() if k not in ("optimizer_states", "lr_schedulers")},
               tmp / "weights-only.ckpt")
    return SimpleNamespace(tmp=tmp, shards=shards, tok_exp=tok_exp, ckpt=ckpt, bad=bad)


DAMAGED = ["truncated", "empty", "random", "text", "zip", "pickle", "list", "nohp"]


# ----------------------------------------------------------------------------- 1. damaged checkpoints


@pytest.mark.parametrize("name", DAMAGED)
def test_sample_refuses_a_damaged_checkpoint_in_one_line(lab, capsys, tmp_path, name):
    path = lab.bad / f"{name}.ckpt"
    rc, err = cli(capsys, "sample", path, "--n", "2", "--out", tmp_path / "s")
    one_line_error(rc, err, f"'{path}' is not a readable checkpoint (")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("name", DAMAGED)
def test_tokenize_refuses_a_damaged_checkpoint_in_one_line(lab, capsys, tmp_path, name):
    path = lab.bad / f"{name}.ckpt"
    rc, err = cli(capsys, "tokenize", path, lab.shards, tmp_path / "tokens", "--quiet")
    one_line_error(rc, err, f"'{path}' is not a readable checkpoint (")


def test_read_task_checkpoint_says_why_a_file_is_unreadable(lab):
    with pytest.raises(ConfigError, match=r"the file is empty"):
        rundir.read_task_checkpoint(lab.bad / "empty.ckpt", "tokenizer")
    with pytest.raises(ConfigError, match=r"failed finding central directory"):
        rundir.read_task_checkpoint(lab.bad / "truncated.ckpt", "tokenizer")
    with pytest.raises(ConfigError, match=r"it holds a list"):
        rundir.read_task_checkpoint(lab.bad / "list.ckpt", "tokenizer")
    with pytest.raises(ConfigError, match=r"no hyper_parameters.experiment"):
        rundir.read_task_checkpoint(lab.bad / "nohp.ckpt", "tokenizer")
    with pytest.raises(ConfigError, match=r"is a folder"):
        rundir.read_task_checkpoint(lab.bad, "tokenizer")
    ckpt, hp = rundir.read_task_checkpoint(lab.ckpt, "tokenizer", mmap=True)
    assert hp["experiment"]["task"]["type"] == "tokenizer" and "state_dict" in ckpt


def test_check_resume_checkpoint(lab):
    rundir.check_resume_checkpoint(lab.ckpt, "tokenizer")  # a real one passes
    with pytest.raises(ConfigError, match=r"run.resume: .* is not a readable checkpoint"):
        rundir.check_resume_checkpoint(lab.bad / "truncated.ckpt", "tokenizer")
    with pytest.raises(ConfigError, match=r"is not a tokenizer checkpoint \(its task is 'generator'\)"):
        rundir.check_resume_checkpoint(lab.tmp / "generator-task.ckpt", "tokenizer")
    with pytest.raises(ConfigError, match=r"holds weights only"):
        rundir.check_resume_checkpoint(lab.tmp / "weights-only.ckpt", "tokenizer")


@pytest.mark.parametrize("name,message", [
    ("bad/truncated.ckpt", "is not a readable checkpoint"),
    ("bad/text.ckpt", "is not a readable checkpoint"),
    ("generator-task.ckpt", "is not a tokenizer checkpoint (its task is 'generator')"),
    ("weights-only.ckpt", "holds weights only"),
])
def test_resume_from_a_damaged_or_foreign_checkpoint_is_refused_before_training(lab, capsys, tmp_path, name,
                                                                                message):
    run = tmp_path / "run"
    rc, err = cli(capsys, "train", lab.tok_exp, f"run.resume={lab.tmp / name}", f"run.dir={run}")
    one_line_error(rc, err, "run.resume: ", message)
    assert not (run / "checkpoints").exists()  # no step was trained


def test_a_damaged_last_ckpt_is_not_resumed_automatically(lab, capsys, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes((lab.bad / "truncated.ckpt").read_bytes())
    rc, err = cli(capsys, "train", lab.tok_exp, f"run.dir={run}")
    one_line_error(rc, err, "run.resume: ", "last.ckpt' is not a readable checkpoint", "new run.dir")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # nothing overwritten


def test_tracebacks_only_with_debug(lab):
    """The real command, in a subprocess: one line by default; --debug shows the traceback."""
    env = {k: v for k, v in os.environ.items() if k != "ARLAB_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    bad = str(lab.bad / "truncated.ckpt")

    def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "arlab", *args], capture_output=True, text=True, timeout=120,
                              env={**env, **extra}, cwd=lab.tmp)

    r = run("sample", bad, "--n", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "is not a readable checkpoint" in r.stderr
    r = run("--debug", "sample", bad, "--n", "2")
    assert r.returncode != 0 and "Traceback" in r.stderr and "ConfigError" in r.stderr


def test_arlab_debug_raises_instead_of_printing(lab, monkeypatch):
    monkeypatch.setenv("ARLAB_DEBUG", "1")
    with pytest.raises(ConfigError, match="is not a readable checkpoint"):
        main(["sample", str(lab.bad / "truncated.ckpt"), "--n", "2"])


# ----------------------------------------------------------------------------- 2. command-line options


@pytest.mark.parametrize("argv,option", [
    (["sample", "x.ckpt", "--n", "0"], "--n"),
    (["sample", "x.ckpt", "--batch-size", "0"], "--batch-size"),
    (["sample", "x.ckpt", "--top-k", "-1"], "--top-k"),
    (["sample", "x.ckpt", "--top-p", "0"], "--top-p"),
    (["sample", "x.ckpt", "--top-p", "1.5"], "--top-p"),
    (["sample", "x.ckpt", "--cfg", "nan"], "--cfg"),
    (["sample", "x.ckpt", "--cfg", "inf"], "--cfg"),
    (["sample", "x.ckpt", "--cfg", "-1"], "--cfg"),
    (["sample", "x.ckpt", "--temperature", "-1"], "--temperature"),
    (["sample", "x.ckpt", "--temperature", "nan"], "--temperature"),
    (["sample", "x.ckpt", "--classes", "a,b"], "--classes"),
    (["sample", "x.ckpt", "--classes", "0,-1"], "--classes"),
    (["sample", "x.ckpt", "--cfg-schedule", "cosin"], "--cfg-schedule"),
    (["sample", "x.ckpt", "--seed", "-1"], "--seed"),
    (["sample", "x.ckpt", "--device", "cuda:99"], "--device"),
    (["sample", "x.ckpt", "--device", "gpu0"], "--device"),
    (["tokenize", "x.ckpt", "shapes", "out", "--batch-size", "0"], "--batch-size"),
    (["tokenize", "x.ckpt", "shapes", "out", "--device", "cuda:99"], "--device"),
    (["data", "pack", "src", "out", "--shard-size", "0"], "--shard-size"),
    (["data", "pack", "src", "out", "--workers", "-1"], "--workers"),
    (["data", "pack", "src", "out", "--seed", "-3"], "--seed"),
    (["data", "shapes", "out", "--n-train", "0"], "--n-train"),
    (["data", "shapes", "out", "--n-test", "-1"], "--n-test"),
    (["data", "shapes", "out", "--size", "8"], "--size"),
    (["data", "shapes", "out", "--shard-size", "0"], "--shard-size"),
])
def test_out_of_range_options_are_refused_by_the_parser(capsys, tmp_path, monkeypatch, argv, option):
    monkeypatch.chdir(tmp_path)  # (relative outputs, should the parser let one through)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {option}: " in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_sample_on_a_missing_gpu_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "x.ckpt", "--device", "cuda"])
    assert "argument --device: device 'cuda' is not available" in capsys.readouterr().err


def test_valid_sampling_options_parse_and_zero_temperature_means_greedy(capsys):
    a = build_parser().parse_args(["sample", "x.ckpt", "--temperature", "0", "--cfg", "0", "--top-p", "1",
                                   "--top-k", "0", "--classes", "0, 3", "--device", "cpu"])
    assert (a.temperature, a.cfg, a.top_p, a.top_k, a.classes, a.device) == (0.0, 0.0, 1.0, 0, [0, 3], "cpu")
    assert build_parser().parse_args(["sample", "x.ckpt"]).classes is None
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "0 = greedy" in " ".join(capsys.readouterr().out.split())


# ----------------------------------------------------------------------------- 3. values training would reject


@pytest.mark.parametrize("experiment,override,key", [
    ("shapes/quickstart", "task.lr=-0.001", "task.lr=-0.001"),
    ("shapes/quickstart", "task.lr=.nan", "task.lr=nan"),
    ("shapes/quickstart", "task.warmup_steps=-1", "task.warmup_steps=-1"),
    ("shapes/quickstart", "task.weight_decay=-0.1", "task.weight_decay=-0.1"),
    ("shapes/quickstart", "task.grad_clip=-1", "task.grad_clip=-1"),
    ("shapes/quickstart", "task.betas=[0.9,1.0]", "task.betas[1]=1.0"),
    ("shapes/quickstart", "task.eval_samples=-1", "task.eval_samples=-1"),
    ("shapes/quickstart", "task.n_sample_images=-1", "task.n_sample_images=-1"),
    ("shapes/quickstart", "task.sample_cfg=-1", "task.sample_cfg=-1"),
    ("shapes/quickstart", "task.sample_temperature=-1", "task.sample_temperature=-1"),
    ("shapes/quickstart", "task.token_dropout=1.0", "task.token_dropout=1.0"),
    ("shapes/tokenizer-fsq", "task.lr=-1", "task.lr=-1"),
    ("shapes/tokenizer-fsq", "task.betas=[-0.1,0.9]", "task.betas[0]=-0.1"),
    ("shapes/tokenizer-fsq", "task.disc_weight=-1", "task.disc_weight=-1"),
    ("shapes/tokenizer-fsq", "task.usage_window=0", "task.usage_window=0"),
    ("shapes/tokenizer-fsq", "trainer.checkpoint_every_n_steps=-1", "trainer.checkpoint_every_n_steps=-1"),
    ("shapes/tokenizer-fsq", "trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0"),
    ("shapes/tokenizer-fsq", "trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0"),
    ("shapes/tokenizer-fsq", "trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1"),
    ("shapes/tokenizer-fsq", "run.seed=-1", "run.seed=-1"),
])
def test_config_refuses_values_training_would_reject(capsys, experiment, override, key):
    rc, err = cli(capsys, "config", experiment, override)
    one_line_error(rc, err, key, "must be", "(command line)")


def test_a_bad_value_in_a_file_names_the_file(capsys, tmp_path):
    exp = write_yaml(tmp_path / "neg.yaml", {"base": [str(REPO / "experiments/shapes/tokenizer-fsq.yaml")],
                                              "task": {"lr": -2.0e-4}})
    rc, err = cli(capsys, "config", exp)
    one_line_error(rc, err, "task.lr=-0.0002: must be a number > 0", "neg.yaml)")


# ----------------------------------------------------------------------------- 4. run.dir


def test_run_dir_that_is_a_file_is_refused_before_any_work(lab, capsys, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    rc, err = cli(capsys, "train", lab.tok_exp, f"run.dir={notes}")
    one_line_error(rc, err, f"run.dir '{notes}' is an existing file")
    rc, err = cli(capsys, "train", lab.tok_exp, f"run.dir={notes}/run")
    one_line_error(rc, err, f"is under '{notes}', an existing file")
    assert notes.read_text() == "keep me"


# ----------------------------------------------------------------------------- 5. non-UTF-8 YAML


def test_non_utf8_experiment_and_preset_name_the_file(capsys, tmp_path, monkeypatch):
    exp = tmp_path / "latin1.yaml"
    exp.write_bytes(b"description: caf\xe9\nbase: [" + str(REPO / "experiments/shapes/tokenizer-fsq.yaml").encode()
                    + b"]\n")
    rc, err = cli(capsys, "config", exp)
    one_line_error(rc, err, "latin1.yaml is not UTF-8 text (byte 0xe9 at offset 16)")

    home = tmp_path / "home"
    (home / "registry" / "backbone").mkdir(parents=True)
    (home / "registry" / "backbone" / "latin1.yaml").write_bytes(b"# d\xe9faut\npreset: tiny\n")
    monkeypatch.setenv("ARLAB_HOME", str(home))
    rc, err = cli(capsys, "config", "shapes/quickstart", "backbone=latin1")
    one_line_error(rc, err, "latin1.yaml is not UTF-8 text")
    rc, err = cli(capsys, "list", "backbone")  # listing still works
    assert rc == 0


# ----------------------------------------------------------------------------- 6. foreign manifests


@pytest.mark.parametrize("text,what", [
    ("{}", "missing 'format', 'name', 'classes', 'splits'"),
    ('{"name": "x"}', "missing 'format', 'classes', 'splits'"),
    ("[1, 2]", "it holds a JSON list, not an object"),
    ("{not json", "is not valid JSON"),
    ('{"format": "arlab-shards/1", "name": "x", "classes": []}', "missing 'splits'"),
    ('{"format": "arlab-shards/1", "name": "x", "splits": {}}', "missing 'classes'"),
    ('{"format": "arlab-shards/1", "name": "x", "classes": [], "splits": {"train": {"count": 3}}}',
     "split 'train' has no 'shards'"),
    ('{"format": "arlab-shards/1", "name": "x", "classes": [], "splits": {}, "kind": "tokens"}',
     "token shards without 'tokenizer'"),
])
def test_data_info_on_a_foreign_manifest(capsys, tmp_path, text, what):
    (tmp_path / "dataset.json").write_text(text)
    rc, err = cli(capsys, "data", "info", tmp_path)
    one_line_error(rc, err, str(tmp_path / "dataset.json"), what)


def test_data_info_on_a_non_utf8_manifest(capsys, tmp_path):
    (tmp_path / "dataset.json").write_bytes(b"\xff\xfe{}")
    rc, err = cli(capsys, "data", "info", tmp_path)
    one_line_error(rc, err, "dataset.json is not UTF-8 text")


# ----------------------------------------------------------------------------- 7. text conditioner, no captions


def test_text_conditioner_on_data_without_captions_is_refused_before_training(lab, capsys, tmp_path):
    images = tmp_path / "images"  # like a packed CIFAR-10: no txt members, manifest captions: false
    classes = ["a", "b"]
    with ShardWriter(images / "train", shard_size=100) as w:
        for j in range(8):
            w.write({"__key__": f"k{j}", "png": png_bytes(np.full((8, 8, 3), 30 * j, np.uint8)), "cls": j % 2})
    m = new_manifest("nocaps", classes, captions=False)
    add_split(m, "train", w.shards, {"a": 4, "b": 4})
    write_manifest(images, m)
    tokens = tmp_path / "tokens"
    tokenize_shards(lab.ckpt, images, tokens, progress=False)
    run = tmp_path / "gen"
    body = {"data": {"type": "tokens", "root": str(tokens), "batch_size": 4, "num_workers": 0, "val_split": "",
                     "shuffle_buffer": 0},
            "backbone": "tiny", "order": "raster", "shuffle": "s1", "conditioner": {"type": "text"},
            "task": {"type": "generator", "tokenizer_ckpt": str(lab.ckpt), "sample_every_n_steps": 0,
                     "eval_samples": 0},
            "trainer": {"max_steps": 1, "enable_progress_bar": False, "limit_val_batches": 0,
                        "log_every_n_steps": 1},
            "run": {"dir": str(run)}}
    rc, err = cli(capsys, "train", write_yaml(tmp_path / "gen.yaml", body))
    one_line_error(rc, err, "conditioner text trains on captions, but the data 'nocaps' has none",
                   "conditioner.template")
    assert not (run / "checkpoints").exists()


# ----------------------------------------------------------------------------- 8. sources and dotted keys


@pytest.mark.parametrize("override", ["trainer..x=1", "trainer.=1", ".x=1", "backbone..depth=3",
                                      "tokenizer.quantizer..levels=[1]"])
def test_a_key_with_an_empty_part_is_malformed(capsys, override):
    rc, err = cli(capsys, "config", "shapes/tokenizer-fsq", override)
    line = one_line_error(rc, err, f"override '{override}'", "malformed")
    assert "(defaults)" not in line and "registry/" not in line


def test_an_empty_key_in_a_file_is_malformed(capsys, tmp_path):
    exp = tmp_path / "empty-key.yaml"
    exp.write_text(f"base: [{REPO / 'experiments/shapes/tokenizer-fsq.yaml'}]\ntrainer:\n  '': 3\n")
    rc, err = cli(capsys, "config", exp)
    one_line_error(rc, err, "'trainer.': malformed key", "empty-key.yaml")


@pytest.mark.parametrize("experiment,override,expected,wrong", [
    ("shapes/quickstart", "task.sample_schedule=foo", "task.sample_schedule='foo'", "shapes-generator.yaml"),
    ("shapes/quickstart", "backbone.heads=5", "heads: command line", None),
    ("shapes/quickstart", "data.batch_size=0", "data.batch_size=0: must be >= 1 (command line)", "registry/"),
    ("shapes/quickstart", "data.images=cifar10", "data.images=cifar10 is not the shapes set", "shapes-generator"),
    ("shapes/tokenizer-fsq", "tokenizer.autoencoder.norm_groups=5", "norm_groups: command line", None),
    ("shapes/tokenizer-fsq", "tokenizer.quantizer.levels=[8,5,x]", "tokenizer.quantizer.levels: [8, 5, 'x']",
     "(defaults)"),
    ("shapes/tokenizer-fsq", "tokenizer.autoencoder.ch_mult=[1,a]", "tokenizer.autoencoder.ch_mult:",
     "(defaults)"),
    ("shapes/tokenizer-msvq", "tokenizer.image_size=30", "tokenizer.image_size=30 is not divisible", None),
])
def test_messages_name_the_real_source_and_a_clean_key(capsys, experiment, override, expected, wrong):
    rc, err = cli(capsys, "config", experiment, override)
    line = one_line_error(rc, err, expected, "command line")
    assert not re.search(r"\.\.\w|\w\.:", line)  # no 'trainer..x', no 'trainer.:'
    if wrong:
        assert wrong not in line
