"""``autoencoder/conv``: shapes per preset, gradients everywhere, attention placement, config errors,
and a tiny overfit run (VQGAN / LlamaGen encoder-decoder shape)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from arlab import registry
from arlab.autoencoder.conv import AttnBlock, ConvAutoencoder, Downsample, ResnetBlock, Upsample
from arlab.config import build
from arlab.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parents[2] / "registry" / "autoencoder"
PRESETS = sorted(PRESET_DIR.glob("*.yaml"))
LARGE = {"llamagen-f16", "llamagen-f8"}
SMALL = [p for p in PRESETS if p.stem not in LARGE]


def build_preset(path: Path, code_dim: int = 8) -> ConvAutoencoder:
    return build("autoencoder", yaml.safe_load(path.read_text()), code_dim=code_dim)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count(module: torch.nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in module.modules())


def test_presets_exist_with_a_comment_first():
    assert {p.stem for p in PRESETS} >= {"tiny", "shapes-f4", "cifar-f4", "cifar-f2"} | LARGE
    for p in PRESETS:
        assert p.read_text().startswith("# "), f"{p.name}: first line must be a comment saying what it is"


@pytest.mark.parametrize("path", SMALL, ids=lambda p: p.stem)
def test_preset_shapes_gradients_and_structure(path):
    node = yaml.safe_load(path.read_text())
    ae = build_preset(path)
    cfg = ae.cfg
    for k, v in node.items():
        if k != "type":
            assert getattr(cfg, k) == v
    f = 2 ** (len(cfg.ch_mult) - 1)
    assert ae.downsample == f and ae.latent_shape(32) == (32 // f, 32 // f)

    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 8, 32 // f, 32 // f)
    y = ae.decode(z)
    assert y.shape == (2, 3, 32, 32)
    y.square().mean().backward()
    unused = [n for n, p in ae.named_parameters() if p.grad is None]
    assert not unused, f"parameters without gradient: {unused}"
    assert all(p.grad.abs().sum() > 0 for p in ae.parameters())

    # taming/LlamaGen structure: n ResBlocks per encoder level, n+1 per decoder level (or decoder_res_blocks),
    # 2 per mid block
    levels, n = len(cfg.ch_mult), cfg.num_res_blocks
    assert count(ae.encoder, ResnetBlock) == levels * n + 2
    dec = cfg.decoder_res_blocks or [n + 1] * levels
    assert count(ae.decoder, ResnetBlock) == sum(dec) + 2
    assert count(ae, Downsample) == levels - 1 and count(ae, Upsample) == levels - 1
    expected_attn = (n + 1) + (n + 1 + 1) if cfg.attn else 0  # enc lowest + mid, dec mid + lowest
    assert count(ae, AttnBlock) == expected_attn
    assert ae.last_layer is ae.decoder.conv_out.weight and ae.last_layer.shape[0] == 3


@pytest.mark.parametrize("path", [p for p in SMALL if yaml.safe_load(p.read_text()).get("attn", True)],
                         ids=lambda p: p.stem)
def test_attention_runs_only_at_the_lowest_resolution(path):
    ae = build_preset(path)
    seen = []
    for m in ae.modules():
        if isinstance(m, AttnBlock):
            m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape[-2:])))
    with torch.no_grad():
        ae(torch.zeros(1, 3, 32, 32))
    low = 32 // ae.downsample
    assert seen and set(seen) == {(low, low)}


def test_decoder_res_blocks_sets_each_decoder_level_in_ch_mult_order():
    """[1, 3, 2] with ch_mult [1, 2, 2]: one ResBlock at full resolution (32×32), three at 16×16, two at 8×8;
    the encoder keeps num_res_blocks per level; null is taming's num_res_blocks + 1 everywhere."""
    node = {"type": "conv", "ch": 16, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn": False, "z_channels": 16,
            "norm_groups": 8}
    ae = build("autoencoder", {**node, "decoder_res_blocks": [1, 3, 2]}, code_dim=4)
    per_res: dict[int, int] = {}
    for m in ae.decoder.modules():
        if isinstance(m, ResnetBlock):
            m.register_forward_hook(lambda mod, inp, out: per_res.__setitem__(
                out.shape[-1], per_res.get(out.shape[-1], 0) + 1))
    with torch.no_grad():
        y = ae(torch.zeros(2, 3, 32, 32))
    assert y.shape == (2, 3, 32, 32)
    assert per_res == {32: 1, 16: 3, 8: 2 + 2}  # the mid block's two at 8×8
    assert count(ae.encoder, ResnetBlock) == 3 * 1 + 2
    default = build("autoencoder", node, code_dim=4)
    assert default.cfg.decoder_blocks() == [2, 2, 2] and count(default.decoder, ResnetBlock) == 3 * 2 + 2


@pytest.mark.parametrize("bad,says", [([1, 2], "one positive integer per level of ch_mult \\[1, 2, 2\\]"),
                                      ([1, 0, 2], "one positive integer per level"),
                                      ([1, 2.5, 2], "not a valid list\\[int\\]"), ([True, 1, 1], "not a valid")])
def test_decoder_res_blocks_needs_one_positive_integer_per_level(bad, says):
    node = {"type": "conv", "ch": 16, "ch_mult": [1, 2, 2], "norm_groups": 8, "decoder_res_blocks": bad}
    with pytest.raises(ConfigError, match=f"decoder_res_blocks.*{says}"):
        build("autoencoder", node, code_dim=4)


def test_tiny_preset_has_no_attention():
    ae = build_preset(PRESET_DIR / "tiny.yaml")
    assert ae.downsample == 2 and count(ae, AttnBlock) == 0


@pytest.mark.parametrize("name,low,high", [("llamagen-f16", 71.0e6, 73.0e6), ("llamagen-f8", 69.0e6, 71.0e6)])
def test_llamagen_presets_match_the_published_size(name, low, high):
    """LlamaGen README: VQ-16 72M, VQ-8 70M parameters, including the 16384 × 8 codebook."""
    ae = build_preset(PRESET_DIR / f"{name}.yaml")
    total = n_params(ae) + 16384 * 8
    assert low < total < high, f"{name}: {total / 1e6:.2f}M"
    f = {"llamagen-f16": 16, "llamagen-f8": 8}[name]
    assert ae.downsample == f and ae.latent_shape(256) == (256 // f, 256 // f)
    with torch.no_grad():
        z = ae.encode(torch.zeros(1, 3, 2 * f, 2 * f))
    assert z.shape == (1, 8, 2, 2)


def test_code_dim_is_a_runtime_argument():
    ae = build_preset(PRESET_DIR / "tiny.yaml", code_dim=5)
    assert ae.quant_conv.out_channels == 5 and ae.post_quant_conv.in_channels == 5
    assert ae.encode(torch.zeros(1, 3, 8, 8)).shape == (1, 5, 4, 4)
    with pytest.raises(ValueError, match="code_dim"):
        ConvAutoencoder(ConvAutoencoder.Config(), code_dim=0)


def test_decoder_output_is_not_clamped():
    ae = build_preset(PRESET_DIR / "tiny.yaml")
    with torch.no_grad():
        ae.decoder.conv_out.bias.fill_(5.0)
        assert ae(torch.zeros(1, 3, 8, 8)).min() > 1.0


@pytest.mark.parametrize("mult", [[1], [1, 1, 2, 2, 4, 4], []])
def test_bad_ch_mult_is_a_config_error(mult):
    with pytest.raises(ConfigError, match=r"ch_mult") as e:
        build("autoencoder", {"type": "conv", "ch_mult": mult}, code_dim=8)
    assert str(mult) in str(e.value)


def test_channels_not_divisible_by_norm_groups():
    node = {"type": "conv", "ch": 48, "ch_mult": [1, 2], "norm_groups": 32}
    with pytest.raises(ConfigError, match="norm_groups") as e:
        build("autoencoder", node, code_dim=8)
    assert "48" in str(e.value)
    build("autoencoder", {**node, "norm_groups": 16}, code_dim=8)


def test_every_parameter_has_help_text():
    entry = registry.get("autoencoder", "conv")
    assert all(p.help for p in registry.params(entry))


def test_latent_shape_rejects_sizes_not_divisible_by_f():
    ae = build_preset(PRESET_DIR / "tiny.yaml")
    assert ae.latent_shape((8, 16)) == (4, 8)
    with pytest.raises(ValueError, match="multiple"):
        ae.latent_shape(7)


def test_attention_block_is_single_head_softmax_attention():
    torch.manual_seed(1)
    blk = AttnBlock(16, groups=4)
    x = torch.randn(2, 16, 3, 5)
    n = blk.norm(x)
    q, k, v = (t.flatten(2) for t in (blk.q(n), blk.k(n), blk.v(n)))  # (B, C, N)
    att = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(16), dim=-1)  # (B, N, N)
    out = (v @ att.transpose(1, 2)).reshape(2, 16, 3, 5)
    torch.testing.assert_close(blk(x), x + blk.proj(out), rtol=1e-4, atol=1e-5)


def test_downsample_pads_right_and_bottom_only():
    """Pad (0, 1, 0, 1) + 3×3 stride 2: input row 2 reaches output rows 0 and 1 (symmetric: 1 only)."""
    d = Downsample(1)
    with torch.no_grad():
        d.conv.weight.fill_(1.0)
        d.conv.bias.zero_()
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 2] = 1.0
    y = d(x)
    assert y.shape == (1, 1, 4, 4)
    assert (y[0, 0] != 0).nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


def test_resnet_block_uses_a_1x1_shortcut_only_when_channels_change():
    assert isinstance(ResnetBlock(8, 16, 4).shortcut, torch.nn.Conv2d)
    assert ResnetBlock(8, 16, 4).shortcut.kernel_size == (1, 1)
    assert isinstance(ResnetBlock(8, 8, 4).shortcut, torch.nn.Identity)


def smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def test_tiny_autoencoder_overfits_a_fixed_batch():
    """Identity bottleneck, 8 smooth 16×16 images: MSE falls ≥ 5× within 150 Adam steps (≈ 55 needed)."""
    torch.manual_seed(0)
    ae = build_preset(PRESET_DIR / "tiny.yaml")
    x = smooth_images(8, 16)
    opt = torch.optim.Adam(ae.parameters(), lr=2e-3)
    with torch.no_grad():
        first = F.mse_loss(ae(x), x).item()
    losses = []
    for _ in range(150):
        loss = F.mse_loss(ae(x), x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if losses[-1] * 5 <= first:
            break
    with torch.no_grad():
        last = F.mse_loss(ae(x), x).item()
    assert last * 5 <= first, f"MSE {first:.4f} → {last:.4f} after {len(losses)} steps"


class _ConvInputs:
    """Records the memory format of every Conv2d input (forward hooks)."""

    def __init__(self, module: torch.nn.Module):
        self.nhwc: list[bool] = []
        self.handles = [m.register_forward_pre_hook(self._hook) for m in module.modules()
                        if isinstance(m, torch.nn.Conv2d)]

    def _hook(self, _module, args):
        x = args[0]
        self.nhwc.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())


@pytest.mark.parametrize("path", SMALL, ids=lambda p: p.stem)
def test_memory_formats_give_the_same_results_and_gradients(path):
    """NHWC and NCHW convolutions compute the same function: outputs, latents and every gradient agree to float
    rounding, and encode / decode hand back NCHW tensors either way."""
    node = yaml.safe_load(path.read_text())
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    results = {}
    for fmt in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        ae = build("autoencoder", {**node, "memory_format": fmt}, code_dim=8)
        z = ae.encode(x)
        y = ae.decode(z)
        assert z.is_contiguous() and y.is_contiguous()
        y.square().mean().backward()
        results[fmt] = (z.detach(), y.detach(), {n: p.grad for n, p in ae.named_parameters()})
    (z0, y0, g0), (z1, y1, g1) = results["contiguous"], results["channels_last"]
    torch.testing.assert_close(z1, z0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-5)
    for name, g in g0.items():
        torch.testing.assert_close(g1[name], g, rtol=1e-3, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("fmt", "autocast", "nhwc"), [
    ("auto", False, True),  # float32 on CPU: NHWC (measured faster there)
    ("auto", True, False),  # CPU bf16 autocast: NCHW (NHWC measured slower)
    ("contiguous", False, False),
    ("channels_last", True, True),
])
def test_auto_memory_format_is_nhwc_for_float32_on_cpu_only(fmt, autocast, nhwc):
    ae = build_preset(PRESET_DIR / "tiny.yaml")
    ae.cfg.memory_format = fmt
    spy = _ConvInputs(ae)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ae.decode(ae.encode(torch.rand(2, 3, 8, 8)))
    # the 1x1 convs see (B, C, h, w) tensors that are both NCHW- and NHWC-contiguous only when h = w = 1
    assert spy.nhwc and all(v == nhwc for v in spy.nhwc)


def test_bad_memory_format_is_a_config_error():
    with pytest.raises(ConfigError, match="memory_format 'nhwc' is not one of auto, channels_last, contiguous"):
        build("autoencoder", {"type": "conv", "memory_format": "nhwc"}, code_dim=8)
