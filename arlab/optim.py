"""Muon on the hidden weight matrices and AdamW on the rest, as one optimizer.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks"; torch ships it as
``torch.optim.Muon``): SGD momentum (Nesterov) whose update is replaced by its nearest semi-orthogonal
matrix, from five Newton-Schulz iterations, scaled by ``sqrt(max(1, fan_out / fan_in))`` ("original").
It is meant for the 2-D weights of hidden layers; embeddings, the output head, norm gains and biases stay on
AdamW. A convolution's kernel (O, I, kh, kw) is orthogonalised as the (O, I·kh·kw) matrix (the CIFAR-10
speed runs' use of Muon on conv filters).

Lightning's automatic optimisation drives one optimizer, and ``torch.optim.Muon`` refuses non-2-D tensors,
so :class:`MuonAdamW` holds both kinds of parameter group (``group["muon"]``) and steps each with its own
rule: the Muon groups as ``torch.optim.Muon`` does (with the Newton-Schulz iteration in ``ns_dtype``; torch's
is bf16), the AdamW groups with torch's AdamW function (its fused kernel where :func:`arlab.task.base.fused_ok`
allows). One ``LambdaLR`` schedules both (it scales every group's ``initial_lr``). ``tests/test_optim.py``
checks each half against ``torch.optim.Muon`` and ``torch.optim.AdamW``.

Which weights are hidden is a component's decision, not a name's: :func:`split_hidden` puts every ≥ 2-D weight
of an ``nn.Linear`` or ``nn.Conv2d`` on Muon unless the component marks it with :func:`adamw_only` (the
generator's vocabulary head; a tokenizer's first and last convolutions).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.optim.adamw as _adamw
from torch import Tensor, nn

from arlab.errors import ConfigError

_ADAMW_ONLY = "_arlab_adamw_only"
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan's quintic (torch.optim.Muon's default)


def adamw_only(param: nn.Parameter) -> nn.Parameter:
    """Mark ``param`` as an input or output layer's weight that Muon must leave to AdamW; returns it."""
    setattr(param, _ADAMW_ONLY, True)
    return param


def is_hidden_matrix(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """Whether Muon updates ``param`` (``module``'s parameter ``name``): a ≥ 2-D weight of a linear or convolution
    layer not marked :func:`adamw_only`."""
    return (isinstance(module, (nn.Linear, nn.Conv2d)) and name == "weight" and param.ndim >= 2
            and not getattr(param, _ADAMW_ONLY, False))


def newton_schulz(g_mn: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The quintic Newton-Schulz iteration towards the orthogonal factor ``U Vᵀ`` of ``g_mn`` (M, N), computed in
    ``dtype`` on the wide orientation (``torch.optim.Muon``'s ``_zeropower_via_newtonschulz``); returns (M, N) in
    ``dtype``."""
    a, b, c = NS_COEFFICIENTS
    x = g_mn.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups with ``muon=True``, AdamW on the others (see the module docstring).

    Group keys: ``lr``, ``weight_decay`` (decoupled: ``θ ← θ − lr·wd·θ`` in both rules); Muon: ``momentum``,
    ``nesterov``, ``ns_steps``; AdamW: ``betas``, ``eps``, ``fused`` (AdamW's fused kernel; None or False: off).
    ``ns_dtype``: the Newton-Schulz dtype (None: :func:`ns_dtype_for` the Muon parameters).
    """

    def __init__(self, params: list[dict[str, Any]], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_dtype: torch.dtype | None = None, fused: bool | None = None) -> None:
        # ``fused`` is a group key, as in torch's AdamW: on load_state_dict torch then moves each AdamW "step" onto its
        # parameter's device (a DDP rank's, or CUDA for a run begun on CPU), which the fused kernel needs
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, muon=False, fused=bool(fused))
        super().__init__(params, defaults)
        muon = [p for g in self.param_groups if g["muon"] for p in g["params"]]
        self.ns_dtype = ns_dtype or ns_dtype_for(muon)  # None: bf16 on CUDA, float32 elsewhere

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["muon"] and any(p.ndim < 2 for p in group["params"]):
            raise ValueError("a Muon group holds a tensor with fewer than 2 dimensions; it belongs to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon if group["muon"] else self._adamw)(group, params)
        return loss

    def _muon(self, group: dict[str, Any], params: list[Tensor]) -> None:
        lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mom)  # the EMA form (torch's and Jordan's); the sum form differs only in scale
            update = p.grad.lerp(buf, mom) if group["nesterov"] else buf
            m = update.reshape(update.shape[0], -1)
            o = newton_schulz(m, group["ns_steps"], dtype=self.ns_dtype)
            p.mul_(1 - lr * wd)
            p.add_(o.view_as(p).to(p.dtype), alpha=-lr * math.sqrt(max(1.0, m.shape[0] / m.shape[1])))

    def _adamw(self, group: dict[str, Any], params: list[Tensor]) -> None:
        fused = group["fused"]
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = (torch.zeros((), dtype=torch.float32, device=p.device) if fused
                                 else torch.tensor(0.0, dtype=torch.float32))
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        _adamw.adamw(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps, fused=fused or None,
                     amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                     weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def split_hidden(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``module``'s trainable parameters, in ``parameters()`` order, split into the hidden matrices
    (:func:`is_hidden_matrix`: Muon's) and the rest (AdamW's)."""
    hidden = {id(p) for mod in module.modules() for name, p in mod.named_parameters(recurse=False)
              if is_hidden_matrix(mod, name, p)}
    params = [p for p in module.parameters() if p.requires_grad]
    return [p for p in params if id(p) in hidden], [p for p in params if id(p) not in hidden]


def muon_group(params: list[nn.Parameter], lr: float, momentum: float, weight_decay: float) -> dict[str, Any]:
    """A :class:`MuonAdamW` parameter group on Muon."""
    return {"params": params, "lr": lr, "momentum": momentum, "weight_decay": weight_decay, "muon": True,
            "name": "muon"}  # TensorBoard: lr-MuonAdamW/muon


def check_strategy(optimizer: str, strategy: Any) -> None:
    """Muon orthogonalises whole matrices: refuse a sharding strategy (FSDP, DeepSpeed) that hands the optimizer
    shards of them (its update would be a different matrix's). DDP steps whole replicas and is fine."""
    name = str(strategy).lower()
    if optimizer == "muon" and any(k in name for k in ("fsdp", "deepspeed")):
        raise ConfigError(f"task.optimizer=muon with trainer.strategy={strategy!r}: Muon needs whole weight matrices "
                          "and this strategy shards them; use ddp (or auto), or task.optimizer=adamw")


def ns_dtype_for(params: list[Tensor]) -> torch.dtype:
    """The Newton-Schulz dtype: bf16 on CUDA (Jordan's, torch's), float32 elsewhere. On a CPU without native bf16 the
    quickstart generator's 28 matrices take 170 ms in bf16 against 73 ms in float32 per step (2 threads)."""
    return torch.bfloat16 if params and all(p.is_cuda for p in params) else torch.float32
