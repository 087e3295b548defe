"""A perceptual (LPIPS-style) loss with a pluggable, frozen feature network that is never downloaded.

LPIPS (Zhang et al. 2018), as VQGAN (taming) and LlamaGen (``tokenizer_image/lpips.py``) use it,
compares VGG16 activations of the two images. Both call ``vgg16(pretrained=True)``, which downloads
the ImageNet weights; arlab never downloads, so the weights come from a local ``weights_path``
(see the ConfigError :func:`_need_weights` raises for where to get and put them).

Distance, per sample (images ``x_b3HW`` in [-1, 1], mapped to [0, 1] and normalised with the
ImageNet mean/std inside)::

    d(x, y) = Σ_layers  mean_{h,w}  Σ_c  w_c · (f̂_c(x) − f̂_c(y))²,   f̂ = f / (‖f‖_channels + 1e-10)

with uniform channel weights w_c = 1 unless ``heads_path`` names a file of LPIPS linear heads
(one non-negative weight per channel per layer, e.g. ``lpips/weights/v0.1/vgg.pth`` from the lpips
wheel, keys ``lin0.model.1.weight`` … of shape (1, C, 1, 1)). Only with VGG16 ImageNet weights *and*
those heads is the value LPIPS-VGG; with uniform weights it is the "lpips=False" variant
(a normalised feature distance). Networks:

* ``vgg16``: torchvision's VGG16 ``features`` (built with ``weights=None``) loaded from
  ``weights_path``; taps ``relu1_2, relu2_2, relu3_3, relu4_3, relu5_3`` by default (LPIPS).
* ``random``: a tiny in-repo conv net with fixed-seed random weights, for plumbing tests only —
  its values mean nothing and ``comparable`` is False.
* any timm model name: ``timm.create_model(name, pretrained=False, features_only=True)`` loaded
  from ``weights_path`` (a state dict of the full model or of the features net); taps are its
  feature stages (``layers`` by index "0", "1", … or by module name, e.g. "layer2").

The feature network is frozen (``requires_grad_(False)``) and always in eval mode, whatever
``.train()`` is called with; gradients flow to the input images only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from arlab.errors import ConfigError, did_you_mean

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_SEED = 0

# torchvision vgg16().features index of each ReLU output (conv{block}_{i} → relu{block}_{i})
VGG16_RELUS = {"relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11, "relu3_2": 13,
               "relu3_3": 15, "relu4_1": 18, "relu4_2": 20, "relu4_3": 22, "relu5_1": 25, "relu5_2": 27,
               "relu5_3": 29}
VGG16_LPIPS_LAYERS = ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"]
VGG16_FILE = "vgg16-397923af.pth"  # torchvision's ImageNet VGG16 weights (sha256 prefix in the name)


@dataclass
class PerceptualConfig:
    network: str = "vgg16"  # vgg16, random (plumbing tests only, non-comparable) or a timm model name
    weights_path: str = ""  # local state dict of the network; arlab never downloads (not needed for random)
    layers: list[str] | None = None  # feature taps; None = LPIPS's five for vgg16, all stages otherwise
    heads_path: str = ""  # optional LPIPS linear heads (per-channel weights); "" = uniform weights

    def __post_init__(self) -> None:
        if not self.network:
            raise ConfigError("network='': give vgg16, random or a timm model name")
        if self.layers is not None and not list(self.layers):
            raise ConfigError("layers=[]: give at least one layer, or None for the network's default taps")


def default_weights_dir() -> Path:
    """Suggested home of weight files: ``$ARLAB_CACHE/weights`` (default ``./.cache/arlab/weights``)."""
    return Path(os.environ.get("ARLAB_CACHE", os.path.join(".cache", "arlab"))) / "weights"


def _need_weights(cfg: PerceptualConfig) -> ConfigError:
    where = default_weights_dir()
    if cfg.network == "vgg16":
        what = (f"torchvision's ImageNet VGG16 state dict ({VGG16_FILE}, from "
                f"https://download.pytorch.org/models/{VGG16_FILE} on a machine with internet access)")
        file = where / VGG16_FILE
    else:
        what = f"a state dict of timm's '{cfg.network}' (torch.save(model.state_dict(), path))"
        file = where / f"{cfg.network}.pth"
    problem = ("is empty" if not cfg.weights_path
               else f"'{cfg.weights_path}' does not exist")
    return ConfigError(
        f"perceptual network '{cfg.network}' needs local weights but weights_path {problem}. arlab never "
        f"downloads weights: put {what} at {file} and set weights_path: {file} (the tokenizer task's "
        "perceptual_weights_path), or use network: random for plumbing tests (non-comparable values)"
    )


def _load_state_dict(path: str) -> dict[str, Tensor]:
    try:
        sd: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise ConfigError(f"weights_path '{path}' could not be read as a torch state dict: {e}") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ConfigError(f"weights_path '{path}' holds a {type(sd).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, Tensor)}


class _SequentialTaps(nn.Module):
    """Runs ``layers`` in order up to the last tap; returns the outputs at ``taps`` (indices)."""

    def __init__(self, layers: nn.Sequential, taps: list[int]):
        super().__init__()
        self.layers = layers[: max(taps) + 1]
        self.taps = list(taps)

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return [out[sorted(self.taps).index(t)] for t in self.taps]


class _TimmTaps(nn.Module):
    """A timm ``features_only`` net; returns the stages at ``taps`` (indices into its outputs)."""

    def __init__(self, model: nn.Module, taps: list[int]):
        super().__init__()
        self.model = model
        self.taps = list(taps)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.model(x)
        return [feats[t] for t in self.taps]


def _random_net() -> tuple[nn.Sequential, dict[str, int], list[int]]:
    """Three conv+ReLU stages (16, 32, 64 channels; strides 1, 2, 2) with seed-``RANDOM_SEED`` weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        net = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        )
    names = {"0": 1, "1": 3, "2": 5}
    return net, names, [16, 32, 64]


def _vgg16_features() -> nn.Sequential:
    """torchvision VGG16 ``features`` without weights (same modules as ``vgg16(weights=None).features``)."""
    from torchvision.models import vgg

    try:
        feats = vgg.make_layers(vgg.cfgs["D"], batch_norm=False)
    except (AttributeError, KeyError, TypeError):  # torchvision internals moved: build the whole model
        feats = vgg.vgg16(weights=None).features
    for m in feats:
        if isinstance(m, nn.ReLU):
            m.inplace = False  # taps are kept while later layers run
    return feats


def _pick(layers: list[str] | None, names: dict[str, int], default: list[str], network: str) -> list[int]:
    chosen = list(layers) if layers is not None else default
    out = []
    for name in chosen:
        key = str(name)
        if key not in names:
            raise ConfigError(
                f"layers: '{key}' is not a layer of perceptual network '{network}'."
                f"{did_you_mean(key, names)} Valid layers: {', '.join(names)}"
            )
        out.append(names[key])
    return out


class PerceptualLoss(nn.Module):
    """LPIPS-style distance between image batches (B, 3, H, W) in [-1, 1] → (B,) per-sample distances.

    ``comparable`` is True when pretrained weights were loaded from ``weights_path`` (values can be
    compared across runs using the same file), False for the ``random`` plumbing network.
    """

    def __init__(self, cfg: PerceptualConfig | None = None):
        super().__init__()
        cfg = cfg or PerceptualConfig()
        self.cfg = cfg
        net = cfg.network
        if net == "random":
            layers, names, channels = _random_net()
            taps = _pick(cfg.layers, names, list(names), net)
            self.net: nn.Module = _SequentialTaps(layers, taps)
            self.channels = [channels[list(names.values()).index(t)] for t in taps]
            self._comparable = False
        elif net == "vgg16":
            path = self._weights_file(cfg)
            feats = _vgg16_features()
            sd = _load_state_dict(path)
            if any(k.startswith("features.") for k in sd):
                sd = {k.removeprefix("features."): v for k, v in sd.items() if k.startswith("features.")}
            missing, _ = feats.load_state_dict(sd, strict=False)
            if missing:
                raise ConfigError(
                    f"weights_path '{path}' is not a torchvision VGG16 state dict: missing {len(missing)} "
                    f"keys such as {missing[:3]} (expected 'features.0.weight', …, as in {VGG16_FILE})"
                )
            taps = _pick(cfg.layers, VGG16_RELUS, VGG16_LPIPS_LAYERS, net)
            self.net = _SequentialTaps(feats, taps)
            convs = [m.out_channels for m in feats if isinstance(m, nn.Conv2d)]
            relu_idx = sorted(VGG16_RELUS.values())
            self.channels = [convs[relu_idx.index(t)] for t in taps]
            self._comparable = True
        else:
            model = self._timm_model(cfg)
            stages = model.feature_info.module_name()  # returned stages (len(feature_info) may count more)
            names = {str(i): i for i in range(len(stages))}
            names.update({n: i for i, n in enumerate(stages)})
            taps = _pick(cfg.layers, names, [str(i) for i in range(len(stages))], net)
            self.net = _TimmTaps(model, taps)
            self.channels = [model.feature_info.channels()[t] for t in taps]
            self._comparable = True

        self.net.requires_grad_(False)
        self.net.eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.n_heads = 0  # LPIPS linear heads, buffers head0, head1, … (one per layer) when heads_path is set
        if cfg.heads_path:
            heads = self._load_heads(cfg.heads_path)
            for i, h in enumerate(heads):
                self.register_buffer(f"head{i}", h, persistent=False)
            self.n_heads = len(heads)

    # ------------------------------------------------------------------------------ building
    @staticmethod
    def _weights_file(cfg: PerceptualConfig) -> str:
        if not cfg.weights_path or not Path(cfg.weights_path).is_file():
            raise _need_weights(cfg)
        return cfg.weights_path

    @staticmethod
    def _timm_model(cfg: PerceptualConfig) -> nn.Module:
        import timm

        if not timm.is_model(cfg.network):
            raise ConfigError(
                f"network='{cfg.network}' is neither vgg16, random nor a timm model."
                f"{did_you_mean(cfg.network, timm.list_models())} (list them with timm.list_models())"
            )
        path = PerceptualLoss._weights_file(cfg)
        model = timm.create_model(cfg.network, pretrained=False, features_only=True)
        sd = _load_state_dict(path)
        target = model.state_dict()
        remapped = {}
        for k, v in sd.items():  # full-model keys ("stages.0.x") → features-net keys ("stages_0.x")
            parts = k.split(".")
            cands = [k, "model." + k] + ["_".join(parts[: i + 1]) + "." + ".".join(parts[i + 1:])
                                        for i in range(1, len(parts) - 1)]
            hit = next((c for c in cands if c in target), None)
            if hit is not None:
                remapped[hit] = v
        missing = [k for k in target if k not in remapped]
        if missing:
            raise ConfigError(
                f"weights_path '{path}' does not fit timm's '{cfg.network}': missing {len(missing)} keys "
                f"such as {missing[:3]}"
            )
        model.load_state_dict(remapped)
        return model

    def _load_heads(self, path: str) -> list[Tensor]:
        if not Path(path).is_file():
            raise ConfigError(f"heads_path '{path}' does not exist (LPIPS linear heads, e.g. the lpips "
                              "wheel's lpips/weights/v0.1/vgg.pth); leave it empty for uniform layer weights")
        sd = _load_state_dict(path)

        def order(key: str) -> list[Any]:
            return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]

        heads = [sd[k].detach().float().reshape(-1) for k in sorted(sd, key=order)]
        if [h.numel() for h in heads] != self.channels:
            raise ConfigError(
                f"heads_path '{path}': per-layer weights of sizes {[h.numel() for h in heads]} do not match "
                f"the channels {self.channels} of the layers {self.cfg.layers or 'default'}"
            )
        return heads

    # ------------------------------------------------------------------------------ use
    @property
    def comparable(self) -> bool:
        """False for the random plumbing network: its values mean nothing outside tests."""
        return self._comparable

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.net.eval()  # frozen feature net: BatchNorm statistics / dropout never change
        return self

    def features(self, x_b3HW: Tensor) -> list[Tensor]:
        """Images in [-1, 1] → the tapped feature maps [(B, C_l, H_l, W_l)]."""
        x = ((x_b3HW + 1) / 2 - self.mean.to(x_b3HW.dtype)) / self.std.to(x_b3HW.dtype)
        return self.net(x)

    def forward(self, x_b3HW: Tensor, y_b3HW: Tensor) -> Tensor:
        """(B, 3, H, W), (B, 3, H, W) in [-1, 1] → (B,) distances (0 for identical images)."""
        if x_b3HW.shape != y_b3HW.shape:
            raise ValueError(f"perceptual loss inputs differ in shape: {tuple(x_b3HW.shape)} vs "
                             f"{tuple(y_b3HW.shape)}")
        b = x_b3HW.shape[0]
        feats = self.features(torch.cat([x_b3HW, y_b3HW]))
        total = x_b3HW.new_zeros(b, dtype=torch.float32)
        for i, f in enumerate(feats):
            f = f.float()
            f = f / (f.norm(dim=1, keepdim=True) + 1e-10)
            diff = (f[:b] - f[b:]).square()  # (B, C, h, w)
            if self.n_heads:
                diff = diff * getattr(self, f"head{i}").view(1, -1, 1, 1)
            total = total + diff.sum(dim=1).mean(dim=(1, 2))
        return total
