"""Layers shared by components (attention, norms, residual MLPs) and the weight-decay declaration.

Weight decay: a parameter that must not be decayed says so itself with :func:`no_weight_decay`
(position and level embeddings, a Mamba's ``A_log``/``D``/``dt`` bias); :func:`decay_groups` puts every
parameter with fewer than 2 dimensions (norm gains, biases) or so marked in the no-decay group. Names
play no part, so a new component's embeddings are exempt when, and only when, it marks them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_NO_DECAY = "_arlab_no_weight_decay"
_HALF = (torch.bfloat16, torch.float16)


def attention(q_bhld: Tensor, k_bhsd: Tensor, v_bhsd: Tensor, mask: Tensor | None = None,
              causal: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` (B, H, L, D) × (B, H, S, D) → (B, H, L, D), ``mask`` (L, S) or
    broadcastable: boolean (True = may attend) or float (added to the scores), as in SDPA.

    On CPU, bf16/fp16 inputs (bf16 autocast) are attended in float32 and the output is cast back: torch
    2.14's CPU flash-attention kernel is several times slower forward + backward in bf16 than in float32 at
    arlab's shapes (the shapes generator's (64, 4, 17, 48) causal call: 18.4 ms against 3.1 ms with the casts),
    enough to make a bf16 generator step slower than float32 (``benchmarks/bench_precision.py
    shapes/quickstart``: 0.206 s bf16 with bf16 attention, 0.170 s float32, 0.138 s bf16 with this). Autocast
    is off inside, or it would cast the inputs back to bf16. GPUs are unchanged.
    """
    if q_bhld.device.type == "cpu" and q_bhld.dtype in _HALF:
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q_bhld.float(), k_bhsd.float(), v_bhsd.float(),
                                                 attn_mask=mask.float() if mask is not None and mask.dtype in _HALF
                                                 else mask, is_causal=causal)
        return out.to(q_bhld.dtype)
    return F.scaled_dot_product_attention(q_bhld, k_bhsd, v_bhsd, attn_mask=mask, is_causal=causal)


def no_weight_decay(param: nn.Parameter) -> nn.Parameter:
    """Mark ``param`` as exempt from weight decay; returns it (``self.pos = no_weight_decay(nn.Parameter(...))``)."""
    setattr(param, _NO_DECAY, True)
    return param


def is_decayed(param: nn.Parameter) -> bool:
    """Whether AdamW's weight decay applies: ≥ 2-D and not marked with :func:`no_weight_decay`."""
    return param.ndim >= 2 and not getattr(param, _NO_DECAY, False)


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups over the trainable parameters of ``module``, in ``named_parameters`` order:
    decayed (``weight_decay``) and exempt (0)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if is_decayed(p)], "weight_decay": weight_decay},
            {"params": [p for p in params if not is_decayed(p)], "weight_decay": 0.0}]


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of ``k`` that is ≥ ``n`` (LlamaGen ``find_multiple``)."""
    return n if n % k == 0 else n + k - n % k


class RMSNorm(nn.Module):
    """``x · rsqrt(mean(x²) + eps) · w``, computed in float32 (Llama / LlamaGen); ``affine=False``: no ``w``."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()
        return y.type_as(x)


class ResidualMLP(nn.Module):
    """``x + W2 · GELU(W1 · RMSNorm(x))``, W2 zero-initialised (starts as the identity)."""

    def __init__(self, dim: int, ratio: float):
        super().__init__()
        hidden = int(dim * ratio)
        self.norm = RMSNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))
