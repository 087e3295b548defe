"""tokenizer/vqgan and task/tokenizer: presets, config errors, training, checkpoints, token shards."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from arlab.config import build, load_experiment, presets
from arlab.data.shards import iter_shard, read_manifest
from arlab.data.tokenize import read_tokens, tokenize_shards
from arlab.errors import ConfigError, DataError
from arlab.tokenizer.load import load_tokenizer
from arlab.train import fit
from tests.conftest import pinned_threads

SMALL = [n for n in presets("tokenizer") if not n.startswith("llamagen")]


def write_exp(tmp_path: Path, name: str, body: dict) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


def tiny_exp(tmp_path: Path, tokenizer: dict, steps: int, run: str) -> dict:
    return {
        "data": {"preset": "shapes-tiny", "num_workers": 0, "batch_size": 32},
        "tokenizer": tokenizer,
        "task": {"type": "tokenizer", "lr": 2e-3, "warmup_steps": 10, "rec_loss": "l2",
                 "log_images_every_n_steps": 20, "usage_window": 10},
        "trainer": {"max_steps": steps, "val_check_interval": steps, "check_val_every_n_epoch": None,
                    "limit_val_batches": 2, "checkpoint_every_n_steps": steps, "enable_progress_bar": False,
                    "log_every_n_steps": 5},
        "run": {"dir": str(tmp_path / run)},
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, arlab_cache):
    """A tiny FSQ tokenizer trained 40 steps on shapes-tiny (shared by the tests below).

    Measured over run.seed 0-2 x 1 and 2 threads: train/rec ratio (last 2 logs / first 2) 0.36-0.66,
    val PSNR 14.7-15.6 dB, val usage 0.06-0.24; the test's bounds are 0.8, 12 dB and > 0.
    """
    tmp = tmp_path_factory.mktemp("tok")
    body = tiny_exp(tmp, {"preset": "shapes-fsq", "autoencoder": "tiny"}, 40, "run")
    exp = load_experiment(write_exp(tmp, "fsq", body))
    with pinned_threads():
        metrics = fit(exp)
    return tmp, exp, metrics


@pytest.mark.parametrize("name", SMALL)
def test_every_small_tokenizer_preset_round_trips(name):
    tok = build("tokenizer", name).eval()
    s = tok.cfg.image_size
    x = torch.rand(2, 3, s, s) * 2 - 1
    xrec, q = tok(x)
    assert xrec.shape == x.shape
    idx = q.indices
    maps = idx if isinstance(idx, list) else [idx]
    assert [tuple(m.shape) for m in maps] == [(2, p, p) for p in tok.scales]
    assert all(int(m.min()) >= 0 and int(m.max()) < tok.codebook_size for m in maps)
    flat = tok.flatten_indices(idx)
    assert flat.shape == (2, tok.tokens_per_image)
    back = tok.unflatten_indices(flat)
    assert all(torch.equal(a, b) for a, b in zip(back if isinstance(back, list) else [back], maps))
    assert torch.allclose(tok.detokenize(idx), xrec, atol=1e-5)


@pytest.mark.parametrize("overrides,pattern", [
    (["tokenizer.image_size=30", "data.image_size=30"],
     r"tokenizer.image_size=30 is not divisible by the autoencoder's downsampling factor 4"),
    (["tokenizer.quantizer.patch_nums=[1,2,4]"], r"patch_nums \[1, 2, 4\] ends at 4 but latent_size is 8"),
    (["tokenizer.quantizer.patch_nums=[1,2,4]", "tokenizer.quantizer.latent_size=0", "tokenizer.quantizer.phi_k=1"],
     r"patch_nums=\[1, 2, 4\]: the last scale must equal the latent size 8 \(image_size 32 / downsampling 4\)"),
    (["data.image_size=64"], r"data.image_size=64 but tokenizer.image_size=32"),
])
def test_impossible_tokenizer_configs_stop_before_work(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_experiment("shapes/tokenizer-msvq", overrides)


def test_training_lowers_loss_and_writes_a_run(trained):
    tmp, exp, metrics = trained
    run = Path(exp.run.dir)
    assert (run / "config.yaml").exists() and (run / "checkpoints" / "last.ckpt").exists()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["train/steps"] == 40 and saved["val/psnr"] > 12 and 0 < saved["val/usage"] <= 1
    assert list((run / "tb").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    ev.Reload()
    assert {"train/rec", "val/psnr", "val/ssim", "val/usage", "perf/train_images_per_s"} <= set(ev.Tags()["scalars"])
    assert "val/reconstructions" in ev.Tags()["images"]
    rec = [e.value for e in ev.Scalars("train/rec")]
    assert np.mean(rec[-2:]) < 0.8 * np.mean(rec[:2]), rec  # measured 0.36-0.66 (fixture)


def test_a_run_that_ends_between_validations_keeps_its_training_scalars(tmp_path, arlab_cache):
    """max_steps not a multiple of val_check_interval: arlab validates once more at the last step, and
    metrics.json keeps the training scalars (train/*, perf/*) beside that validation's (a trainer.validate()
    resets Lightning's callback_metrics; the 850-step quickstart trials lost perf/train_images_per_s to it), and
    its periodic checkpoints do not print Lightning's manual-optimisation code example."""
    body = tiny_exp(tmp_path, {"preset": "shapes-fsq", "autoencoder": "tiny"}, 12, "run")
    body["trainer"].update(val_check_interval=8, checkpoint_every_n_steps=8)
    with pinned_threads(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = fit(load_experiment(write_exp(tmp_path, "fsq", body)))
    # the periodic checkpoint at step 8 of this manual-optimisation task: no Lightning code example on the console
    assert not [w for w in caught if "manual optimization" in str(w.message)]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["train/steps"] == 12
    for key in ("train/rec", "train/loss", "perf/train_images_per_s", "val/psnr", "val/usage"):
        assert key in saved and key in metrics, key
    assert saved["perf/train_images_per_s"] > 0


def test_checkpoint_reload_gives_the_same_tokenizer(trained):
    tmp, exp, _ = trained
    ckpt = Path(exp.run.dir) / "checkpoints" / "last.ckpt"
    tok = load_tokenizer(ckpt)
    from arlab.task.tokenizer import TokenizerModule

    module = TokenizerModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(tok(x)[0], module.tokenizer(x)[0])


def test_wrong_checkpoint_kind_is_refused(tmp_path):
    fake = tmp_path / "gen.ckpt"
    torch.save({"hyper_parameters": {"experiment": {"task": {"type": "generator"}}}, "state_dict": {}}, fake)
    with pytest.raises(ConfigError, match=r"is not a tokenizer checkpoint \(its task is 'generator'\)"):
        load_tokenizer(fake)
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.ckpt")


def test_tokenize_then_decode_reproduces_reconstructions(trained, tmp_path):
    _, exp, _ = trained
    ckpt = Path(exp.run.dir) / "checkpoints" / "last.ckpt"
    dm = exp.build("data", seed=0)
    dm.setup()
    out = tmp_path / "tokens"
    m = tokenize_shards(ckpt, dm.root, out, splits=["test"], flip=True, batch_size=64, progress=False)
    n = read_manifest(dm.root)["splits"]["test"]["count"]
    assert m["kind"] == "tokens" and m["splits"]["test"]["count"] == 2 * n
    assert m["tokenizer"]["vocab_size"] == 1000 and m["tokenizer"]["tokens_per_image"] == 256
    assert sum(m["splits"]["test"]["per_class"].values()) == 2 * n
    tok = load_tokenizer(ckpt)
    src = {s["__key__"]: s for shard in read_manifest(dm.root)["splits"]["test"]["shards"]
           for s in iter_shard(dm.root / shard["name"])}
    from arlab.data.datamodule import ImageDecoder, collate_images

    dec = ImageDecoder(32, 0.0, 0)
    checked = 0
    for shard in m["splits"]["test"]["shards"][:1]:
        samples = list(iter_shard(out / shard["name"]))
        plain = [s for s in samples if not s["__key__"].endswith("_f")][:16]
        tokens = torch.from_numpy(np.stack([read_tokens(s) for s in plain]).astype(np.int64))
        x = collate_images([dec(src[s["__key__"]], 0) for s in plain])["image"]
        with torch.no_grad():
            ref = tok(x)[0]
            got = tok.detokenize(tok.unflatten_indices(tokens))
        assert torch.allclose(got, ref, atol=1e-5)
        assert [int(s["cls"]) for s in plain] == [int(src[s["__key__"]]["cls"]) for s in plain]
        flipped = {s["__key__"] for s in samples if s["__key__"].endswith("_f")}
        assert {k + "_f" for k in (s["__key__"] for s in plain)} <= flipped
        checked += len(plain)
    assert checked == 16
    with pytest.raises(DataError, match="already holds a dataset.json"):
        tokenize_shards(ckpt, dm.root, out, splits=["test"], progress=False)


def test_tokenize_skips_corrupt_images_and_a_crash_leaves_no_manifest(trained, tmp_path, monkeypatch):
    from tests.conftest import make_image_shards

    _, exp, _ = trained
    ckpt = Path(exp.run.dir) / "checkpoints" / "last.ckpt"
    src = tmp_path / "src"
    make_image_shards(src, [20, 20], size=32, corrupt_keys=("k000004", "k000030"))
    m = tokenize_shards(ckpt, src, tmp_path / "ok", batch_size=8, progress=False)
    assert m["splits"]["train"]["count"] == 38 and len(m["corrupt"]) == 2
    assert all("k000004" not in s["__key__"] for sh in m["splits"]["train"]["shards"]
               for s in iter_shard(tmp_path / "ok" / sh["name"]))

    from arlab.tokenizer import vqgan

    calls = {"n": 0}
    real = vqgan.VQGANTokenizer.tokenize

    def flaky(self, x):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(self, x)

    monkeypatch.setattr(vqgan.VQGANTokenizer, "tokenize", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tokenize_shards(ckpt, src, tmp_path / "crash", batch_size=8, shard_size=10, progress=False)
    assert not (tmp_path / "crash" / "dataset.json").exists()
    assert not list((tmp_path / "crash").rglob("*.tmp"))
    with pytest.raises(DataError, match="no dataset.json"):
        read_manifest(tmp_path / "crash")


def test_gan_and_perceptual_terms_join_at_disc_start(tmp_path, arlab_cache):
    body = tiny_exp(tmp_path, {"preset": "shapes-vq", "autoencoder": "tiny"}, 6, "gan")
    body["task"].update({"disc_weight": 0.5, "disc_start": 3, "perceptual_weight": 0.1,
                         "perceptual_network": "random", "log_images_every_n_steps": 0})
    body["trainer"]["limit_val_batches"] = 1
    exp = load_experiment(write_exp(tmp_path, "gan", body))
    from arlab.task.tokenizer import TokenizerModule

    module = TokenizerModule(exp.config("task"), experiment=exp.tree)
    d0 = [p.detach().clone() for p in module.disc.parameters()]
    snapshots = {}

    import pytorch_lightning as pl

    class Snap(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots[trainer.global_step] = [p.detach().clone() for p in pl_module.disc.parameters()]

    from arlab.train import build_trainer

    trainer = build_trainer(exp, tmp_path / "gan", callbacks=[Snap()])
    trainer.fit(module, datamodule=exp.build("data", seed=0))
    assert all(torch.equal(a, b) for a, b in zip(d0, snapshots[3]))  # steps 0-2: D untouched
    assert any(not torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[6]))  # from disc_start on
    assert {"train/d_loss", "train/g_adv", "train/perceptual"} <= set(trainer.callback_metrics)
    assert not any(k.startswith("perceptual") for k in module.state_dict())  # frozen net not checkpointed


# preset, LR warm-up steps, least usage of windows 2-4, least usage of the last window. Least measured
# (run.seed x 1 and 2 threads, see the docstring), windows 2-4 / last: vq 0.994 / 1.0, msvq 0.977 / 0.993,
# fsq 0.597 / 0.652 (the report's machine: 0.624 / 0.778).
USAGE_CASES = [("shapes-vq", 50, 0.9, 0.9), ("shapes-fsq", 10, 0.4, 0.5), ("shapes-msvq", 10, 0.9, 0.9)]


@pytest.mark.parametrize("preset,warmup,min_usage,min_final", USAGE_CASES, ids=[c[0] for c in USAGE_CASES])
def test_a_few_hundred_steps_lower_the_loss_and_keep_usage_high(tmp_path, arlab_cache, train_threads, preset, warmup,
                                                                min_usage, min_final):
    """200 steps of batch 16: the loss falls, and codebook usage over 50-step windows never collapses.

    Usage per window counts the codes chosen by 51,200 tokens. Without dead-code restarts the
    VQ and multi-scale presets fall to 0.2% and 0.5% of their codes within 100 steps (measured);
    FSQ has no dead codes to restart and grows into its grid, but how far it gets in 200 steps is
    a property of the trajectory, not of the code.

    The trajectory is chaotic: a change in the last bit of one step (another thread count, or
    another CPU whose oneDNN/MKL/ATen kernels round differently) moves it as far as another seed.
    Threads are pinned (``train_threads``: one machine repeats bit for bit), and the thresholds
    come from run.seed 0-3 x 1 and 2 threads (vq: seeds 0-3 at 2, 0-2 at 1 thread; msvq: 0-2 x 1, 2)
    on a 2-core Xeon (AVX-512), torch 2.14.1, about 1 min a case there (3 min when the cores are
    shared by other work). Measured min-max:

    * FSQ usage by window: 0.30-0.61, 0.60-0.81, 0.65-0.90, 0.65-0.96. Seed 0 at 2 threads goes
      0.48 -> 0.93; the same run ends at 0.79-0.86 with AVX2 kernels (ATen, oneDNN or MKL forced
      to AVX2 on its own) and at 0.81 with 4 threads; the report's machine: 0.50 -> 0.78. So:
      windows 2-4 >= 0.4 and the last >= 0.5 (not 0.8); a collapsing encoder (usage near 0.1)
      fails both.
    * VQ / MSVQ usage: >= 0.977 from window 2 on; bound 0.9 (collapse: 0.2% / 0.5%).
    * loss ratio (mean of the last 4 logged train/rec over the first 4): vq 0.28-0.45, fsq
      0.32-0.40, msvq 0.34-0.41; bound 0.6 (the collapsed VQ runs below: 1.13 and 0.67).
    * val PSNR 15.9-18.0 dB (bound 14.5; untrained about 11 dB); val usage 0.26-0.92 (bound 0.15).

    VQ takes a 50-step warm-up (the shapes experiments use 100): with 10 steps, seed 2 collapsed
    its l2-normalised encoder at both thread counts (1-2 codes per batch from step 15 on, loss
    ratio 1.13 and 0.67, PSNR 12.6 and 14.7 dB) while restarts kept its window usage at 0.69-1.0,
    and seed 3 reached only 0.54; with 50 steps every seed trains.
    """
    body = tiny_exp(tmp_path, preset, 200, preset)
    body["data"]["batch_size"] = 16
    body["task"].update({"lr": 2e-3, "warmup_steps": warmup, "usage_window": 50, "log_images_every_n_steps": 0})
    body["trainer"]["limit_val_batches"] = 4
    exp = load_experiment(write_exp(tmp_path, preset, body))
    metrics = fit(exp)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(Path(exp.run.dir) / "tb"), size_guidance={"scalars": 0})
    ev.Reload()
    rec = [e.value for e in ev.Scalars("train/rec")]
    assert np.mean(rec[-4:]) < 0.6 * np.mean(rec[:4]), rec
    usage = ev.Scalars("train/usage")
    assert [e.step for e in usage] == [49, 99, 149, 199]  # one value per window, at its last step
    values = [e.value for e in usage]
    assert min(values[1:]) >= min_usage and values[-1] >= min_final, values
    assert metrics["train/usage"] == pytest.approx(values[-1])
    # an untrained autoencoder scores about 11 dB here; 200 steps give 15.9-18.0 dB (see above)
    assert metrics["val/usage"] >= 0.15 and metrics["val/psnr"] > 14.5, metrics


def test_bf16_autocast_training_keeps_the_quantizer_in_float32(tmp_path, arlab_cache, train_threads):
    """trainer.precision=bf16-mixed (shapes/tokenizer-quick, the quickstart's tokenizer) on a CPU: the encoder runs
    in bf16, the FSQ quantizer computes its indices in float32 (the same indices as a float32 call on the same
    latents), and training still lowers the loss.

    Measured over run.seed 0-2 x 1 and 2 threads: train/rec ratio (last 2 logs / first 2) 0.47-0.70; bound 0.85.
    """
    body = tiny_exp(tmp_path, {"preset": "shapes-fsq", "autoencoder": "tiny"}, 30, "bf16")
    body["trainer"]["precision"] = "bf16-mixed"
    body["task"]["log_images_every_n_steps"] = 0
    exp = load_experiment(write_exp(tmp_path, "bf16", body))
    from arlab.task.tokenizer import TokenizerModule
    from arlab.train import build_trainer

    module = TokenizerModule(exp.config("task"), experiment=exp.tree)
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.dtype]] = []

    def hook(mod, args, out):
        if mod.training:
            seen.append((args[0].detach().clone(), out.indices.clone(), out.zq_bdhw.dtype))

    quantizer = module.tokenizer.quantizer
    handle = quantizer.register_forward_hook(hook)
    trainer = build_trainer(exp, tmp_path / "bf16")
    trainer.fit(module, datamodule=exp.build("data", seed=0))
    handle.remove()
    assert len(seen) == 30
    assert all(z.dtype == torch.bfloat16 and zq == torch.bfloat16 for z, _, zq in seen)  # autocast was on
    with torch.no_grad():
        for z, idx, _ in seen[::10]:
            assert torch.equal(quantizer(z.float()).indices, idx)  # indices computed in float32
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(tmp_path / "bf16" / "tb"), size_guidance={"scalars": 0})
    ev.Reload()
    rec = [e.value for e in ev.Scalars("train/rec")]
    assert all(np.isfinite(rec)) and np.mean(rec[-2:]) < 0.85 * np.mean(rec[:2]), rec  # measured 0.47-0.70
