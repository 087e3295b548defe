"""``conditioner/text``: caption conditioning, the caption's tokens before the image in one sequence
(Token-Shuffle's unified MLLM setting, Ma et al. 2025; LlamaGen t2i puts its text features before
the image the same way).

Tokenizer: UTF-8 bytes (256 ids, no vocabulary file, nothing to download) plus three specials:
``PAD`` (256), ``NULL`` (257, the null prompt for classifier-free guidance: no real caption contains
it, so it differs from every real prompt, the empty one included) and ``BOI`` (258, begin-of-image:
the last condition token, whose hidden state predicts the first image token). A caption of up to
``max_bytes`` bytes is *left*-padded to ``P = max_bytes + 1`` tokens: ``[PAD … PAD, bytes, BOI]``
(longer captions are cut to ``max_bytes`` bytes, counted in ``truncated``). Embeddings are
``Embedding(259, d)`` plus a learned position per prefix slot (the backbone gives condition tokens
the identity rotation). Padding keys are masked out of attention (``forward`` returns the
validity mask); text tokens are causal among themselves, as in a decoder-only MLLM.

The adaLN vector is the mean of the valid token embeddings. Caption dropout: a training caption
becomes the null prompt with probability ``dropout``. Captions missing from a dataset (CIFAR-10) are
made from the class name with ``template`` (``"a photo of a {}"``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from arlab.conditioner.base import Conditioner
from arlab.errors import ConfigError
from arlab.registry import register

log = logging.getLogger("arlab.conditioner")

PAD, NULL, BOI = 256, 257, 258
VOCAB = 259


@register("conditioner", "text")
class TextConditioner(Conditioner):
    """Byte-level caption prefix (left-padded, BOI last), padding mask, null prompt and caption dropout for CFG."""

    accepts_text = True

    @dataclass
    class Config:
        max_bytes: int = 64  # captions longer than this are cut (counted)
        dropout: float = 0.1  # probability of replacing a training caption by the null prompt
        template: str = ""  # caption for samples without one, from the class name, e.g. "a photo of a {}"

        def __post_init__(self) -> None:
            if self.max_bytes < 1:
                raise ConfigError(f"max_bytes {self.max_bytes} must be >= 1")
            if not 0 <= self.dropout < 1:
                raise ConfigError(f"dropout {self.dropout} must be in [0, 1)")
            if self.template and "{}" not in self.template:
                raise ConfigError(f"template {self.template!r} must contain '{{}}' (the class name)")

    def __init__(self, cfg: Config, dim: int, num_classes: int = 0):
        super().__init__()
        self.cfg = cfg
        self.prefix_len = cfg.max_bytes + 1
        self.embedding = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.zeros(self.prefix_len, dim))
        nn.init.normal_(self.embedding.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.truncated = 0

    # ------------------------------------------------------------------------------ tokenizer
    def encode(self, captions: list[str]) -> Tensor:
        """Captions → (B, P) int64 ids ``[PAD …, bytes, BOI]``."""
        out = torch.full((len(captions), self.prefix_len), PAD, dtype=torch.long)
        out[:, -1] = BOI
        for i, text in enumerate(captions):
            if not isinstance(text, str):
                raise TypeError(f"caption {i} is {type(text).__name__}, not a string")
            ids = list(text.encode("utf-8"))
            if len(ids) > self.cfg.max_bytes:
                if self.truncated == 0:
                    log.warning("caption of %d bytes cut to max_bytes=%d: %r", len(ids), self.cfg.max_bytes, text)
                self.truncated += 1
                ids = ids[: self.cfg.max_bytes]
            if ids:
                out[i, -1 - len(ids):-1] = torch.tensor(ids)
        return out

    def decode(self, ids_bp: Tensor) -> list[str]:
        """Ids → captions (the null prompt decodes to ``"<null>"``)."""
        out = []
        for row in ids_bp.tolist():
            if NULL in row:
                out.append("<null>")
            else:
                out.append(bytes(t for t in row if t < 256).decode("utf-8", errors="replace"))
        return out

    def from_batch(self, batch: dict, classes: list[str] | None = None) -> Tensor:
        captions = list(batch["caption"])
        for i, c in enumerate(captions):
            if not c:
                keys = batch.get("key") or [None] * len(captions)
                captions[i] = self._from_class(int(batch["label"][i]), classes, keys[i])
        return self.encode(captions).to(batch["label"].device)

    def from_labels(self, labels_b: Tensor, classes: list[str] | None = None) -> Tensor:
        """Prompts for classes ``labels_b`` from ``template`` (for datasets without captions)."""
        return self.encode([self._from_class(int(y), classes) for y in labels_b]).to(labels_b.device)

    def _from_class(self, label: int, classes: list[str] | None, key: str | None = None) -> str:
        where = f" (sample {key})" if key else ""
        if not self.cfg.template:
            raise ValueError(f"a sample has no caption{where} and conditioner.template is empty: set "
                             "conditioner.template (e.g. 'a photo of a {}') to caption by class name")
        if not classes or not 0 <= label < len(classes):
            raise ValueError(f"a sample has no caption{where} and its label {label} has no class name "
                             f"(classes: {classes}) to fill conditioner.template")
        return self.cfg.template.format(classes[label])

    # ------------------------------------------------------------------------------ conditioner interface
    def null_like(self, ids_bp: Tensor) -> Tensor:
        null = torch.full_like(ids_bp, PAD)
        null[:, -2] = NULL
        null[:, -1] = BOI
        return null

    def check(self, ids_bp: Tensor) -> None:
        if ids_bp.ndim != 2 or ids_bp.shape[1] != self.prefix_len:
            raise ValueError(f"text conditions are (B, {self.prefix_len}) token ids (conditioner.encode), "
                             f"got shape {tuple(ids_bp.shape)}")
        if bool(((ids_bp < 0) | (ids_bp >= VOCAB)).any()) or bool((ids_bp[:, -1] != BOI).any()):
            raise ValueError("text condition ids out of range or not ending with BOI; build them with encode()")

    def drop(self, ids_bp: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.cfg.dropout <= 0:
            return ids_bp
        u = torch.rand(ids_bp.shape[0], device=ids_bp.device, generator=generator)
        return torch.where((u < self.cfg.dropout)[:, None], self.null_like(ids_bp), ids_bp)

    def forward(self, ids_bp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, P) ids → (prefix (B, P, d), adaLN vector (B, d), valid keys (B, P) bool)."""
        valid = ids_bp != PAD
        e = self.embedding(ids_bp) + self.pos
        vec = (e * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        return e, vec, valid
