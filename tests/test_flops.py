"""FLOPs counted from the model (arlab.flops): closed forms for a linear layer and attention, a tiny Llama
generator against Kaplan's 6·N·T + attention, linearity in the batch, and a probe that changes nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arlab.config import load_experiment
from arlab.flops import count_flops, slice_batch, train_flops_per_image

META = {"vocab_size": 1000, "grid": [8, 8], "scales": [8], "num_classes": 10, "classes": [f"c{i}" for i in range(10)],
        "dataset": "shapes", "images": "shapes", "tokenizer_ckpt": "unused", "image_size": 32, "captions": False}


def test_a_linear_layer_counts_2mnk_forward_and_6mnk_with_backward():
    m, k, n = 5, 7, 3
    lin = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(m, k, requires_grad=True)
    assert count_flops(lambda: lin(x)) == 2 * m * n * k
    assert count_flops(lambda: lin(x).sum().backward()) == 6 * m * n * k  # grad of the input and of the weight


def test_cpu_attention_is_counted_forward_and_backward():
    """torch counts only its CUDA attention kernels; arlab.flops adds the CPU one: QKᵀ and AV, 2·s²·d each."""
    b, h, s, d = 2, 4, 16, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    fwd = 2 * (2 * b * h * s * s * d)
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)) == fwd
    both = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward())
    assert both == fwd + 5 * fwd // 2  # backward: recomputed scores + four products = 2.5x forward


def tiny_generator(shuffle: str = "s1"):
    exp = load_experiment("shapes/raster", ["backbone=tiny", f"shuffle={shuffle}"])
    return exp, exp.build("task", experiment=exp.tree, meta=META)


def batch(n: int) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"tokens": torch.randint(0, 1000, (n, 64), generator=g), "label": torch.arange(n) % 10,
            "key": [f"k{i}" for i in range(n)]}


def test_tiny_llama_generator_is_6nt_plus_attention():
    """Counted fwd+bwd per image vs 6·N·T (N: parameters outside embedding tables; T: backbone positions, tokens
    for the head) plus attention (3.5 · 4·T²·d per layer: full scores, backward 2.5x).
    Measured 0.998 (raster) and 1.008 (s=2); the rest is norms and gates the counter leaves out."""
    for shuffle in ("s1", "s2"):
        exp, module = tiny_generator(shuffle)
        bb = exp.tree["backbone"]
        t = module.sequence_length
        assert t == {"s1": 64, "s2": 16}[shuffle]  # class prefix 1 + cells - 1
        attention = 3.5 * 4 * t * t * bb["dim"] * bb["depth"]
        counted = train_flops_per_image(module, batch(4))
        ratio = counted / (module.analytic_flops_per_image() + attention)
        assert 0.97 < ratio < 1.03, (shuffle, ratio)


def test_per_image_count_is_linear_in_the_batch_and_the_probe_changes_nothing():
    _, module = tiny_generator()
    params = list(module.parameters())
    params[0].grad = torch.full_like(params[0], 3.0)  # a gradient in flight survives the probe
    rng = torch.get_rng_state()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    two = train_flops_per_image(module, batch(6), probe_images=2)
    five = train_flops_per_image(module, batch(6), probe_images=5)
    assert two == five > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(params[0].grad, torch.full_like(params[0], 3.0)) and all(p.grad is None for p in params[1:])
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_slice_batch_keeps_structure():
    b = slice_batch({"tokens": torch.zeros(4, 3), "key": ["a", "b", "c", "d"], "n": 7}, 2)
    assert b["tokens"].shape == (2, 3) and b["key"] == ["a", "b"] and b["n"] == 7


def test_probe_restores_values_written_in_place_by_a_forward():
    """A forward that writes a parameter and a buffer in place (a VQ codebook's EMA update, a dead-code
    restart) and draws random numbers leaves no trace after the probe: values and the RNG as before."""
    from arlab.flops import side_effect_free

    class InPlace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.codebook = torch.nn.Parameter(torch.randn(4, 3), requires_grad=False)
            self.w = torch.nn.Parameter(torch.randn(3, 3))
            self.register_buffer("count", torch.zeros(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                self.codebook.mul_(0.5).add_(torch.rand(4, 3))
                self.count.add_(1)
            return (x @ self.w).sum()

    m = InPlace()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(7)
    expected_next = torch.rand(2)
    torch.manual_seed(7)
    side_effect_free(m, lambda: m(torch.randn(2, 3)).backward())
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert m.w.grad is None
    assert torch.equal(torch.rand(2), expected_next)
