"""arlab.optim: MuonAdamW's two rules against torch's own optimizers, conv kernels as matrices, and which weights
each registered component puts on Muon."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from arlab.config import build, presets
from arlab.errors import ConfigError
from arlab.optim import MuonAdamW, adamw_only, muon_group, newton_schulz, ns_dtype_for, split_hidden


def _params(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _step_both(ours, theirs, a, b, steps=5):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone().reshape(q.shape)
        ours.step()
        for o in theirs:
            o.step()


@pytest.mark.parametrize("fused", [False, True])
def test_each_half_is_torchs_optimizer_bit_for_bit(fused):
    """Muon groups step exactly as torch.optim.Muon (bf16 Newton-Schulz, EMA Nesterov momentum, 'original' scale),
    AdamW groups exactly as torch.optim.AdamW (single-tensor or fused), over 5 steps."""
    w, v = _params([(64, 32), (16, 48)], 0), _params([(32,), (8, 8)], 1)
    w2, v2 = [nn.Parameter(p.detach().clone()) for p in w], [nn.Parameter(p.detach().clone()) for p in v]
    ours = MuonAdamW([muon_group(w, 0.02, 0.9, 0.01), {"params": v, "lr": 1e-3, "weight_decay": 0.05}],
                     betas=(0.9, 0.95), fused=fused or None, ns_dtype=torch.bfloat16)
    theirs = [torch.optim.Muon(w2, lr=0.02, momentum=0.9, weight_decay=0.01),
              torch.optim.AdamW(v2, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05, fused=fused or None)]
    _step_both(ours, theirs, w + v, w2 + v2)
    for p, q in zip(w + v, w2 + v2):
        assert torch.equal(p, q)


def test_a_conv_kernel_steps_as_torchs_muon_on_its_matrix():
    """A (O, I, kh, kw) kernel is orthogonalised and scaled as the (O, I·kh·kw) matrix: each step equals
    torch.optim.Muon's on that matrix (bf16 Newton-Schulz), bit for bit."""
    (k,) = _params([(16, 4, 3, 3)], 2)
    m = nn.Parameter(k.detach().reshape(16, 36).clone())
    ours = MuonAdamW([muon_group([k], 0.05, 0.95, 0.01)], ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon([m], lr=0.05, momentum=0.95, weight_decay=0.01)
    _step_both(ours, [theirs], [k], [m], steps=3)
    assert torch.equal(k.reshape(16, 36), m)


@pytest.mark.parametrize("shape", [(24, 96), (96, 24), (64, 64)])
def test_newton_schulz_flattens_the_singular_values(shape):
    """Five quintic iterations take singular values spread over 10x into Jordan's band (about 0.7-1.2) and keep the
    singular vectors: the result is U S' Vᵀ for G = U S Vᵀ."""
    gen = torch.Generator().manual_seed(3)
    k = min(shape)
    u = torch.linalg.qr(torch.randn(shape[0], k, generator=gen))[0]
    v = torch.linalg.qr(torch.randn(shape[1], k, generator=gen))[0]
    g = u @ torch.diag(torch.logspace(-1, 0, k)) @ v.T
    o = newton_schulz(g, dtype=torch.float32)
    d = u.T @ o @ v  # S': diagonal
    assert o.shape == g.shape and (d - torch.diag(torch.diagonal(d))).abs().max() < 1e-4
    s = torch.diagonal(d)
    assert s.min() > 0.6 and s.max() < 1.25, s
    assert (torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min()) > 9  # the input's spread


def test_a_muon_group_refuses_vectors_and_dtype_follows_the_device():
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        MuonAdamW([muon_group(_params([(8,)], 0), 0.02, 0.95, 0.0)])
    assert ns_dtype_for(_params([(4, 4)], 0)) == torch.float32
    assert MuonAdamW([muon_group(_params([(4, 4)], 0), 0.02, 0.95, 0.0)]).ns_dtype == torch.float32  # derived


def test_state_dict_round_trips_through_a_fresh_optimizer():
    """A resumed run's optimizer (momentum buffers, Adam moments and steps) continues exactly."""
    def make(ps):
        return MuonAdamW([muon_group(ps[:1], 0.02, 0.95, 0.0), {"params": ps[1:], "lr": 1e-3}],
                         ns_dtype=torch.float32)
    a = _params([(12, 8), (8,)], 4)
    opt = make(a)
    _step_both(opt, [], a, [nn.Parameter(p.detach().clone()) for p in a], steps=2)
    b = [nn.Parameter(p.detach().clone()) for p in a]
    opt2 = make(b)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from a file: no tensor shared with opt
    _step_both(opt, [opt2], a, b, steps=3)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


def test_a_fused_groups_step_counter_follows_torchs_load_policy():
    """``fused`` is a group key (as in torch's AdamW), so load_state_dict casts and moves each AdamW "step" to its
    parameter (float32 on the parameter's device: a DDP rank's, or CUDA after a CPU start), as the fused kernel
    needs; without the key torch would leave it as saved. Also: a Muon group added later is checked too."""
    a = _params([(6, 4), (4,)], 5)
    opt = MuonAdamW([muon_group(a[:1], 0.02, 0.95, 0.0), {"params": a[1:], "lr": 1e-3}], fused=True,
                    ns_dtype=torch.float32)
    assert all(g["fused"] for g in opt.param_groups)
    _step_both(opt, [], a, [nn.Parameter(p.detach().clone()) for p in a], steps=1)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["step"] = sd["state"][1]["step"].double()  # as if saved elsewhere: torch must re-place it
    b = [nn.Parameter(p.detach().clone()) for p in a]
    opt2 = MuonAdamW([muon_group(b[:1], 0.02, 0.95, 0.0), {"params": b[1:], "lr": 1e-3}], fused=True,
                     ns_dtype=torch.float32)
    opt2.load_state_dict(sd)
    assert opt2.state[b[1]]["step"].dtype == torch.float32
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        opt2.add_param_group(muon_group([nn.Parameter(torch.zeros(3))], 0.02, 0.95, 0.0))


# ---------------------------------------------------------------------------------------------- which weights
@pytest.mark.parametrize("name", [n for n in presets("autoencoder") if not n.startswith("llamagen")])
def test_an_autoencoder_puts_its_hidden_convs_on_muon_and_its_ends_on_adamw(name):
    """Every 3×3 / 1×1 convolution kernel inside the encoder and decoder is Muon's; the image-side convolutions
    and the code bottleneck's projections, norms and biases are AdamW's."""
    from arlab.autoencoder.conv import ConvAutoencoder

    ae = build("autoencoder", name, code_dim=4)
    assert isinstance(ae, ConvAutoencoder)
    hidden, rest = split_hidden(ae)
    ends = {id(ae.encoder.conv_in.weight), id(ae.decoder.conv_out.weight), id(ae.quant_conv.weight),
            id(ae.post_quant_conv.weight)}
    kernels = [m.weight for m in ae.modules() if isinstance(m, nn.Conv2d)]
    assert {id(p) for p in hidden} == {id(p) for p in kernels} - ends
    assert all(p.ndim == 1 or id(p) in ends for p in rest)
    assert len(hidden) + len(rest) == len(list(ae.parameters()))


@pytest.mark.parametrize("order,s", [("raster", 1), ("raster", 2), ("neighbor", 1), ("next_scale", 1)])
def test_a_generator_keeps_embeddings_and_heads_on_adamw(order, s):
    """The heads, the token embedding (VAR's: its word embedding) and the class embedding are AdamW's; every
    backbone matrix is Muon's; a bound msvq (frozen) is neither."""
    from tests.generator.test_model import make

    model = make(order, s)
    hidden, rest = split_hidden(model)
    on_adamw = {id(model.head.weight), id(model.conditioner.embedding.weight)}
    on_adamw.add(id(model.tok_embedding.weight) if model.tok_embedding is not None
                 else id(model.order.word_embed.weight))
    if model.head2 is not None:
        on_adamw.add(id(model.head2.weight))
    hidden_ids = {id(p) for p in hidden}
    assert not hidden_ids & on_adamw and on_adamw <= {id(p) for p in rest}
    linears = {id(m.weight) for m in model.backbone.modules() if isinstance(m, nn.Linear)}
    assert linears and linears <= hidden_ids
    assert all(p.ndim >= 2 and p.requires_grad for p in hidden)
    assert len(hidden) + len(rest) == sum(p.requires_grad for p in model.parameters())


def test_adamw_only_is_a_mark_on_the_parameter():
    lin = nn.Linear(4, 4)
    assert [id(p) for p in split_hidden(lin)[0]] == [id(lin.weight)]
    adamw_only(lin.weight)
    assert split_hidden(lin)[0] == []


@pytest.mark.parametrize("task", ["tokenizer", "generator"])
def test_an_unknown_optimizer_names_the_choices(task):
    from arlab.config import validate_component

    with pytest.raises(ConfigError, match="optimizer 'sgd' is not one of .*muon"):
        validate_component("task", {"type": task, "optimizer": "sgd"})


@pytest.mark.parametrize("experiment", ["shapes/tokenizer-quick", "shapes/quickstart"])
def test_muon_with_a_sharding_strategy_stops_before_work(experiment):
    from arlab.config import load_experiment

    with pytest.raises(ConfigError, match="Muon needs whole weight matrices.*use ddp"):
        load_experiment(experiment, ["task.optimizer=muon", "trainer.strategy=fsdp"])
    load_experiment(experiment, ["task.optimizer=muon", "trainer.strategy=ddp"])  # whole replicas: fine


def test_the_tokenizer_task_builds_muon_over_its_hidden_convs():
    """task.optimizer=muon: one MuonAdamW whose Muon group is split_hidden's (the quickstart tokenizer: every kernel
    but the four end convolutions) at muon_lr, and whose AdamW group holds the rest at lr."""
    from arlab.config import load_experiment

    exp = load_experiment("shapes/tokenizer-quick", ["task.optimizer=muon", "task.muon_lr=0.03"])
    module = exp.build("task", experiment=exp.tree, meta={})
    opt = module.configure_optimizers()["optimizer"]
    assert isinstance(opt, MuonAdamW) and opt.ns_dtype == torch.float32
    muon, rest = opt.param_groups
    hidden, others = split_hidden(module.tokenizer)
    assert muon["muon"] and [id(p) for p in muon["params"]] == [id(p) for p in hidden]
    assert not rest["muon"] and [id(p) for p in rest["params"]] == [id(p) for p in others]
    assert (muon["initial_lr"], rest["initial_lr"]) == (0.03, 2e-3)
    assert len(hidden) == sum(isinstance(m, nn.Conv2d) for m in module.tokenizer.modules()) - 4
