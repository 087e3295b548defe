"""``features/classifier``: penultimate features and class logits of a small CNN trained by ``task/classifier``.

The CPU-sized feature network: at the data's own resolution (32 px for shapes and CIFAR-10) it scores
thousands of images in seconds, so FID/KID/precision-recall on a trained classifier's features run in
minutes on a CPU where Inception at 299 px needs about half an hour per 10,000 images. Its numbers are
comparable only with themselves (same checkpoint, same reference): the ``identity`` includes a hash of
the checkpoint file.

:class:`SmallCNN`: ``len(widths)`` blocks of (3×3 conv → BN → ReLU) × ``depth`` → 2×2 max-pool, a global average
pool, ``Linear(widths[-1], feature_dim)`` → ReLU (the **features**), dropout, ``Linear(feature_dim,
classes)`` (the **logits**). The checkpoint (``arlab train shapes/classifier``) carries the network's
arguments in its hyper-parameters (``net``), so nothing else is needed to rebuild it.

Preprocessing: uint8 → ``x / 127.5 − 1`` (the data modules' range); images of another size than the
classifier was trained at are resized to it (bilinear, antialiased) first.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arlab.errors import ConfigError
from arlab.features.base import FeatureNet, file_sha1
from arlab.features.inception import pick_device
from arlab.registry import register
from arlab.rundir import read_task_checkpoint


class SmallCNN(nn.Module):
    """Conv blocks → global average pool → features (``feature_dim``, after ReLU) → class logits."""

    def __init__(self, num_classes: int, widths: list[int] | tuple[int, ...] = (32, 64, 128), feature_dim: int = 128,
                 dropout: float = 0.1, image_size: int = 32, depth: int = 2):
        super().__init__()
        self.args = {"num_classes": int(num_classes), "widths": [int(w) for w in widths], "depth": int(depth),
                     "feature_dim": int(feature_dim), "dropout": float(dropout), "image_size": int(image_size)}
        layers: list[nn.Module] = []
        cin = 3
        for w in widths:
            for i in range(depth):
                c = cin if i == 0 else w
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            layers.append(nn.MaxPool2d(2))
            cin = w
        self.trunk = nn.Sequential(*layers)
        self.proj = nn.Linear(cin, feature_dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [-1, 1] → (features (B, feature_dim), logits (B, classes))."""
        h = self.trunk(x).mean(dim=(2, 3))
        feats = F.relu(self.proj(h))
        return feats, self.head(self.drop(feats))


@functools.lru_cache(maxsize=4)
def _load(path: str, size: int, mtime: float) -> tuple[SmallCNN, dict[str, Any], str]:
    ckpt, hp = read_task_checkpoint(path, "classifier")
    args = hp.get("net")
    if not isinstance(args, dict):
        raise ConfigError(f"classifier checkpoint '{path}' has no 'net' hyper-parameters (made by an older arlab?)")
    net = SmallCNN(**args)
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state, strict=True)
    return net.eval(), dict(hp.get("meta") or {}), file_sha1(path)


@register("features", "classifier")
class ClassifierFeatures(FeatureNet):
    """Penultimate features and logits of a small CNN trained by task/classifier (fast on a CPU)."""

    has_logits = True

    @dataclass
    class Config:
        checkpoint: str = "runs/shapes/classifier/checkpoints/last.ckpt"  # a task/classifier checkpoint
        device: str = "auto"  # auto (cuda when available), cpu, cuda, ...

    def __init__(self, cfg: Config | None = None):
        self.cfg = cfg or ClassifierFeatures.Config()
        path = self.cfg.checkpoint
        if not os.path.isfile(path):
            raise ConfigError(f"classifier checkpoint '{path}' does not exist: train one first "
                              "(arlab train shapes/classifier, or cifar10/classifier) or set features.checkpoint")
        st = os.stat(path)
        self._net, self.meta, sha1 = _load(os.path.abspath(path), st.st_size, st.st_mtime)
        self._id = f"classifier:{sha1[:12]}"
        self.device = pick_device(self.cfg.device)

    @property
    def dim(self) -> int:
        return int(self._net.args["feature_dim"])

    @property
    def image_size(self) -> int:
        return int(self._net.args["image_size"])

    @property
    def classes(self) -> list[str]:
        """Class names in logit order (from the training data's manifest)."""
        return list(self.meta.get("classes", []))

    @property
    def preprocessing(self) -> str:
        return f"uint8 -> x/127.5-1; other sizes resized to {self.image_size}px (torch bilinear, antialias)"

    def identity(self) -> str:
        return self._id

    def extract(self, images_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        net = self._net.to(self.device)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
            if x.shape[-2:] != (self.image_size, self.image_size):
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                                  antialias=True)
            feats, logits = net(x)
        return feats.double().cpu().numpy(), logits.double().cpu().numpy()
