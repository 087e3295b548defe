"""``arlab eval`` of a generator run: chunked drawing that resumes without redrawing, sweeps and the best
setting per metric, the report's fields, TensorBoard, and one-line errors for bad options."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from arlab.evaluation import generator as evalgen
from arlab.evaluation.chunks import chunk_seed
from arlab.evaluation.generator import eval_generator
from arlab.evaluation.settings import best_per_metric

CKPT = ("checkpoints", "last.ckpt")
REAL_GENERATE = evalgen.generate_images
KEYS = {"name", "kind", "checkpoint", "step", "run", "n", "features", "reference", "settings", "best", "directions"}


def chunks(run: Path, name: str, setting: str) -> list[Path]:
    return sorted((run / "eval" / name / "samples" / setting).glob("chunk-*.npz"))


def images_of(files: list[Path]) -> np.ndarray:
    return np.concatenate([np.load(f)["images"] for f in files])


class Interrupt(Exception):
    pass


def counting(monkeypatch, stop_after: int | None = None) -> list[int]:
    """Count generate_images calls (one per chunk drawn); raise Interrupt once ``stop_after`` have run."""
    calls: list[int] = []

    def wrapped(*a, **kw):
        if stop_after is not None and len(calls) == stop_after:
            raise Interrupt
        calls.append(kw["seed"])
        return REAL_GENERATE(*a, **kw)

    monkeypatch.setattr(evalgen, "generate_images", wrapped)
    return calls


def test_an_interrupted_eval_resumes_without_redrawing_and_equals_an_uninterrupted_one(tiny_runs, monkeypatch):
    run, _ = tiny_runs
    opts = dict(n=10, chunk=3, batch_size=2, metrics=["shapes_checker"], progress=False, tensorboard=False)
    full, _ = eval_generator(run.joinpath(*CKPT), run, "full", **opts)
    setting = full["settings"][0]["id"]
    ref = chunks(run, "full", setting)
    assert [len(np.load(f)["images"]) for f in ref] == [3, 3, 3, 1]

    calls = counting(monkeypatch, stop_after=2)
    with pytest.raises(Interrupt):  # killed while drawing the third chunk
        eval_generator(run.joinpath(*CKPT), run, "part", **opts)
    done = chunks(run, "part", setting)
    assert len(done) == 2 and not (run / "eval" / "part.json").exists()
    mtimes = {f.name: f.stat().st_mtime_ns for f in done}

    calls = counting(monkeypatch)
    report, path = eval_generator(run.joinpath(*CKPT), run, "part", **opts)
    assert calls == [chunk_seed(0, 2), chunk_seed(0, 3)]  # only the missing chunks, with their own seeds
    assert {f.name: f.stat().st_mtime_ns for f in done} == mtimes  # finished chunks untouched
    r = report["settings"][0]
    assert (r["chunks_drawn"], r["chunks_reused"]) == (2, 2) and r["images_per_s"] > 0
    assert np.array_equal(images_of(chunks(run, "part", setting)), images_of(ref))  # bit for bit
    assert r["metrics"] == full["settings"][0]["metrics"] and json.loads(path.read_text())["n"] == 10
    z = np.load(ref[2])
    assert int(z["seed"]) == chunk_seed(0, 2) and z["labels"].tolist() == [6, 7, 8]  # balanced: i % 10

    calls = counting(monkeypatch)  # a chunk deleted, another damaged: only those two are drawn again
    ref[1].unlink()
    ref[3].write_bytes(b"not a npz")
    eval_generator(run.joinpath(*CKPT), run, "full", **opts)
    assert calls == [chunk_seed(0, 1), chunk_seed(0, 3)]
    assert np.array_equal(images_of(chunks(run, "full", setting)), images_of(chunks(run, "part", setting)))

    calls = counting(monkeypatch)  # another seed changes every chunk's key: all are drawn again
    eval_generator(run.joinpath(*CKPT), run, "full", **{**opts, "seed": 1})
    assert calls == [chunk_seed(1, i) for i in range(4)]


def test_a_sweep_scores_every_setting_and_reports_the_best_by_direction(tiny_runs):
    run, ckpt_tok = tiny_runs
    sweep = {"cfgs": [1.0, 3.0], "top_ks": [0, 5], "schedules": ["constant"]}
    report, path = eval_generator(run.joinpath(*CKPT), run, "sweep", n=10, chunk=5, batch_size=5,
                                  metrics=["shapes_checker", "toy-brightness"], sweep_opts=sweep, progress=False)
    saved = json.loads(path.read_text())
    assert path == run / "eval" / "sweep.json" and KEYS <= set(saved) and saved["kind"] == "generator"
    assert saved["step"] == 2 and saved["n"] == 10 and saved["run"] == str(run)
    got = [(s["setting"]["cfg"], s["setting"]["top_k"]) for s in saved["settings"]]
    assert got == [(1.0, 0), (1.0, 5), (3.0, 0), (3.0, 5)]  # the Cartesian product, in option order
    for s in saved["settings"]:
        assert set(s["setting"]) == {"cfg", "schedule", "temperature", "top_k", "top_p"}
        assert s["n"] == 10 and s["images_per_s"] > 0 and set(s["metrics"]) == {"class_acc", "brightness"}
    assert saved["directions"] == {"class_acc": "max"}  # brightness declares no direction: not ranked
    accs = [s["metrics"]["class_acc"] for s in saved["settings"]]
    assert saved["best"]["class_acc"]["value"] == max(accs)
    assert saved["best"]["class_acc"]["setting"] == saved["settings"][accs.index(max(accs))]["setting"]
    # the images differ between settings (cfg and top-k change the draws)
    a, b = (images_of(chunks(run, "sweep", s["id"])) for s in saved["settings"][:2])
    assert not np.array_equal(a, b)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run / "tb" / "eval"), size_guidance={"scalars": 0, "images": 0})
    ev.Reload()
    best = ev.Scalars("eval/sweep/best/class_acc")
    assert [(e.step, e.value) for e in best] == [(2, pytest.approx(max(accs)))]
    assert any(t.startswith("eval/sweep/best/") for t in ev.Tags()["images"])


def test_the_best_setting_follows_each_metrics_direction():
    results = [{"setting": {"cfg": c}, "metrics": m} for c, m in
               [(1, {"fid": 30.0, "recall": 0.6, "fid_n_ref": 100.0}), (2, {"fid": 20.0, "recall": 0.5}),
                (4, {"fid": math.nan, "recall": 0.4}), (8, {"fid": 25.0, "recall": 0.6})]]
    best = best_per_metric(results, {"fid": "min", "recall": "max"})
    assert best == {"fid": {"value": 20.0, "setting": {"cfg": 2}},
                    "recall": {"value": 0.6, "setting": {"cfg": 1}}}  # NaN never wins; first of a tie


def arlab(capsys, *args: str) -> tuple[int, str, str]:
    """``arlab ARGS`` in this process: (exit code, stdout, stderr)."""
    from arlab.cli import main

    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse refusing an option value
        rc = int(e.code or 0)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("args, message", [
    (["RUN", "--cfg", "1,-2"], "argument --cfg: must be >= 0, got -2"),
    (["RUN", "--cfg", "1,,2"], "argument --cfg: '1,,2' has an empty item"),
    (["RUN", "--top-p", "0.9,1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
    (["RUN", "--top-k", "a"], "argument --top-k: 'a' is not an integer"),
    (["RUN", "--cfg-schedule", "constant,linar"], "CFG schedule 'linar' does not exist"),
    (["RUN", "--metrics", "fidd"], "Did you mean 'fid'"),
    (["TOK", "--cfg", "2"], "--cfg applies to generator runs; "),
    (["RUN", "--split", "test"], "--split applies to tokenizer runs and --images"),
    (["RUN", "--out", "x.json"], "--out applies to --images/--reference"),
    (["--images", "a.npz"], "--images A needs --reference B"),
    (["--images", "a.npz", "--reference", "b.npz", "--cfg", "2"], "--cfg applies to runs"),
    ([], "nothing to evaluate"),
    (["nowhere"], "'nowhere' does not exist"),
    (["RUN", "--best-of", "nosuch"], "--best-of nosuch: no report"),
    (["RUN", "--best-of", "bestof-src"], "has no FID metric; name one"),
    (["RUN", "--best-of", "bestof-src:recall"], "has no best setting for 'recall' (metrics: class_acc)"),
    (["RUN", "--best-of", "bestof-src:class_acc", "--cfg", "2"], "drop --cfg"),
])
def test_bad_options_give_one_line_errors(tiny_runs, capsys, args, message):
    run, tok = tiny_runs
    write_best_report(run)
    args = [str(run) if a == "RUN" else str(tok) if a == "TOK" else a for a in args]
    rc, _, err = arlab(capsys, "eval", *args, "--quiet")
    assert rc == 2, err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err, err


def test_metrics_list_names_every_registered_metric_and_preset(capsys):
    from arlab import registry
    from arlab.config import presets

    rc, out, err = arlab(capsys, "eval", "--metrics", "list")
    assert rc == 0, err
    for name in [*registry.names("metric"), *presets("metric"), "toy_brightness", "shapes"]:
        assert f"  {name} " in out, name


def test_every_eval_suite_names_existing_metrics_and_features():
    import yaml

    from arlab.config import presets, resolve_node
    from arlab.evaluation.suites import SUITES, metric_config, suite_for

    assert presets(SUITES), "no eval suite in registry/eval-suite"
    for name, path in presets(SUITES).items():
        body = yaml.safe_load(path.read_text())
        assert set(body) == {"datasets", "metrics", "features"}, path
        for metric in body["metrics"]:
            metric_config(metric, where=str(path))  # raises naming the file when unknown
        resolve_node("features", body["features"], source=str(path))
        assert suite_for(f"{body['datasets'][0]}-32px")["name"] == name
    assert suite_for("imagenet") is None


def write_best_report(run: Path) -> dict:
    """A sweep report whose class_acc is best at a setting no default would pick (cfg 3, top-k 5, T 0.7)."""
    best = {"cfg": 3.0, "schedule": "constant", "temperature": 0.7, "top_k": 5, "top_p": 1.0}
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "bestof-src.json").write_text(json.dumps({"best": {"class_acc": {"value": 0.9, "setting": best}}}))
    return best


def test_best_of_redraws_the_best_setting_of_an_earlier_report(tiny_runs, capsys):
    """``--best-of NAME:METRIC`` draws exactly the setting the earlier report ranked best for METRIC."""
    run, _ = tiny_runs
    best = write_best_report(run)
    rc, out, err = arlab(capsys, "eval", str(run), "--n", "4", "--chunk", "4", "--batch-size", "4", "--name",
                         "bestof", "--best-of", "bestof-src:class_acc", "--metrics", "shapes_checker", "--quiet")
    assert rc == 0, err
    saved = json.loads((run / "eval" / "bestof.json").read_text())
    assert [s["setting"] for s in saved["settings"]] == [best]
