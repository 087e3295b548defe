"""Kill -9 at random moments, re-run, and the final output equals an uninterrupted run's.

Each command runs as a real ``python -m arlab`` process, killed with SIGKILL after a random delay drawn
(seeded) over that command's uninterrupted duration; after every kill the output folder is either absent,
the previous complete output, or the new complete one (never a mixture), and the re-run finishes it.
Compared: every byte of the packed and tokenized folders; for training, every tensor of the final
checkpoint's model and optimizer state."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from arlab.config import load_experiment
from arlab.data.pack import pack_imagefolder
from arlab.train import fit

from .common import REPO, arlab, digest, make_imagefolder, tokenizer_experiment

KILLS = int(os.environ.get("ARLAB_KILL_POINTS", "2"))  # random kill points per command (make test-all: more)


def run_killed(args: list[str], delay: float) -> bool:
    """Start ``arlab ARGS``; SIGKILL it after ``delay`` s. True if it was killed (False: it finished first)."""
    env = {**os.environ, "ARLAB_LOG": "WARNING"}
    p = subprocess.Popen([sys.executable, "-m", "arlab", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        p.wait(timeout=delay)
        assert p.returncode == 0, p.stderr.read().decode()[-2000:]
        return False
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()
        return True
    finally:
        p.stderr.close()


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    arlab(*args)
    return time.perf_counter() - t0


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kill")
    folder = make_imagefolder(tmp / "src", n=300, size=32)
    archive = tmp / "src.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="src")
    return tmp, folder, archive


def test_pack_killed_at_random_moments_then_rerun_equals_an_uninterrupted_pack(source):
    tmp, _, archive = source
    rng = random.Random(0)
    args = lambda out: ["data", "pack", str(archive), str(out), "--workers", "1", "--shard-size", "40", "--quiet",
                        "--overwrite", "--name", "src"]
    duration = timed(args(tmp / "ref"))
    ref = digest(tmp / "ref")
    out, killed = tmp / "out", 0
    for _ in range(KILLS):
        killed += run_killed(args(out), rng.uniform(0.3, duration))
        assert not out.exists() or digest(out) == ref  # absent or complete, never partial
        arlab(*args(out))  # the re-run finishes it
        assert digest(out) == ref
        assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(".out.")) == []  # no leftovers
    assert killed >= 1


@pytest.fixture(scope="module")
def tokenizer(source):
    tmp, folder, _ = source
    data = tmp / "shards"
    pack_imagefolder(folder, data, shard_size=100, workers=1, progress=False)
    fit(load_experiment(tokenizer_experiment(tmp, data, tmp / "tok")))
    return data, tmp / "tok" / "checkpoints" / "last.ckpt"


def test_tokenize_killed_at_random_moments_then_rerun_equals_an_uninterrupted_tokenize(source, tokenizer):
    tmp, _, _ = source
    data, ckpt = tokenizer
    rng = random.Random(1)
    args = lambda out, flip: ["tokenize", str(ckpt), str(data), str(out), "--quiet", "--overwrite",
                              "--batch-size", "32", *(["--flip"] if flip else [])]
    duration = timed(args(tmp / "tref", True))
    ref = digest(tmp / "tref")
    out = tmp / "tokens"
    arlab(*args(out, False))  # an existing token folder of other content, replaced with --overwrite
    old = digest(out)
    killed = 0
    for _ in range(KILLS):
        killed += run_killed(args(out, True), rng.uniform(0.3, duration))
        assert digest(out) in (old, ref)  # the old tokens or the new ones, never shards of both
        arlab(*args(out, True))
        assert digest(out) == ref
        arlab(*args(out, False))
        old = digest(out)
    assert killed >= 1


def state(ckpt: Path) -> dict[str, torch.Tensor]:
    c = torch.load(ckpt, map_location="cpu", weights_only=True)
    out = {f"model/{k}": v for k, v in c["state_dict"].items()}
    for i, opt in enumerate(c["optimizer_states"]):
        for pid, st in opt["state"].items():
            out.update({f"opt{i}/{pid}/{k}": v for k, v in st.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.mark.slow
def test_training_killed_at_random_moments_then_resumed_equals_an_uninterrupted_run(source, tokenizer):
    tmp, _, _ = source
    data, _ = tokenizer
    rng = random.Random(2)
    ref_exp = tokenizer_experiment(tmp, data, tmp / "train-ref", steps=8)
    duration = timed(["train", str(ref_exp)])
    ref = state(tmp / "train-ref" / "checkpoints" / "last.ckpt")
    killed = 0
    for k in range(KILLS):
        run = tmp / f"train-{k}"
        exp = tokenizer_experiment(tmp, data, run, steps=8)
        for _ in range(2):  # killed twice at random moments, resumed each time
            killed += run_killed(["train", str(exp)], rng.uniform(2.0, duration))
        arlab("train", str(exp))  # resume to the end
        got = state(run / "checkpoints" / "last.ckpt")
        assert got.keys() == ref.keys()
        for key, v in ref.items():
            assert torch.equal(got[key], v), key
        assert (run / "metrics.json").is_file()
    assert killed >= 1
