"""The optimizers the tasks build: the fused Adam/AdamW kernel on CPU and CUDA (arlab.task.base.fused_ok), and
that it follows the per-tensor loop kernel step for step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from arlab.config import load_experiment
from arlab.layers import decay_groups
from arlab.task.base import fused_ok
from tests.tokenizer.test_tokenizer_module import tiny_exp, write_exp


def test_fused_ok_needs_floating_parameters_on_one_kind_of_device():
    assert fused_ok([torch.zeros(3, requires_grad=True), torch.zeros(2, 2, dtype=torch.bfloat16)])
    assert not fused_ok([])
    assert not fused_ok([torch.zeros(3), torch.zeros(3, dtype=torch.long)])


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
def test_fused_kernel_follows_the_loop_kernel(cls):
    """30 steps of the same gradients through the fused CPU kernel and the per-tensor loop, with arlab's decay
    groups (decayed matrices, undecayed norms and biases) and a warm-up schedule: the weights agree to float32
    rounding (measured max |diff| ~1e-7 after 30 steps at lr 1e-2)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 8))
    twins = [net, nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 8))]
    twins[1].load_state_dict(net.state_dict())
    w0 = net[0].weight.detach().clone()
    opts = [cls(decay_groups(m, 0.05), lr=1e-2, betas=(0.9, 0.95), **kw)
            for m, kw in zip(twins, [{"fused": True}, {"foreach": False}])]
    x, y = torch.randn(64, 16), torch.randn(64, 8)
    for step in range(30):
        for m, opt in zip(twins, opts):
            for g in opt.param_groups:
                g["lr"] = 1e-2 * min(1.0, (step + 1) / 10)
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    for a, b in zip(twins[0].parameters(), twins[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (twins[0][0].weight - w0).abs().max() > 1e-2  # the weights moved: the agreement is not trivial


def test_the_tasks_build_fused_optimizers_on_cpu(tmp_path):
    """The tokenizer task (Adam) and the generator task's AdamW path pass fused=True on a CPU, but not under
    16-mixed."""
    from arlab.task.tokenizer import TokenizerModule

    exp = load_experiment(write_exp(tmp_path, "opt", tiny_exp(tmp_path, {"preset": "shapes-fsq",
                                                                           "autoencoder": "tiny"}, 5, "opt")))
    module = TokenizerModule(exp.config("task"), experiment=exp.tree)
    module._trainer = SimpleNamespace(max_steps=5, precision="32-true")
    opt = module.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] is True
    from arlab.task.base import Task

    task = Task()
    for precision, fused in (("32-true", True), ("bf16-mixed", True), ("16-mixed", None)):  # GradScaler: no fused
        task._trainer = SimpleNamespace(max_steps=5, precision=precision)
        out = task.adamw_warmup_cosine(nn.Linear(4, 4), 1e-3, [0.9, 0.95], 0.05, 2, "cosine", 0.1)
        assert out["optimizer"].defaults["fused"] is fused, precision
