"""backbone/llama: shapes, SwiGLU width, RoPE, QK-norm, GQA, adaLN, KV cache vs full attention."""

from __future__ import annotations

import pytest
import torch

from arlab.backbone.llama import KVCache, Llama, apply_rope, find_multiple, rope_2d
from arlab.config import build, presets, resolve_node
from arlab.errors import ConfigError


def make(**kw) -> Llama:
    base = dict(dim=64, depth=2, heads=4, multiple_of=32)
    return Llama(Llama.Config(**(base | kw)))


LLAMA_PRESETS = sorted(p for p in presets("backbone") if resolve_node("backbone", p)["type"] == "llama")


@pytest.mark.parametrize("name", LLAMA_PRESETS)
def test_presets_build_and_run(name):
    if name in ("b", "l"):  # GPT-B / GPT-L: count parameters without running
        m = build("backbone", name)
        n = sum(p.numel() for p in m.parameters())
        d, depth = m.cfg.dim, m.cfg.depth
        ffn = find_multiple(int(8 * d / 3), 256)
        assert n == depth * (4 * d * d + 3 * d * ffn + 2 * d) + d  # LlamaGen GPT-B/L blocks, no biases
        assert (ffn, depth) == {"b": (2048, 12), "l": (2816, 24)}[name]
        return
    if name == "var-d16":  # VAR-d16's shape: depth 16, width 64·16, 16 heads of 64, adaLN in every block
        m = build("backbone", name)
        d, depth = m.cfg.dim, m.cfg.depth
        assert (d, depth, m.cfg.heads, m.head_dim, m.cfg.cond_mode, m.cfg.rope) == (1024, 16, 16, 64, "adaln", False)
        ffn = find_multiple(int(8 * d / 3), 256)
        per_block = 4 * d * d + 3 * d * ffn + 6 * d * d + 6 * d + 2 * m.head_dim  # attn, SwiGLU, adaLN, QK-norm
        n = sum(p.numel() for p in m.parameters())
        assert n == depth * per_block + 2 * d * d + 2 * d  # + the modulated final norm (VAR AdaLNBeforeHead)
        assert abs(per_block / (18 * d * d) - 1) < 0.02  # VAR: ≈ 18 C² per block (notes §2.4)
        return
    m = build("backbone", name)
    x = torch.randn(2, 9, m.dim)
    rows, cols = torch.arange(9) // 3, torch.arange(9) % 3
    assert m(x, m.position_tables(rows, cols)).shape == (2, 9, m.dim)


def test_rope_2d_rotates_rows_and_columns_and_identity_for_prefix():
    cos, sin = rope_2d(torch.tensor([0, 2, 0]), torch.tensor([0, 0, 3]), head_dim=16,
                       identity=torch.tensor([False, False, True]))
    assert cos.shape == (3, 8)
    assert torch.allclose(cos[0], torch.ones(8)) and torch.allclose(sin[0], torch.zeros(8))  # position (0, 0)
    freqs = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    assert torch.allclose(sin[1, :4], torch.sin(2 * freqs)) and torch.allclose(sin[1, 4:], torch.zeros(4))
    assert torch.equal(cos[2], torch.ones(8)) and torch.equal(sin[2], torch.zeros(8))  # identity, not zero
    q = torch.randn(1, 1, 3, 16)
    out = apply_rope(q, cos, sin)
    assert torch.equal(out[:, :, 2], q[:, :, 2])
    assert torch.allclose(out.norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # rotations keep the norm


def _rope_pairs(x, cos, sin):
    """The definition: adjacent pairs (x0, x1) → (x0·cos − x1·sin, x0·sin + x1·cos)."""
    x0, x1 = x.float()[..., 0::2], x.float()[..., 1::2]
    if cos.ndim == 3:
        cos, sin = cos[:, None], sin[:, None]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2).type_as(x)


@pytest.mark.parametrize("case", ["contiguous", "qkv-split", "per-sample", "odd-offset", "odd-offset-contiguous"])
def test_rope_complex_path_is_the_pairwise_rotation(case):
    """The eager path (complex multiply) equals the pairwise definition forward and backward, to float32 rounding
    (the same bits at most shapes; 1 ulp apart in a few elements at some), for the layouts attention hands it (a
    slice of the fused qkv projection, an odd storage offset) and per-sample positions."""
    torch.manual_seed(0)
    b, h, L, d = 3, 2, 5, 8
    cos, sin = rope_2d(torch.arange(L) // 2, torch.arange(L) % 2, d)
    if case == "per-sample":
        cos, sin = rope_2d(torch.randint(0, 4, (b * L,)), torch.randint(0, 4, (b * L,)), d)
        cos, sin = cos.view(b, L, -1), sin.view(b, L, -1)
    base = torch.randn(b, L, 3 * h * d + 1, requires_grad=True)
    start = 1 if case == "odd-offset" else 0  # a storage offset view_as_complex cannot take as is
    if case in ("qkv-split", "odd-offset"):
        x = base[..., start + h * d: start + 2 * h * d].unflatten(-1, (h, d)).transpose(1, 2)  # k of a fused qkv
    elif case == "odd-offset-contiguous":  # contiguous, yet an odd storage offset: .contiguous() would not copy it
        x = base.flatten()[1:1 + b * h * L * d].view(b, h, L, d)
    else:
        x = base[..., :h * d].unflatten(-1, (h, d)).transpose(1, 2).contiguous()
    g = torch.randn(b, h, L, d)
    outs = []
    for fn in (apply_rope, _rope_pairs):
        base.grad = None
        y = fn(x, cos, sin)
        y.backward(g)
        outs.append((y.detach(), base.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-6, atol=1e-6)
    assert not torch.equal(outs[0][0], x)  # it rotates


def test_rope_scores_depend_only_on_relative_position():
    d = 16
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(pq, pk):
        cq, sq = rope_2d(torch.tensor([pq[0]]), torch.tensor([pq[1]]), d)
        ck, sk = rope_2d(torch.tensor([pk[0]]), torch.tensor([pk[1]]), d)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    assert torch.allclose(score((1, 2), (0, 0)), score((4, 7), (3, 5)), atol=1e-5)
    assert not torch.allclose(score((1, 2), (0, 0)), score((2, 1), (0, 0)), atol=1e-3)


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}, {"kv_heads": 2}, {"cond_mode": "adaln"}])
def test_causal_fast_path_equals_explicit_mask_and_kv_cache(kw):
    torch.manual_seed(0)
    m = make(**kw).eval()
    b, n = 2, 7
    x = torch.randn(b, n, 64)
    rope = m.position_tables(torch.arange(n), torch.arange(n) % 3)
    cond = torch.randn(b, 64) if kw.get("cond_mode") == "adaln" else None
    full = m(x, rope, cond_bd=cond)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.allclose(m(x, rope, mask=mask, cond_bd=cond), full, atol=1e-5)
    state = m.init_state(b, n, torch.float32, torch.device("cpu"))
    outs = []
    for t in range(n):  # one token at a time through the static cache
        pos = torch.tensor([t])
        outs.append(m.step(x[:, t:t + 1], state, pos, (rope[0][t:t + 1], rope[1][t:t + 1]), mask[t:t + 1], cond))
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-5)


def test_later_tokens_do_not_change_earlier_outputs():
    m = make().eval()
    x = torch.randn(1, 6, 64)
    rope = m.position_tables(torch.arange(6), torch.zeros(6, dtype=torch.long))
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 64)
    a, b = m(x, rope), m(y, rope)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6) and not torch.allclose(a[:, 4:], b[:, 4:])


def test_kv_cache_writes_by_position():
    c = KVCache(1, 2, 5, 4, torch.float32)
    k = torch.ones(1, 2, 2, 4)
    kk, vv = c.update(torch.tensor([1, 3]), k, 2 * k)
    assert kk[0, 0, :, 0].tolist() == [0, 1, 0, 1, 0] and vv[0, 0, 3, 0] == 2


@pytest.mark.parametrize("kw,match", [
    ({"dim": 65}, "not divisible by heads"),
    ({"dim": 24, "heads": 4}, "divisible by 4 for 2D RoPE"),
    ({"kv_heads": 3}, "kv_heads 3 must divide heads 4"),
    ({"cond_mode": "film"}, "cond_mode 'film' is not one of prefix, adaln"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ConfigError, match=match):
        make(**kw)


def test_adaln_starts_as_plain_prenorm_and_uses_the_condition():
    torch.manual_seed(0)
    m = make(cond_mode="adaln").eval()
    x = torch.randn(2, 5, 64)
    rope = m.position_tables(torch.arange(5), torch.arange(5))
    c1, c2 = torch.randn(2, 64), torch.randn(2, 64)
    assert torch.allclose(m(x, rope, cond_bd=c1), m(x, rope, cond_bd=c2))  # zero-init modulation
    for b in m.blocks:
        torch.nn.init.normal_(b.ada[1].weight, std=0.1)
    assert not torch.allclose(m(x, rope, cond_bd=c1), m(x, rope, cond_bd=c2))
