"""``arlab eval`` of a tokenizer run: PSNR / SSIM against hand computations and an independent SSIM,
codebook usage, rFID, and the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from arlab.config import build
from arlab.evaluation import tokenizer as evaltok
from arlab.evaluation.tokenizer import eval_tokenizer, from_uint8, reconstruction_scores
from arlab.metric.reference import split_images
from arlab.tokenizer.load import load_tokenizer

from .test_eval_generator import KEYS


def images(n: int = 4, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.rand(n, 3, 1, 1, generator=g) * torch.linspace(0, 1, size).view(1, 1, 1, size)
    return (base + 0.3 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1) * 2 - 1  # [-1, 1]


def test_psnr_and_ssim_match_hand_computations():
    x = images()
    p, s = reconstruction_scores(x, x)
    assert torch.allclose(s, torch.ones(4), atol=1e-6) and torch.all(p >= 99.9)  # SSIM(x, x) = 1
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    ssims = []
    for sigma in (0.02, 0.05, 0.1, 0.2):
        y = x + sigma * noise
        p, s = reconstruction_scores(x, y)
        mse = ((x - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)  # in [0, 1] units, data range 1
        assert torch.allclose(p, 10 * torch.log10(1 / mse), atol=1e-3)
        ssims.append(s.mean().item())
    assert ssims == sorted(ssims, reverse=True) and ssims[-1] < 0.9  # decreases with noise

    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim

    y = (x + 0.1 * noise).clamp(-1, 1)
    _, full = tm_ssim((y + 1) / 2, (x + 1) / 2, gaussian_kernel=True, sigma=1.5, data_range=1.0, reduction="none",
                      return_full_image=True)  # an independent implementation (window 11 from sigma 1.5)
    ref = full[..., 5:-5, 5:-5].flatten(1).mean(1)  # its borders come from reflect padding: Wang et al. use 'valid'
    assert torch.allclose(reconstruction_scores(x, y)[1], ref.float(), atol=1e-5)


def test_tokenizer_eval_reports_reconstruction_metrics(tiny_runs, tiny_classifier, monkeypatch):
    _, ckpt = tiny_runs
    run = ckpt.parent.parent
    net = {"type": "classifier", "checkpoint": str(tiny_classifier[0]), "device": "cpu"}
    report, path = eval_tokenizer(ckpt, run, "rec", step=2, n=24, features=net, batch_size=10, tensorboard=False)
    saved = json.loads(path.read_text())
    assert KEYS <= set(saved) and saved["kind"] == "tokenizer" and saved["n"] == 24 and saved["split"] == "test"
    m = saved["settings"][0]["metrics"]
    assert saved["directions"] == {"psnr": "max", "ssim": "max", "usage": "max", "perplexity": "max", "rfid": "min"}
    assert saved["best"]["psnr"]["value"] == m["psnr"] and m["rfid"] >= 0

    tok = load_tokenizer(ckpt)  # by hand: the first 24 test images, reconstructed, float64 PSNR per image
    dm = build("data", tok.source_experiment["data"], seed=0)
    dm.setup()
    x_u8 = next(split_images(dm, "test", 32, 24))[0]
    with torch.no_grad():
        rec, q = tok(from_uint8(x_u8))
    rec01 = (rec.double().clamp(-1, 1) + 1) / 2
    mse = ((rec01 - torch.from_numpy(x_u8).permute(0, 3, 1, 2).double() / 255) ** 2).flatten(1).mean(1)
    assert m["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), abs=1e-3)
    used = np.unique(q.indices.numpy())
    assert m["usage"] == pytest.approx(len(used) / tok.codebook_size)

    monkeypatch.setattr(evaltok, "suite_for", lambda name: {"features": {"type": "classifier",
                                                                         "checkpoint": "/nonexistent.ckpt"}})
    report, _ = eval_tokenizer(ckpt, run, "rec2", step=2, n=8, tensorboard=False)
    assert "rfid" not in report["settings"][0]["metrics"] and "does not exist" in report["skipped"]["rfid"]
