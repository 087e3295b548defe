"""``autoencoder/conv``: the VQGAN convolutional encoder/decoder (taming-transformers / LlamaGen shape).

The architecture of VQGAN (Esser et al. 2021, CompVis/taming-transformers ``diffusionmodules/model.py``)
as LlamaGen's VQ tokenizer uses it (``tokenizer_image/vq_model.py``; VQ-16 = ch 128, ch_mult
[1, 1, 2, 2, 4], two res blocks, z_channels 256, attention at the lowest resolution only)::

    encode: x_b3HW ─conv_in─▶ [ResBlock×n (+Attn at the lowest level)] ─Downsample─▶ … ─▶ mid
            (Res ─ Attn ─ Res) ─GN─SiLU─conv_out─▶ (B, z_channels, h, w) ─quant_conv 1×1─▶ z_bdhw
    decode: zq_bdhw ─post_quant_conv 1×1─▶ (B, z_channels, h, w) ─conv_in─▶ mid ─▶ levels reversed,
            [ResBlock×(n+1) (+Attn at the lowest level)] ─Upsample─▶ … ─GN─SiLU─conv_out─▶ x_b3HW

with ``h = H / f``, ``f = 2 ** (len(ch_mult) - 1)`` and ``d = code_dim`` (the quantizer's code
dimension, a constructor argument rather than configuration). Images are in [-1, 1]; the decoder
output is not clamped (the trainer clamps for metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arlab.errors import ConfigError
from arlab.layers import attention
from arlab.optim import adamw_only
from arlab.registry import register

_VALID_FACTORS = (2, 4, 8, 16)
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def conv_layout(x: Tensor, memory_format: str) -> Tensor:
    """``x`` (B, C, H, W) in the layout the convolutions run in: NHWC (``channels_last``) or NCHW.

    ``auto`` picks NHWC for float32 on a CPU outside autocast and NCHW everywhere else. Measured with 2 threads
    on an AVX-512 CPU without native bf16 (docs/performance.md section 0), oneDNN's NHWC kernels made the
    shapes tokenizer's float32 training step 1.3-1.4x faster, encode 1.2-1.3x and decode 1.5x. Under bf16
    autocast on an AMX CPU they were slower (215 ms against 130 ms per step). GPUs are not measured: NCHW stays.
    """
    if memory_format == "auto":
        cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        memory_format = "channels_last" if cpu_fp32 else "contiguous"
    if memory_format == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with eps 1e-6 and affine parameters, as taming/LlamaGen ``Normalize``."""
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN → SiLU → conv3×3 → GN → SiLU → dropout → conv3×3, plus a 1×1 shortcut when channels change.

    Shapes: (B, c_in, H, W) → (B, c_out, H, W).
    """

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1×1 q/k/v/proj convs and a residual (taming ``AttnBlock``).

    Every one of the H·W positions attends to all others over C channels (scale 1/√C), computed
    with ``F.scaled_dot_product_attention``. Shapes: (B, C, H, W) → (B, C, H, W).
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        # (B, C, H, W) → (B, 1 head, H·W, C)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q(n), self.k(n), self.v(n)))
        out = attention(q, k, v)  # (B, 1, H·W, C); SDPA, float32 for bf16/fp16 inputs on CPU
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Asymmetric zero pad (left 0, right 1, top 0, bottom 1) then a 3×3 stride-2 conv: (B, C, H, W) →
    (B, C, H/2, W/2) (taming/LlamaGen ``Downsample`` with ``with_conv``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2 then a 3×3 conv: (B, C, H, W) → (B, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResBlock → AttnBlock → ResBlock at the lowest resolution (the attention is optional)."""

    def __init__(self, channels: int, groups: int, dropout: float, attn: bool):
        super().__init__()
        self.block1 = ResnetBlock(channels, channels, groups, dropout)
        self.attn = AttnBlock(channels, groups) if attn else nn.Identity()
        self.block2 = ResnetBlock(channels, channels, groups, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block2(self.attn(self.block1(x)))


class Level(nn.Module):
    """One resolution level: ResBlocks, each followed by an AttnBlock when ``attn``, then an optional
    resampler (Downsample in the encoder, Upsample in the decoder)."""

    def __init__(self, c_in: int, c_out: int, n_blocks: int, groups: int, dropout: float, attn: bool,
                 resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResnetBlock(c_in if i == 0 else c_out, c_out, groups, dropout) for i in range(n_blocks)
        )
        self.attns = nn.ModuleList(AttnBlock(c_out, groups) for _ in range(n_blocks)) if attn else None
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.attns is not None:
                x = self.attns[i](x)
        return self.resample(x)


class Encoder(nn.Module):
    """(B, in_channels, H, W) → (B, z_channels, H/f, W/f); quant_conv is in :class:`ConvAutoencoder`."""

    def __init__(self, cfg: ConvAutoencoder.Config):
        super().__init__()
        ch, mult, g = cfg.ch, list(cfg.ch_mult), cfg.norm_groups
        n = len(mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        adamw_only(self.conv_in.weight)  # the input layer: AdamW under task.optimizer=muon (arlab.optim)
        c_in = ch
        levels = []
        for i, m in enumerate(mult):
            c_out = ch * m
            lowest = i == n - 1
            levels.append(Level(c_in, c_out, cfg.num_res_blocks, g, cfg.dropout, cfg.attn and lowest,
                                None if lowest else Downsample(c_out)))
            c_in = c_out
        self.levels = nn.ModuleList(levels)
        self.mid = MidBlock(c_in, g, cfg.dropout, cfg.attn)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) → (B, in_channels, h·f, w·f); no post_quant_conv; output not clamped."""

    def __init__(self, cfg: ConvAutoencoder.Config):
        super().__init__()
        ch, mult, g = cfg.ch, list(cfg.ch_mult), cfg.norm_groups
        n = len(mult)
        c_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = MidBlock(c_in, g, cfg.dropout, cfg.attn)
        blocks = cfg.decoder_blocks()
        levels = []
        for i in reversed(range(n)):  # lowest resolution first
            c_out = ch * mult[i]
            levels.append(Level(c_in, c_out, blocks[i], g, cfg.dropout, cfg.attn and i == n - 1,
                                Upsample(c_out) if i > 0 else None))
            c_in = c_out
        self.levels = nn.ModuleList(levels)
        self.norm_out = _norm(c_in, g)
        self.conv_out = nn.Conv2d(c_in, cfg.in_channels, 3, padding=1)
        adamw_only(self.conv_out.weight)  # the output layer

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@register("autoencoder", "conv")
class ConvAutoencoder(nn.Module):
    """VQGAN/LlamaGen convolutional encoder + decoder with 1×1 quant_conv / post_quant_conv to code_dim.

    ``encode``: x_b3HW (B, 3, H, W) in [-1, 1] → z_bdhw (B, code_dim, H/f, W/f).
    ``decode``: zq_bdhw (B, code_dim, h, w) → x_b3HW (B, 3, h·f, w·f), not clamped.
    ``f = 2 ** (len(ch_mult) - 1)``; H and W must be multiples of f for ``decode(encode(x))`` to
    return the input size. ``last_layer`` is the decoder's ``conv_out.weight`` (VQGAN's adaptive
    GAN weight). Level i has ``ch * ch_mult[i]`` channels; the encoder runs ``num_res_blocks``
    ResBlocks per level and the decoder ``num_res_blocks + 1``, as in taming and LlamaGen, unless
    ``decoder_res_blocks`` gives the decoder's count per level.
    """

    @dataclass
    class Config:
        ch: int = 128  # base channels; level i has ch * ch_mult[i]
        ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # per level; f = 2**(len-1)
        num_res_blocks: int = 2  # ResBlocks per encoder level (the decoder uses one more)
        decoder_res_blocks: list[int] | None = None  # per decoder level, ch_mult order; null: num_res_blocks + 1
        attn: bool = True  # self-attention after each ResBlock of the lowest level and in the mid block
        z_channels: int = 256  # encoder output / decoder input channels around the 1x1 code_dim convs
        dropout: float = 0.0  # dropout inside every ResBlock
        norm_groups: int = 32  # GroupNorm groups; every ch * ch_mult[i] must be divisible by it
        in_channels: int = 3  # image channels (input and reconstruction)
        memory_format: str = "auto"  # conv layout: auto (NHWC for float32 on CPU, else NCHW), channels_last, contiguous

        def __post_init__(self) -> None:
            mult = list(self.ch_mult)
            if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mult):
                raise ConfigError(f"ch_mult {mult}: every multiplier must be a positive integer, e.g. [1, 2]")
            f = 2 ** (len(mult) - 1) if mult else 0
            if f not in _VALID_FACTORS:
                raise ConfigError(
                    f"ch_mult {mult} has {len(mult)} levels, a downsampling factor f = 2**(len-1) = {f}; "
                    f"give 2 to 5 levels for f in {list(_VALID_FACTORS)} (e.g. [1, 2] → f=2, "
                    "[1, 2, 2, 4] → f=8, [1, 1, 2, 2, 4] → f=16)"
                )
            for name in ("ch", "z_channels", "norm_groups", "in_channels"):
                value = getattr(self, name)
                if value < 1:
                    raise ConfigError(f"{name}={value}: must be a positive integer")
            if self.memory_format not in MEMORY_FORMATS:
                raise ConfigError(f"memory_format {self.memory_format!r} is not one of {', '.join(MEMORY_FORMATS)}")
            if self.num_res_blocks < 1:
                raise ConfigError(f"num_res_blocks={self.num_res_blocks}: must be >= 1 (LlamaGen uses 2)")
            if self.decoder_res_blocks is not None:
                blocks = list(self.decoder_res_blocks)
                if len(blocks) != len(mult) or any(isinstance(b, bool) or not isinstance(b, int) or b < 1
                                                   for b in blocks):
                    raise ConfigError(
                        f"decoder_res_blocks {blocks}: give one positive integer per level of ch_mult {mult} "
                        f"(level 0 = full resolution), or null for num_res_blocks + 1 = {self.num_res_blocks + 1} "
                        "at every level"
                    )
            if not 0.0 <= self.dropout < 1.0:
                raise ConfigError(f"dropout={self.dropout}: must be in [0, 1)")
            channels = [self.ch * m for m in mult]
            bad = sorted({c for c in channels if c % self.norm_groups})
            if bad:
                ok = [g for g in (1, 2, 4, 8, 16, 32) if all(c % g == 0 for c in channels)]
                raise ConfigError(
                    f"norm_groups={self.norm_groups} does not divide the channels {bad} (ch={self.ch} × "
                    f"ch_mult {mult} gives {channels}); use norm_groups in {ok} or change ch"
                )

        def decoder_blocks(self) -> list[int]:
            """ResBlocks per decoder level, level 0 (full resolution) first."""
            if self.decoder_res_blocks is None:
                return [self.num_res_blocks + 1] * len(self.ch_mult)
            return list(self.decoder_res_blocks)

    def __init__(self, cfg: Config, code_dim: int):
        super().__init__()
        if isinstance(code_dim, bool) or not isinstance(code_dim, int) or code_dim < 1:
            raise ValueError(f"code_dim must be a positive integer (the quantizer's d), got {code_dim!r}")
        self.cfg = cfg
        self.code_dim = code_dim
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, code_dim, 1)
        self.post_quant_conv = nn.Conv2d(code_dim, cfg.z_channels, 1)
        for conv in (self.quant_conv, self.post_quant_conv):  # the code bottleneck's projections: AdamW
            adamw_only(conv.weight)

    def extra_repr(self) -> str:
        return f"downsample={self.downsample}, code_dim={self.code_dim}"

    @property
    def downsample(self) -> int:
        """The spatial downsampling factor f = 2 ** (len(ch_mult) - 1)."""
        return 2 ** (len(self.cfg.ch_mult) - 1)

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's ``conv_out.weight`` (3, C, 3, 3): where VQGAN measures ‖∇rec‖ / ‖∇G_adv‖."""
        return self.decoder.conv_out.weight

    def latent_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int]:
        """(h, w) of ``encode`` for side ``image_size`` or (H, W); both must be multiples of f."""
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        f = self.downsample
        if any(s % f for s in hw):
            raise ValueError(f"image size {hw} is not a multiple of the downsampling factor {f}")
        return hw[0] // f, hw[1] // f

    def encode(self, x_b3HW: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] → z_bdhw (B, code_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(conv_layout(x_b3HW, self.cfg.memory_format))).contiguous()

    def decode(self, zq_bdhw: Tensor) -> Tensor:
        """(B, code_dim, h, w) → (B, 3, h·f, w·f), not clamped."""
        return self.decoder(self.post_quant_conv(conv_layout(zq_bdhw, self.cfg.memory_format))).contiguous()

    def forward(self, x_b3HW: Tensor) -> Tensor:
        """Identity bottleneck: ``decode(encode(x))`` (for tests and continuous-latent experiments)."""
        return self.decode(self.encode(x_b3HW))
