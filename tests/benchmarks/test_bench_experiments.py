"""benchmarks/bench_experiments.py on two experiments at tiny batches: it times the training path the generator
task uses (the chunked head + CE, ``return_logits=False``) and writes a speed file that ``arlab compare --speed``
reads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_experiments  # noqa: E402
import common  # noqa: E402

from arlab.compare_runs import read_speed  # noqa: E402


def test_speed_file_of_two_experiments(tmp_path):
    out = tmp_path / "speed.json"
    body = bench_experiments.main(["--only", "raster,var", "--repeat", "1", "--train-batch", "4", "--batch", "2",
                                   "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(body))
    speed = read_speed(out)
    assert [r["experiment"] for r in speed["rows"]] == ["shapes/raster", "shapes/var"]
    assert speed["threads"] == torch.get_num_threads() and speed["device"].startswith("cpu (")
    raster, var = speed["rows"]
    assert raster["steps_per_image"] == 64 and var["steps_per_image"] == 6  # msvq scales 1,2,3,4,6,8
    assert raster["tokens"] == 64 and var["tokens"] == 130
    assert all(r["train_images_per_s"] > 0 and r["sample_images_per_s"] > 0 for r in speed["rows"])


def test_the_training_step_uses_the_tasks_loss_path():
    calls = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, codes, cond, return_logits=True):
            calls.append(return_logits)
            return type("Out", (), {"loss": self.w * 2})()

    common.train_step_fn(Spy(), torch.zeros(1), torch.zeros(1))()
    assert calls == [False]
