"""``arlab compare`` on hand-written run directories: table values (mean, std, t interval) by hand, bits per
image from metrics or from the tokenizer's config, best settings by the eval file's directions, grouping,
curves, byte-identical outputs; and the notebook that shows them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from arlab.cli import main
from arlab.compare import build, compare
from arlab.compare_runs import t_quantile
from arlab.config import load_experiment
from arlab.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def write_json(path: Path, body: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))


def eval_body(fid_cfg2: float, step: int) -> dict:
    """Two sampling settings: cfg 1 (fid 10, acc 0.5, 100 images/s) and cfg 2 (fid fid_cfg2, acc 0.7, 50/s).
    Its ``best`` is deliberately wrong for fid: the picking must follow ``directions``."""
    def setting(cfg):
        return {"cfg": cfg, "schedule": "constant", "temperature": 1.0, "top_k": 0, "top_p": 1.0}

    return {"name": "main", "kind": "generator", "checkpoint": "last.ckpt", "step": step, "run": ".", "n": 100,
            "features": "x", "reference": "y",
            "settings": [{"setting": setting(1.0), "metrics": {"fid": 10.0, "class_acc": 0.5}, "n": 100,
                          "images_per_s": 100.0},
                         {"setting": setting(2.0), "metrics": {"fid": fid_cfg2, "class_acc": 0.7}, "n": 100,
                          "images_per_s": 50.0}],
            "best": {"fid": {"value": 10.0, "setting": setting(1.0)}, "is": {"value": 3.5, "setting": setting(1.0)}},
            "directions": {"fid": "min", "class_acc": "max"}}


def make_run(d: Path, name: str, seed: int, metrics: dict | None, tokenizer_ckpt: str = "", steps: int = 10,
             evals: dict | None = None, per_step: float | None = None) -> Path:
    tree = {"name": name, "run": {"dir": ".", "seed": seed, "resume": "auto"}, "trainer": {"max_steps": steps},
            "task": {"type": "generator", "tokenizer_ckpt": tokenizer_ckpt}}
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(tree))
    if metrics is not None:
        write_json(d / "metrics.json", metrics)
    for stem, body in (evals or {}).items():
        write_json(d / "eval" / f"{stem}.json", body)
    if per_step:
        write_json(d / "checkpoints" / "flops.json", {"train_per_step": per_step, "train_per_image": per_step / 4})
    return d


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """exp/a: seeds 0-2 (+ an unfinished seed 3); exp/b: seeds 0-1 whose tokens per image come from its tokenizer's
    config; exp/a again with another max_steps (one seed)."""
    monkeypatch.chdir(tmp_path)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "config.yaml").write_text(yaml.safe_dump({"tokenizer": load_experiment("shapes/tokenizer-fsq").tree[
        "tokenizer"]}))  # FSQ 8x8: 64 tokens per image
    for k, ce in enumerate([2.0, 2.2, 2.4]):
        make_run(tmp_path / "runs" / "exp" / "a" / f"seed{k}", "exp/a", k,
                 {"val/ce": ce, "model/params": 100.0, "model/tokens_per_image": 64.0,
                  "flops/train_total": 1e12 * (k + 1), "perf/train_images_per_s": 300.0 + k,
                  "sample/images_per_s": 20.0, "sample/steps_per_image": 64.0},
                 evals={"main": eval_body(8.0 + k / 2, 10), "main-step5": eval_body(9.0 + k / 2, 5)}, per_step=1e11)
    make_run(tmp_path / "runs" / "exp" / "a" / "seed3", "exp/a", 3, None)
    for k, ce in enumerate([1.0, 1.5]):
        make_run(tmp_path / "b" / f"seed{k}", "exp/b", k, {"val/ce": ce, "model/params": 50.0},
                 tokenizer_ckpt=str(tok / "checkpoints" / "last.ckpt"), evals={"main": eval_body(6.0, 10)})
    make_run(tmp_path / "other" / "x", "exp/a", 0, {"val/ce": 3.0}, steps=20)
    return tmp_path


def test_t_quantiles_match_tables():
    for df, q in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452)):
        assert t_quantile(0.975, df) == pytest.approx(q, abs=2e-4)


def test_table_values_by_hand(runs):
    data = build(["exp/a", "b", "other/x"])
    groups = {g["label"]: g for g in data["groups"]}
    assert sorted(groups) == ["exp/a (trainer.max_steps=10)", "exp/a (trainer.max_steps=20)", "exp/b"]
    a = groups["exp/a (trainer.max_steps=10)"]
    assert a["seeds"] == [0, 1, 2] and data["skipped"] == ["runs/exp/a/seed3"]
    bits = a["quantities"]["val_bits_per_image"]
    scale = 64 / math.log(2)
    half = 4.302653 * 0.2 * scale / math.sqrt(3)
    assert bits["mean"] == pytest.approx(2.2 * scale) and bits["std"] == pytest.approx(0.2 * scale)
    assert bits["ci95"] == pytest.approx([2.2 * scale - half, 2.2 * scale + half], rel=1e-6)
    assert a["quantities"]["params"]["std"] == 0 and a["quantities"]["train_flops"]["mean"] == pytest.approx(2e12)
    fid, acc = a["quantities"]["fid"], a["quantities"]["class_acc"]
    assert fid["values"] == [8.0, 8.5, 9.0] and acc["values"] == [0.7] * 3  # min fid, max acc: cfg 2
    assert a["settings"]["fid"] == ["cfg=2 schedule=constant temperature=1 top_k=0 top_p=1"]
    assert a["quantities"]["is"]["values"] == [3.5] * 3  # no direction: the file's best
    assert a["sampling"]["fid"] == [{"key": "cfg=1 schedule=constant temperature=1 top_k=0 top_p=1", "n": 3,
                                     "images_per_s": 100.0, "value": 10.0},
                                    {"key": "cfg=2 schedule=constant temperature=1 top_k=0 top_p=1", "n": 3,
                                     "images_per_s": 50.0, "value": 8.5}]
    # steps 5 and 10 at 1e11 FLOPs per step; best fid 9 + k/2 and 8 + k/2 over seeds k = 0..2
    assert [(p["key"], p["flops"], p["value"]) for p in a["compute"]["fid"]] == [(5, 5e11, 9.5), (10, 1e12, 8.5)]
    b = groups["exp/b"]
    assert b["quantities"]["val_bits_per_image"]["mean"] == pytest.approx(1.25 * scale)  # tokens from the config
    half_b = 12.7062 * (0.5 / math.sqrt(2)) * scale / math.sqrt(2)
    assert b["quantities"]["val_bits_per_image"]["ci95"][1] == pytest.approx(1.25 * scale + half_b, rel=1e-4)
    lone = groups["exp/a (trainer.max_steps=20)"]
    assert "val_bits_per_image" not in lone["quantities"]  # tokens per image unknown: no bits, not a wrong number
    by_name = {g["label"]: g for g in build(["exp/a", "other/x"], group_by="experiment")["groups"]}
    assert list(by_name) == ["exp/a"] and len(by_name["exp/a"]["runs"]) == 4


def test_generators_on_tokenizers_of_one_recipe_are_seeds_of_one_config(tmp_path, monkeypatch):
    """A chain per seed trains its own tokenizer (task.tokenizer_overrides=[run.seed=k, ...]): the generators'
    configs differ in task.tokenizer_ckpt and in those overrides, yet they are seeds of one config (the tokenizer
    stands for its run's recipe, which makes the overrides redundant). Generators on a tokenizer of another recipe
    (550 steps) are not; one on a tokenizer whose run is gone stays apart, by its path."""
    monkeypatch.chdir(tmp_path)

    def tokenizer(name: str, seed: int, steps: int) -> str:
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(yaml.safe_dump({"name": "shapes/tokenizer-quick", "run": {
            "dir": f"runs/{name}", "seed": seed}, "trainer": {"max_steps": steps}}))
        return f"runs/{name}/checkpoints/last.ckpt"

    ckpts = [tokenizer("tok-s0", 0, 700), tokenizer("tok-s1", 1, 700), tokenizer("short-s0", 0, 550),
             tokenizer("short-s1", 1, 550), "runs/gone/checkpoints/last.ckpt"]
    refs = []
    for i, (ckpt, seed) in enumerate(zip(ckpts, [0, 1, 0, 1, 2])):
        d = make_run(tmp_path / "runs" / f"gen{i}", "shapes/quickstart", seed, {"val/ce": 2.0 + i / 10},
                     tokenizer_ckpt=ckpt)
        tree = yaml.safe_load((d / "config.yaml").read_text())
        tree["task"]["tokenizer_overrides"] = [f"run.seed={seed}", f"trainer.log_every_n_steps={10 + 10 * i}"]
        (d / "config.yaml").write_text(yaml.safe_dump(tree))
        refs.append(str(d))
    groups = {g["label"]: g["seeds"] for g in build(refs[:4])["groups"]}
    assert groups == {"shapes/quickstart (task.tokenizer_ckpt:trainer.max_steps=550)": [0, 1],
                      "shapes/quickstart (task.tokenizer_ckpt:trainer.max_steps=700)": [0, 1]}
    groups = {g["label"]: g["seeds"] for g in build([refs[0], refs[1], refs[4]])["groups"]}
    assert sorted(groups.values()) == [[0, 1], [2]]
    assert groups[next(k for k in groups if "task.tokenizer_ckpt=runs/gone/checkpoints/last.ckpt" in k)] == [2]
    # a tokenizer run older than a key (its config lacks it) is labelled by the missing key
    old = tmp_path / "runs" / "old-s0"
    old.mkdir()
    (old / "config.yaml").write_text(yaml.safe_dump({"name": "shapes/tokenizer-quick", "run": {"seed": 0}}))
    refs.append(str(make_run(tmp_path / "runs" / "gen-old", "shapes/quickstart", 0, {"val/ce": 2.0},
                             tokenizer_ckpt="runs/old-s0/checkpoints/last.ckpt")))
    labels = sorted(g["label"] for g in build([refs[0], refs[-1]])["groups"])
    assert labels == ["shapes/quickstart (task.tokenizer_ckpt:trainer.max_steps=(unset))",
                      "shapes/quickstart (task.tokenizer_ckpt:trainer.max_steps=700)"]


def test_a_run_without_flop_count_keeps_its_values_on_the_compute_curve(tmp_path, monkeypatch):
    """A seed trained before FLOPs were counted (no checkpoints/flops.json) still adds its quality values; the
    step's FLOPs come from the seeds that counted them."""
    monkeypatch.chdir(tmp_path)
    for k in range(2):
        make_run(tmp_path / "runs" / "e" / f"seed{k}", "e", k, {"val/ce": 2.0},
                 evals={"main": eval_body(8.0 + k, 10), "main-step5": eval_body(9.0 + k, 5)},
                 per_step=1e11 if k else None)
    (g,) = build(["e"])["groups"]
    assert [(p["key"], p["n"], p["flops"], p["value"]) for p in g["compute"]["fid"]] == [
        (5, 2, 5e11, 9.5), (10, 2, 1e12, 8.5)]


def test_outputs_are_byte_identical_and_the_cli_prints_the_table(runs, capsys):
    first = compare(["exp/a", "b"], out="out1", evals=["main"])
    compare(["b", "exp/a"], out="out2", evals=["main"])  # the arguments in another order
    names = sorted(p.name for p in first.files)  # (no tb/ in these runs: no loss curves)
    assert names == ["compare.csv", "compare.json", "compare.md", "quality_vs_compute.png", "quality_vs_sampling.png"]
    for name in names:
        assert (runs / "out1" / name).read_bytes() == (runs / "out2" / name).read_bytes(), name
    md = first.markdown
    assert "| exp/a | 3 (0,1,2) | 100 ± 0 [100, 100] |" in md
    assert "| exp/a | fid | cfg=2 schedule=constant temperature=1 top_k=0 top_p=1 |" in md
    csv_rows = (runs / "out1" / "compare.csv").read_text().splitlines()
    assert csv_rows[0] == "group,quantity,n,mean,std,ci95_low,ci95_high,setting"
    assert any(r.startswith("exp/a,fid,3,8.5,0.5,7.25793") for r in csv_rows)  # 8.5 - 4.302653 * 0.5 / sqrt(3)
    assert main(["compare", "exp/a", "--out", "out3"]) == 0
    assert "| exp/a |" in capsys.readouterr().out
    assert main(["compare", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'nowhere' is neither a run directory" in err
    assert main(["compare", "exp/a", "--eval", "fid50k"]) == 2
    assert "--eval fid50k: no run has eval/fid50k.json (found: main)" in capsys.readouterr().err


def test_loss_curves_from_tensorboard_in_bits_per_image(runs):
    from torch.utils.tensorboard import SummaryWriter

    for k in range(3):
        with SummaryWriter(str(runs / "runs" / "exp" / "a" / f"seed{k}" / "tb")) as w:
            for step in range(4):
                w.add_scalar("train/ce", 3.0 - step * 0.5 + k * 0.1, step)
    g = build(["exp/a"])["groups"][0]
    scale = 64 / math.log(2)
    assert g["curve"]["step"] == [0, 1, 2, 3] and g["curve"]["unit"] == "bits/image"
    assert g["curve"]["value"] == pytest.approx([(3.1 - s * 0.5) * scale for s in range(4)])
    assert g["curve"]["flops"] == [0, 1e11, 2e11, 3e11]
    files = compare(["exp/a"], out="curves").files
    assert "loss_curves.png" in {p.name for p in files}


def test_the_notebook_runs_on_compare_output(runs, monkeypatch):
    """notebooks/compare.ipynb: its code cells, in order, in one namespace (no Jupyter kernel)."""
    compare(["exp/a", "b"], out="nb")
    monkeypatch.setenv("ARLAB_COMPARE", str(runs / "nb"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = json.loads((REPO / "notebooks" / "compare.ipynb").read_text())
    ns: dict = {}
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert cells
    for cell in cells:
        exec(compile("".join(cell["source"]), "compare.ipynb", "exec"), ns)
    assert [g["label"] for g in ns["data"]["groups"]] == ["exp/a", "exp/b"]
    assert ns["figures"] and os.path.isdir(ns["COMPARE"])


def test_speed_columns_come_from_one_benchmark_file_matched_by_name_and_parameters(runs):
    """--speed: exp/a's row matches (name and 100 parameters); exp/b's benchmark model has other parameters than
    its runs, so it gets no speed and the table says why; a file of another format is refused by name."""
    write_json(runs / "speed.json", {"format": "arlab-speed/1", "device": "cpu (test)", "threads": 2,
                                     "train_batch": 64, "sample_batch": 32,
                                     "rows": [{"experiment": "exp/a", "params": 100, "train_images_per_s": 150.5,
                                               "sample_images_per_s": 70.25},
                                              {"experiment": "exp/b", "params": 60, "train_images_per_s": 1.0,
                                               "sample_images_per_s": 1.0}]})
    res = compare(["exp/a", "b"], out="o", evals=["main"], speed="speed.json")
    groups = {g["label"]: g for g in res.data["groups"]}
    assert groups["exp/a"]["bench"] == {"bench_train_images_per_s": 150.5, "bench_sample_images_per_s": 70.25}
    assert groups["exp/b"]["bench"] == {}
    assert res.data["speed"]["unmatched"] == ["exp/b: the benchmark's model has 60 parameters, the runs 50"]
    header = next(ln for ln in res.markdown.splitlines() if ln.startswith("| model |"))
    assert "train images/s (bench) | sampling images/s (bench) |" in header
    row_a = next(ln for ln in res.markdown.splitlines() if ln.startswith("| exp/a | 3"))
    cells = [c.strip() for c in row_a.strip("|").split("|")]
    titles = [c.strip() for c in header.strip("|").split("|")]
    assert cells[titles.index("train images/s (bench)")] == "150.5"
    assert cells[titles.index("sampling images/s (bench)")] == "70.25"
    assert cells[titles.index("train images/s")].startswith("301 ± 1 ")  # the runs' own, kept beside it
    assert "one machine (cpu (test), 2 threads" in res.markdown
    assert "exp/a,bench_train_images_per_s,1,150.5,,,," in (runs / "o" / "compare.csv").read_text()
    write_json(runs / "list.json", {"rows": []})
    with pytest.raises(ConfigError, match="--speed list.json: not a speed file"):
        build(["exp/a"], speed="list.json")
    write_json(runs / "short.json", {"format": "arlab-speed/1", "rows": [{"experiment": "exp/a", "params": 1}]})
    with pytest.raises(ConfigError, match=r"rows\[0\] lacks train_images_per_s, sample_images_per_s"):
        build(["exp/a"], speed="short.json")
