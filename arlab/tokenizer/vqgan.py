"""``tokenizer/vqgan``: a convolutional autoencoder around any registered quantizer.

The shape shared by VQGAN (Esser et al. 2021), LlamaGen's VQ-16 (l2-normalised 8-d codes),
FSQ (Mentzer et al. 2023) and VAR's multi-scale VQVAE (Tian et al. 2024): image ``x_b3HW`` in
[-1, 1] → encoder → ``z_bdhw`` (d = the quantizer's code_dim, h = H / f) → quantizer → indices
and ``zq_bdhw`` → decoder → reconstruction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from arlab.config import build, validate_component
from arlab.errors import ConfigError
from arlab.quantizer.base import QuantOut
from arlab.registry import register, slot


def _validated(kind: str, node: Any) -> Any:
    return validate_component(kind, node)[1]


@register("tokenizer", "vqgan")
class VQGANTokenizer(nn.Module):
    """Conv encoder/decoder + any quantizer (VQGAN, LlamaGen VQ, FSQ, VAR msvq)."""

    @dataclass
    class Config:
        autoencoder: Any = slot("autoencoder", default="shapes-f4")  # encoder/decoder preset or node
        quantizer: Any = slot("quantizer", default="vq-512")  # quantizer preset or node
        image_size: int = 32  # training/tokenizing resolution (square)

        def downsample(self) -> int:
            ae = _validated("autoencoder", self.autoencoder)
            return 2 ** (len(ae.ch_mult) - 1)

        def grid_size(self) -> int:
            f = self.downsample()
            if self.image_size % f:
                raise ConfigError(
                    f"tokenizer.image_size={self.image_size} is not divisible by the autoencoder's "
                    f"downsampling factor {f} (ch_mult has {f.bit_length()} levels); use a multiple of {f}"
                )
            return self.image_size // f

        def token_scales(self) -> list[int]:
            """Side of each index map, from the config alone: [h] for single-scale quantizers, patch_nums for
            msvq (what :attr:`VQGANTokenizer.scales` will be)."""
            q = self.quantizer
            if isinstance(q, dict) and q.get("type") == "msvq":
                return [int(p) for p in q["patch_nums"]]
            return [self.grid_size()]

        def check(self, exp) -> None:
            h = self.grid_size()
            q = self.quantizer
            if q.get("type") == "msvq":
                pn = list(q["patch_nums"])
                if pn[-1] != h:
                    raise ConfigError(
                        f"tokenizer.quantizer.patch_nums={pn}: the last scale must equal the latent size "
                        f"{h} (image_size {self.image_size} / downsampling {self.downsample()})"
                    )
            if exp.has("data"):
                size = exp.tree["data"].get("image_size")
                if size is not None and size != self.image_size:
                    raise ConfigError(
                        f"data.image_size={size} but tokenizer.image_size={self.image_size}; they must match"
                    )

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.grid_size()
        self.quantizer = build("quantizer", cfg.quantizer, where="tokenizer.quantizer")
        self.autoencoder = build("autoencoder", cfg.autoencoder, code_dim=self.quantizer.code_dim,
                                 where="tokenizer.autoencoder")

    # ------------------------------------------------------------------------------ properties
    @property
    def codebook_size(self) -> int:
        return int(self.quantizer.codebook_size)

    @property
    def multiscale(self) -> bool:
        return bool(getattr(self.quantizer, "multiscale", False))

    @property
    def scales(self) -> list[int]:
        """Side of each index map: [h] for single-scale quantizers, patch_nums for msvq."""
        return list(self.quantizer.cfg.patch_nums) if self.multiscale else [self.grid]

    @property
    def tokens_per_image(self) -> int:
        return sum(p * p for p in self.scales)

    # ------------------------------------------------------------------------------ forward
    def encode(self, x_b3HW: Tensor) -> QuantOut:
        if x_b3HW.shape[-1] != self.cfg.image_size or x_b3HW.shape[-2] != self.cfg.image_size:
            raise ValueError(f"expected {self.cfg.image_size}x{self.cfg.image_size} images, got "
                             f"{tuple(x_b3HW.shape[-2:])}")
        return self.quantizer(self.autoencoder.encode(x_b3HW))

    def decode(self, zq_bdhw: Tensor) -> Tensor:
        return self.autoencoder.decode(zq_bdhw)

    def forward(self, x_b3HW: Tensor) -> tuple[Tensor, QuantOut]:
        q = self.encode(x_b3HW)
        return self.decode(q.zq_bdhw), q

    @torch.no_grad()
    def tokenize(self, x_b3HW: Tensor) -> Tensor | list[Tensor]:
        """Images → indices: (B, h, w), or per-scale [(B, p, p)] for multi-scale quantizers."""
        return self.encode(x_b3HW).indices

    @torch.no_grad()
    def detokenize(self, indices: Tensor | list[Tensor]) -> Tensor:
        """Indices → images (B, 3, H, W) in [-1, 1] (not clamped)."""
        return self.decode(self.quantizer.decode_indices(indices))

    # flat sequences, the form token shards store ------------------------------------------
    def flatten_indices(self, indices: Tensor | list[Tensor]) -> Tensor:
        """(B, h, w) or per-scale maps → (B, L) int64, scales concatenated, row-major."""
        if isinstance(indices, (list, tuple)):
            return torch.cat([i.flatten(1) for i in indices], dim=1)
        return indices.flatten(1)

    def unflatten_indices(self, tokens_bl: Tensor) -> Tensor | list[Tensor]:
        sizes = [p * p for p in self.scales]
        if tokens_bl.shape[1] != sum(sizes):
            raise ValueError(f"expected {sum(sizes)} tokens per image (scales {self.scales}), "
                             f"got {tokens_bl.shape[1]}")
        parts = torch.split(tokens_bl, sizes, dim=1)
        maps = [t.reshape(t.shape[0], p, p) for t, p in zip(parts, self.scales)]
        return maps if self.multiscale else maps[0]
