"""quantizer/vq: nearest-code assignment, losses and gradients, EMA, dead-code restarts, fp32, DDP."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from arlab.config import build
from arlab.errors import ConfigError
from arlab.quantizer import vq as vq_module
from arlab.quantizer.base import exact_fp32_matmul
from arlab.quantizer.vq import VectorQuantizer

REPO = Path(__file__).resolve().parents[2]


def make(**kw) -> VectorQuantizer:
    kw.setdefault("codebook_size", 64)
    kw.setdefault("code_dim", 4)
    return VectorQuantizer(VectorQuantizer.Config(**kw))


def to_nd(z_bdhw: torch.Tensor) -> torch.Tensor:
    return z_bdhw.permute(0, 2, 3, 1).reshape(-1, z_bdhw.shape[1])


def brute_force(z_bdhw: torch.Tensor, e_kd: torch.Tensor, l2: bool) -> torch.Tensor:
    """argmin over an explicit (N, K) matrix of squared distances, in float64."""
    z = to_nd(z_bdhw).double()
    e = e_kd.double()
    if l2:
        z, e = F.normalize(z, dim=1), F.normalize(e, dim=1)
    dist_nk = ((z[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    b, _, h, w = z_bdhw.shape
    return dist_nk.argmin(1).view(b, h, w)


def set_codebook(q: VectorQuantizer, e_kd: torch.Tensor) -> None:
    with torch.no_grad():
        q.embedding.weight.copy_(e_kd)
        if q.cfg.ema:  # keep the EMA statistics consistent with the new vectors
            q.embed_avg.copy_(e_kd)
            q.cluster_size.fill_(1.0)


# ----------------------------------------------------------------------------- assignment


@pytest.mark.parametrize("l2", [False, True])
def test_assignment_is_the_brute_force_argmin(l2):
    q = make(codebook_size=100, code_dim=6, l2_norm=l2).eval()
    set_codebook(q, torch.randn(100, 6))  # spread-out codes, so many are chosen
    z = torch.randn(3, 6, 8, 8)
    out = q(z)
    expect = brute_force(z, q.embedding.weight.detach(), l2)
    assert out.indices.dtype == torch.int64 and out.indices.shape == (3, 8, 8)
    assert torch.equal(out.indices, expect)
    assert len(out.indices.unique()) > 30


def test_chunked_assignment_matches(monkeypatch):
    q = make(codebook_size=50, code_dim=3, l2_norm=False).eval()
    set_codebook(q, torch.randn(50, 3))
    z = torch.randn(2, 3, 7, 9)
    whole = q(z).indices
    monkeypatch.setattr(vq_module, "CHUNK_ELEMS", 50 * 5)  # 5 rows per chunk, 126 rows: 26 chunks
    assert torch.equal(q(z).indices, whole)
    assert torch.equal(whole, brute_force(z, q.embedding.weight.detach(), False))


def test_l2_norm_codebook_init_and_decode():
    q = make(codebook_size=32, code_dim=8, l2_norm=True).eval()
    w = q.embedding.weight.detach()
    torch.testing.assert_close(w.norm(dim=1), torch.ones(32))  # LlamaGen: uniform(-1/K, 1/K) then normalised
    z = torch.randn(2, 8, 4, 4) * 5
    out = q(z)
    torch.testing.assert_close(out.zq_bdhw.norm(dim=1), torch.ones(2, 4, 4))
    torch.testing.assert_close(q.decode_indices(out.indices), out.zq_bdhw, rtol=0, atol=1e-6)
    raw = make(codebook_size=32, code_dim=8, l2_norm=False)
    assert raw.embedding.weight.abs().max() <= 1 / 32


@pytest.mark.parametrize("ema", [False, True])
def test_decode_indices_equals_zq_in_eval(ema):
    q = make(codebook_size=16, code_dim=4, l2_norm=False, ema=ema).eval()
    set_codebook(q, torch.randn(16, 4))
    z = torch.randn(2, 4, 5, 3)
    out = q(z)
    decoded = q.decode_indices(out.indices)
    assert decoded.shape == z.shape
    torch.testing.assert_close(decoded, out.zq_bdhw, rtol=0, atol=1e-6)
    torch.testing.assert_close(decoded, q.embedding.weight.detach()[out.indices].permute(0, 3, 1, 2))


# ----------------------------------------------------------------------------- losses and gradients


def test_losses_by_hand():
    beta = 0.3
    q = make(codebook_size=16, code_dim=4, l2_norm=False, beta=beta).eval()
    set_codebook(q, torch.randn(16, 4))
    z = torch.randn(2, 4, 3, 3)
    out = q(z)
    e_bdhw = q.embedding.weight.detach()[out.indices].permute(0, 3, 1, 2)
    mse = ((e_bdhw - z) ** 2).mean()
    torch.testing.assert_close(out.losses["commit"], mse)
    torch.testing.assert_close(out.losses["codebook"], mse)
    assert out.losses["entropy"].item() == 0.0
    torch.testing.assert_close(out.loss, mse + beta * mse)


def test_losses_use_the_normalised_z_with_l2_norm():
    q = make(codebook_size=16, code_dim=4, l2_norm=True).eval()
    z = torch.randn(2, 4, 3, 3) * 3
    out = q(z)
    zn = F.normalize(z, dim=1)
    e_bdhw = F.normalize(q.embedding.weight.detach(), dim=1)[out.indices].permute(0, 3, 1, 2)
    mse = ((e_bdhw - zn) ** 2).mean()
    torch.testing.assert_close(out.losses["commit"], mse)
    torch.testing.assert_close(out.loss, mse + 0.25 * mse)


def test_entropy_loss_by_hand():
    t, wgt = 0.5, 0.1
    q = make(codebook_size=8, code_dim=3, l2_norm=False, entropy_weight=wgt, entropy_temperature=t).eval()
    set_codebook(q, torch.randn(8, 3))
    z = torch.randn(2, 3, 4, 4)
    out = q(z)
    e = q.embedding.weight.detach()
    dist = ((to_nd(z)[:, None, :] - e[None]) ** 2).sum(-1)
    p = torch.softmax(-dist / t, dim=1)
    sample_h = -(p * torch.log(p)).sum(1).mean()
    avg = p.mean(0)
    avg_h = -(avg * torch.log(avg + 1e-5)).sum()
    torch.testing.assert_close(out.losses["entropy"], sample_h - avg_h, rtol=1e-4, atol=1e-5)
    expect = out.losses["codebook"] + 0.25 * out.losses["commit"] + wgt * out.losses["entropy"]
    torch.testing.assert_close(out.loss, expect)


@pytest.mark.parametrize("l2", [False, True])
def test_straight_through_gradient_reaches_the_encoder(l2):
    q = make(codebook_size=16, code_dim=4, l2_norm=l2)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    g = torch.randn(2, 4, 3, 3)
    (q(z).zq_bdhw * g).sum().backward()
    z_ref = z.detach().clone().requires_grad_(True)  # identity (or the normalisation) is what the STE sees
    ((F.normalize(z_ref, dim=1) if l2 else z_ref) * g).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad)
    assert q.embedding.weight.grad is None or q.embedding.weight.grad.abs().sum() == 0


def test_codebook_gets_the_codebook_loss_gradient():
    q = make(codebook_size=16, code_dim=4, l2_norm=False)
    set_codebook(q, torch.randn(16, 4))
    z = torch.randn(2, 4, 3, 3)
    out = q(z)
    out.losses["codebook"].backward()
    grad = q.embedding.weight.grad
    e = q.embedding.weight.detach()
    idx, zn = out.indices.reshape(-1), to_nd(z)
    expect = torch.zeros_like(e).index_add_(0, idx, 2 * (e[idx] - zn) / zn.numel())
    torch.testing.assert_close(grad, expect)
    unused = torch.ones(16, dtype=torch.bool)
    unused[idx] = False
    assert unused.any() and grad[unused].abs().sum() == 0 and grad[~unused].abs().sum() > 0


def test_commitment_gradient_reaches_the_encoder_not_the_codebook():
    q = make(codebook_size=16, code_dim=4, l2_norm=False, beta=0.25)
    set_codebook(q, torch.randn(16, 4))
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    (0.25 * out.losses["commit"]).backward()
    e_bdhw = q.embedding.weight.detach()[out.indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z.detach() - e_bdhw) / z.numel())
    assert q.embedding.weight.grad is None or q.embedding.weight.grad.abs().sum() == 0


# ----------------------------------------------------------------------------- EMA


def test_ema_update_by_hand():
    g, eps = 0.9, 1e-5
    q = make(codebook_size=4, code_dim=2, l2_norm=False, ema=True, ema_decay=g, ema_eps=eps,
             restart_dead=False)
    assert not q.embedding.weight.requires_grad
    e0 = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    set_codebook(q, e0)
    pts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [9.0, 1.0]])  # 3 → code 0, 1 → code 1
    z = pts.t().reshape(1, 2, 1, 4)
    out = q.train()(z)
    assert out.indices.flatten().tolist() == [0, 0, 0, 1]
    assert out.losses["codebook"].item() == 0.0  # the EMA replaces the codebook loss

    counts = torch.tensor([3.0, 1.0, 0.0, 0.0])
    sums = torch.stack([pts[:3].sum(0), pts[3], torch.zeros(2), torch.zeros(2)])
    cs = g * torch.ones(4) + (1 - g) * counts
    avg = g * e0 + (1 - g) * sums
    n = cs.sum()
    smoothed = (cs + eps) / (n + 4 * eps) * n
    new = e0.clone()
    new[:2] = avg[:2] / smoothed[:2, None]
    w = q.embedding.weight.detach()
    torch.testing.assert_close(w, new)
    torch.testing.assert_close(q.cluster_size, cs)
    torch.testing.assert_close(q.embed_avg, avg)
    assert torch.equal(w[2:], e0[2:])  # unused codes keep their vectors exactly
    # direction: the used codes moved toward the mean of their assigned inputs
    for k, mean in [(0, pts[:3].mean(0)), (1, pts[3])]:
        assert (w[k] - mean).norm() < (e0[k] - mean).norm()
        cos = F.cosine_similarity(w[k] - e0[k], mean - e0[k], dim=0)
        assert cos > 0.999


def test_ema_converges_to_the_cluster_means():
    q = make(codebook_size=2, code_dim=2, l2_norm=False, ema=True, ema_decay=0.8, restart_dead=False).train()
    set_codebook(q, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    a = torch.tensor([[-3.0, 1.0], [-2.0, 1.0]])  # mean (-2.5, 1)
    b = torch.tensor([[2.0, -1.0], [4.0, -1.0]])  # mean (3, -1)
    z = torch.cat([a, b]).t().reshape(1, 2, 1, 4)
    for _ in range(100):
        q(z)
    torch.testing.assert_close(q.embedding.weight.detach(), torch.tensor([[-2.5, 1.0], [3.0, -1.0]]),
                               rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------- dead codes


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_are_restarted_from_recent_inputs(ema):
    k, d = 64, 4
    q = make(codebook_size=k, code_dim=d, l2_norm=False, ema=ema, restart_dead=True, dead_after=3,
             restart_buffer=256).train()
    e = torch.full((k, d), 100.0)  # far from the data: never selected ...
    e[0], e[1] = torch.tensor([1.0, 0, 0, 0]), torch.tensor([-1.0, 0, 0, 0])  # ... except these two
    set_codebook(q, e)
    fresh = torch.randn(4, d, 8, 8)
    before = q.eval()(fresh).indices.unique().numel()
    assert before == 2

    q.train()
    seen = []
    deads = []
    for _ in range(3):
        z = torch.randn(4, d, 8, 8)
        seen.append(to_nd(z))
        deads.append(q(z).stats["dead"].item())
    assert deads == [0, 0, k - 2]  # reported on the step that finds them (before restarting)
    seen = torch.cat(seen)
    w = q.embedding.weight.detach()
    replaced = (w != 100.0).all(1)
    assert replaced.sum() == k  # every dead code restarted
    # each restarted code is one of the encoder vectors seen recently
    for row in w[2:]:
        assert (seen - row).abs().max(1).values.min() < 1e-6
    assert w[2:].unique(dim=0).shape[0] == k - 2  # distinct picks
    assert torch.equal(q.steps_unused[2:], torch.zeros(k - 2, dtype=torch.int64))
    if ema:
        torch.testing.assert_close(q.embed_avg[2:], w[2:])
        assert torch.equal(q.cluster_size[2:], torch.ones(k - 2))

    after = q.eval()(fresh).indices.unique().numel()
    assert after > 20, (before, after)
    assert q(fresh).stats["dead"].item() == 0


def test_no_restart_when_disabled_but_dead_codes_are_counted():
    q = make(codebook_size=8, code_dim=2, l2_norm=False, restart_dead=False, dead_after=2).train()
    e = torch.full((8, 2), 100.0)
    e[0] = 0
    set_codebook(q, e)
    assert not hasattr(q, "recent_z")
    for _ in range(3):
        out = q(torch.randn(2, 2, 4, 4))
    assert out.stats["dead"].item() == 7
    assert torch.equal(q.embedding.weight.detach(), e)
    assert q.steps_unused.tolist() == [0] + [3] * 7


def test_eval_mode_never_changes_the_state():
    q = make(codebook_size=32, code_dim=4, l2_norm=True, ema=True, restart_dead=True, dead_after=1)
    q.train()(torch.randn(2, 4, 4, 4))  # fill the buffers a little
    q.eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    for _ in range(5):
        q(torch.randn(2, 4, 4, 4) * 3)
    after = q.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_training_updates_run_under_no_grad_and_keep_backward_valid():
    # restarts / EMA rewrite the codebook in place after the forward; backward must still work
    for ema in (False, True):
        q = make(codebook_size=16, code_dim=4, l2_norm=True, ema=ema, restart_dead=True, dead_after=1,
                 entropy_weight=0.1).train()
        z = torch.randn(2, 4, 4, 4, requires_grad=True)
        out = q(z)
        assert out.stats["dead"].item() > 0  # some codes were restarted in place
        (out.loss + out.zq_bdhw.sum()).backward()
        assert z.grad is not None and torch.isfinite(z.grad).all()
        assert not q.steps_unused.requires_grad and not q.embedding.weight.detach().requires_grad


# ----------------------------------------------------------------------------- precision and state


def test_bf16_autocast_gives_the_fp32_indices():
    q = make(codebook_size=1024, code_dim=8, l2_norm=False).eval()
    set_codebook(q, torch.randn(1024, 8))
    z = torch.randn(4, 8, 16, 16).bfloat16().float()  # bf16-representable: only the quantizer's math differs
    ref = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_f = q(z)
        out_bf = q(z.bfloat16())
    assert torch.equal(out_f.indices, ref.indices)
    assert torch.equal(out_bf.indices, ref.indices)
    assert out_f.loss.dtype == torch.float32 and out_bf.zq_bdhw.dtype == torch.bfloat16
    torch.testing.assert_close(out_f.losses["commit"], ref.losses["commit"])
    # the check has teeth: a distance matmul left to autocast picks other codes for some positions
    e = q.embedding.weight.detach()
    zn = to_nd(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        naive = ((zn**2).sum(1, keepdim=True) - 2 * zn @ e.t() + (e**2).sum(1)).argmin(1)
    assert (naive != ref.indices.reshape(-1)).any()


def test_tf32_matmuls_are_off_during_the_lookup_and_restored_after():
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what speed-minded users set (TF32 on Ampere+)
    try:
        with exact_fp32_matmul():
            if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
                assert torch.backends.cuda.matmul.fp32_precision == "ieee"
            else:
                assert not torch.backends.cuda.matmul.allow_tf32
        q = make(codebook_size=16, code_dim=4)
        q(torch.randn(1, 4, 2, 2))
        assert torch.get_float32_matmul_precision() == "high"  # legacy getter still works, value restored
    finally:
        torch.set_float32_matmul_precision(old)


def test_state_dict_round_trip():
    cfg = dict(codebook_size=32, code_dim=4, l2_norm=True, ema=True, restart_dead=True, dead_after=2)
    q = make(**cfg).train()
    for _ in range(4):
        q(torch.randn(2, 4, 4, 4))
    sd = q.state_dict()
    assert {"embedding.weight", "steps_unused", "cluster_size", "embed_avg", "recent_z", "recent_count",
            "recent_ptr"} <= set(sd)
    q2 = make(**cfg)
    q2.load_state_dict(sd)
    for key, v in q2.state_dict().items():
        assert torch.equal(v, sd[key]), key
    z = torch.randn(2, 4, 4, 4)
    a, b = q.eval()(z), q2.eval()(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.zq_bdhw, b.zq_bdhw)
    # and training continues identically from the restored state
    torch.manual_seed(1)
    q.train()(z)
    torch.manual_seed(1)
    q2.train()(z)
    for key, v in q2.state_dict().items():
        assert torch.equal(v, q.state_dict()[key]), key


def test_plain_codebook_state_dict_is_taming_compatible():
    q = make(codebook_size=16, code_dim=4, restart_dead=False)
    assert set(q.state_dict()) == {"embedding.weight", "steps_unused"}
    q.load_state_dict({"embedding.weight": torch.randn(16, 4)}, strict=False)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw, match", [
    (dict(codebook_size=1), r"codebook_size 1: must be between 2"),
    (dict(code_dim=0), r"code_dim 0: must be >= 1"),
    (dict(code_dim=1, l2_norm=True), r"code_dim 1 with l2_norm"),
    (dict(beta=-0.1), r"beta -0.1"),
    (dict(ema_decay=1.0), r"ema_decay 1.0: must be in \(0, 1\)"),
    (dict(ema_eps=0.0), r"ema_eps 0.0"),
    (dict(dead_after=0), r"dead_after 0"),
    (dict(restart_buffer=0), r"restart_buffer 0"),
    (dict(entropy_weight=-1.0), r"entropy_weight -1.0"),
    (dict(entropy_temperature=0.0), r"entropy_temperature 0.0"),
])
def test_invalid_config_raises_config_error(kw, match):
    with pytest.raises(ConfigError, match=match):
        VectorQuantizer.Config(**kw)
    with pytest.raises(ConfigError, match=match):
        build("quantizer", {"type": "vq", **kw})


def test_wrong_channel_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expects z of shape \(B, 4, h, w\)"):
        make(code_dim=4)(torch.randn(1, 8, 2, 2))


# ----------------------------------------------------------------------------- distributed


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial codebook on every rank
        q = make(codebook_size=16, code_dim=4, l2_norm=False, ema=True, ema_decay=0.9, restart_dead=True,
                 dead_after=2, restart_buffer=64).train()
        torch.manual_seed(100 + rank)  # different data (and restart RNG) per rank
        dead = sum(q(torch.randn(2, 4, 4, 4) + rank).stats["dead"].item() for _ in range(5))
        state = {k: v.clone() for k, v in q.state_dict().items()}
        torch.save({"state": state, "dead": dead}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_keep_identical_codebooks(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["dead"] == r1["dead"] > 0  # restarts happened, decided identically on both ranks
    s0, s1 = r0["state"], r1["state"]
    for key in ("embedding.weight", "cluster_size", "embed_avg", "steps_unused"):
        assert torch.equal(s0[key], s1[key]), key
    assert not torch.equal(s0["recent_z"], s1["recent_z"])  # each rank remembers its own data


def test_ema_all_reduce_matches_one_process_on_the_whole_batch(tmp_path):
    """With a 1-rank process group the collectives run and change nothing."""
    import torch.distributed as dist

    z = torch.randn(2, 4, 4, 4)
    kw = dict(codebook_size=16, code_dim=4, l2_norm=False, ema=True, restart_dead=False)
    torch.manual_seed(0)
    plain = make(**kw).train()
    plain(z)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        q = make(**kw).train()
        q(z)
    finally:
        dist.destroy_process_group()
    for key, v in plain.state_dict().items():
        assert torch.equal(v, q.state_dict()[key]), key


# ----------------------------------------------------------------------------- presets


def _presets(kind_type: str) -> list[Path]:
    files = sorted((REPO / "registry" / "quantizer").glob("*.yaml"))
    return [f for f in files if (yaml.safe_load(f.read_text()) or {}).get("type") == kind_type]


def test_llamagen_preset_is_faithful():
    node = yaml.safe_load((REPO / "registry" / "quantizer" / "vq-16384-l2.yaml").read_text())
    cfg = build("quantizer", node).cfg
    assert (cfg.codebook_size, cfg.code_dim, cfg.l2_norm, cfg.beta, cfg.ema, cfg.entropy_weight) == (
        16384, 8, True, 0.25, False, 0.0)


@pytest.mark.parametrize("path", _presets("vq"), ids=lambda p: p.stem)
def test_preset_builds_and_runs(path):
    text = path.read_text()
    assert text.startswith("#"), f"{path.name}: the first line should be a comment saying what it is"
    node = yaml.safe_load(text)
    q = build("quantizer", node)
    assert isinstance(q, VectorQuantizer)
    assert (q.codebook_size, q.code_dim) == (node["codebook_size"], node["code_dim"])
    for mode in (q.train, q.eval):
        mode()
        out = q(torch.randn(2, q.code_dim, 4, 4))
        assert out.zq_bdhw.shape == (2, q.code_dim, 4, 4) and out.indices.shape == (2, 4, 4)
        assert 0 <= int(out.indices.min()) and int(out.indices.max()) < q.codebook_size
        assert math.isfinite(out.loss.item())
