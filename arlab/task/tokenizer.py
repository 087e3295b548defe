"""``task/tokenizer``: trains a tokenizer (VQGAN recipe) as a LightningModule.

Generator loss (LlamaGen ``VQLoss`` / taming): ``rec_weight·rec + quant_weight·quantizer loss
+ perceptual_weight·perceptual + disc_weight·adapt·G_adv`` where ``rec`` is L1 or L2, the
perceptual net is pluggable and never downloaded, and the PatchGAN (hinge by default) joins at
``disc_start`` (before it, D is neither used nor trained, as LlamaGen's ``adopt_weight``). G and D
are stepped once per batch by one optimizer with two parameter groups, so ``global_step`` counts
batches. Logs: losses, PSNR, SSIM, codebook usage and perplexity over a window (not a batch),
and image grids of inputs next to reconstructions.

The checkpoint's hyper-parameters are the experiment's plain resolved config, so
:func:`arlab.tokenizer.load.load_tokenizer` rebuilds the tokenizer from the checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from arlab.config import build, check_range, validate_component
from arlab.errors import ConfigError
from arlab.metrics import CodebookUsage, psnr, ssim
from arlab.optim import MuonAdamW, check_strategy, muon_group, split_hidden
from arlab.registry import register
from arlab.schedules import warmup_cosine
from arlab.task.base import Task
from arlab.tokenizer import discriminator as D
from arlab.tokenizer.discriminator import PatchGAN, PatchGANConfig
from arlab.tokenizer.perceptual import PerceptualConfig, PerceptualLoss
from arlab.tokenizer.vqgan import VQGANTokenizer
from arlab.utils import atomic_write, pairs_grid, png_bytes

log = logging.getLogger("arlab.tokenizer")


@register("task", "tokenizer")
class TokenizerModule(Task):
    """Train the experiment's tokenizer: reconstruction + quantizer (+ perceptual, + PatchGAN) losses."""

    @dataclass
    class Config:
        optimizer: str = "adam"  # adam (LlamaGen, VQGAN), adamw, or muon (Muon on hidden convs, AdamW on the rest)
        lr: float = 2e-4  # peak learning rate after warm-up
        betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # VQGAN's; LlamaGen uses (0.9, 0.95)
        weight_decay: float = 0.0
        warmup_steps: int = 100  # linear warm-up steps
        lr_schedule: str = "constant"  # after warm-up: constant (LlamaGen) or cosine (to min_lr_ratio·lr)
        min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
        muon_lr: float = 0.02  # optimizer muon: peak learning rate of the hidden matrices (arlab.optim)
        muon_momentum: float = 0.95
        muon_weight_decay: float = 0.0
        grad_clip: float = 1.0  # max grad norm (0 disables)
        rec_loss: str = "l1"  # l1 or l2
        rec_weight: float = 1.0
        quant_weight: float = 1.0  # weight of the quantizer's own loss (codebook + commitment)
        perceptual_weight: float = 0.0  # 0 disables; needs perceptual_weights_path for vgg16
        perceptual_network: str = "vgg16"  # vgg16, a timm name, or 'random' (plumbing only)
        perceptual_weights_path: str = ""  # local weights file; arlab never downloads
        disc_weight: float = 0.0  # PatchGAN weight; 0 disables the discriminator
        disc_start: int = 2000  # step at which D starts training and G_adv joins
        disc_loss: str = "hinge"  # hinge or vanilla
        gen_loss: str = "hinge"  # hinge or non_saturating
        disc_norm: str = "group"  # batch (LlamaGen), group or none
        disc_lr_ratio: float = 1.0  # D learning rate = lr * ratio
        adaptive_disc_weight: bool = False  # VQGAN's |grad rec| / |grad G_adv| at the last layer
        usage_window: int = 200  # steps over which train codebook usage is counted
        log_images_every_n_steps: int = 500
        n_log_images: int = 16

        def __post_init__(self) -> None:
            choices = {"optimizer": ("adam", "adamw", "muon"), "lr_schedule": ("constant", "cosine"),
                       "rec_loss": ("l1", "l2"), "disc_loss": ("hinge", "vanilla"),
                       "gen_loss": ("hinge", "non_saturating"), "disc_norm": ("batch", "group", "none")}
            values = dataclasses.asdict(self)
            for key, valid in choices.items():
                if values[key] not in valid:
                    raise ConfigError(f"{key} {values[key]!r} is not one of {', '.join(valid)}")
            if len(self.betas) != 2:
                raise ConfigError(f"betas must be two numbers, got {self.betas}")
            for i, b in enumerate(self.betas):
                check_range(f"betas[{i}]", b, ge=0, lt=1)
            check_range("lr", self.lr, gt=0)
            check_range("muon_lr", self.muon_lr, gt=0)
            check_range("muon_momentum", self.muon_momentum, ge=0, lt=1)
            for key in ("weight_decay", "muon_weight_decay", "warmup_steps", "grad_clip", "rec_weight", "quant_weight",
                        "perceptual_weight",
                        "disc_weight", "disc_start", "disc_lr_ratio", "log_images_every_n_steps", "n_log_images"):
                check_range(key, values[key], ge=0)
            check_range("min_lr_ratio", self.min_lr_ratio, ge=0, le=1)
            check_range("usage_window", self.usage_window, ge=1)

        def check(self, exp) -> None:
            if not exp.has("tokenizer"):
                raise ConfigError("task 'tokenizer' needs a 'tokenizer' slot (e.g. tokenizer: shapes-vq)")
            check_strategy(self.optimizer, exp.tree.get("trainer", {}).get("strategy", "auto"))

    def __init__(self, cfg: Config | None = None, experiment: dict[str, Any] | None = None,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        if experiment is None:
            raise ConfigError("TokenizerModule needs the experiment config (experiment=...)")
        if cfg is None:  # rebuilt from a checkpoint's hyper-parameters
            cfg = validate_component("task", experiment["task"])[1]
        self.save_hyperparameters({"experiment": experiment})  # a plain dict: loads with weights_only
        self.cfg = cfg
        self.automatic_optimization = False
        self.tokenizer: VQGANTokenizer = build("tokenizer", experiment["tokenizer"])
        self.tokens_per_sample = self.tokenizer.tokens_per_image
        self.disc = None
        if cfg.disc_weight > 0:
            self.disc = PatchGAN(PatchGANConfig(norm=cfg.disc_norm))
        self.perceptual = None
        if cfg.perceptual_weight > 0:
            net = PerceptualLoss(PerceptualConfig(network=cfg.perceptual_network,
                                                  weights_path=cfg.perceptual_weights_path))
            # not a registered submodule: its frozen weights come from weights_path, not checkpoints
            object.__setattr__(self, "perceptual", net)
        self.train_usage = CodebookUsage(self.tokenizer.codebook_size)
        self.val_usage = CodebookUsage(self.tokenizer.codebook_size)
        self._val_images: tuple[Tensor, Tensor] | None = None
        self.last_val: dict[str, float] = {}
        self.last_train_usage: dict[str, float] = {}

    # ------------------------------------------------------------------------------ optim
    def configure_optimizers(self):
        c = self.cfg
        if c.optimizer == "muon":  # hidden convs on Muon; the rest and D on AdamW (decoupled decay, unlike adam's L2)
            hidden, rest = split_hidden(self.tokenizer)
            groups = [muon_group(hidden, c.muon_lr, c.muon_momentum, c.muon_weight_decay), {"params": rest, "lr": c.lr}]
        else:
            groups = [{"params": list(self.tokenizer.parameters()), "lr": c.lr}]
        if self.disc is not None:
            groups.append({"params": list(self.disc.parameters()), "lr": c.lr * c.disc_lr_ratio})
        params = [p for g in groups for p in g["params"]]
        fused = self.fused_optimizer(params) or None
        if c.optimizer == "muon":
            opt = MuonAdamW(groups, betas=tuple(c.betas), weight_decay=c.weight_decay, fused=fused)
        else:
            cls = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
            opt = cls(groups, betas=tuple(c.betas), weight_decay=c.weight_decay, fused=fused)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(c.warmup_steps, self._total_steps(),
                                                                     c.lr_schedule, c.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _total_steps(self) -> int:
        trainer = self._trainer
        return int(trainer.max_steps) if trainer is not None and trainer.max_steps > 0 else 0

    # ------------------------------------------------------------------------------ losses
    def _rec(self, xrec: Tensor, x: Tensor) -> Tensor:
        return F.l1_loss(xrec, x) if self.cfg.rec_loss == "l1" else F.mse_loss(xrec, x)

    def _disc_active(self) -> bool:
        return self.disc is not None and self.global_step >= self.cfg.disc_start

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        c = self.cfg
        opt = self.optimizers()
        sched = self.lr_schedulers()
        x = batch["image"]
        xrec, q = self.tokenizer(x)
        rec = self._rec(xrec, x)
        loss = c.rec_weight * rec + c.quant_weight * q.loss
        logs = {"train/rec": rec.detach(), "train/quant": q.loss.detach()}
        if self.perceptual is not None:
            p = self.perceptual.to(x.device)(xrec, x).mean()
            loss = loss + c.perceptual_weight * p
            logs["train/perceptual"] = p.detach()
        disc_on = self._disc_active()
        if disc_on:
            assert self.disc is not None
            fake = self.disc(xrec)
            g_adv = D.hinge_g_loss(fake) if c.gen_loss == "hinge" else D.non_saturating_g_loss(fake)
            w = torch.tensor(c.disc_weight, device=x.device)
            if c.adaptive_disc_weight:
                w = w * D.adaptive_weight(c.rec_weight * rec, g_adv, self.tokenizer.autoencoder.last_layer)
            loss = loss + w * g_adv
            logs["train/g_adv"] = g_adv.detach()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite tokenizer loss {loss.item()} at step {self.global_step} (batch {batch_idx}, "
                f"keys {batch.get('key', [])[:4]}...); the last good checkpoint is kept"
            )
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if disc_on:
            assert self.disc is not None
            for p_ in self.disc.parameters():  # G_adv must not train D
                p_.grad = None
            real, fake = self.disc(x.detach()), self.disc(xrec.detach())
            d_loss = D.hinge_d_loss(real, fake) if c.disc_loss == "hinge" else D.vanilla_d_loss(real, fake)
            self.manual_backward(d_loss)
            logs["train/d_loss"] = d_loss.detach()
            logs["train/logits_real"] = real.detach().mean()
            logs["train/logits_fake"] = fake.detach().mean()
        self.clip_grad_norm(opt, c.grad_clip)
        opt.step()
        sched.step()

        self.train_usage.update(q.indices)
        if (self.global_step + 1) % c.usage_window == 0:
            # window metrics go straight to the logger at their own step: through self.log they would be
            # re-logged (stale) at every later logging step until the next window closes
            self.train_usage.reduce()
            window = {"train/usage": self.train_usage.usage(), "train/perplexity": self.train_usage.perplexity()}
            self.train_usage.reset()
            if self.logger is not None and self.trainer.is_global_zero:
                self.logger.log_metrics(window, step=self.global_step)
            self.last_train_usage = window
        with torch.no_grad():
            logs["train/psnr"] = psnr(xrec.detach(), x).mean()
        logs["train/loss"] = loss.detach()
        for k, v in q.stats.items():
            if v.numel() == 1:
                logs[f"train/q_{k}"] = v.detach().float()
        self.log_dict(logs, prog_bar=False, batch_size=x.shape[0])
        self.log("rec", rec.detach(), prog_bar=True, logger=False, batch_size=x.shape[0])
        if c.log_images_every_n_steps and self.global_step % c.log_images_every_n_steps == 0:
            self._log_pairs("train/reconstructions", x, xrec)
        return loss.detach()

    # ------------------------------------------------------------------------------ validation
    def on_validation_epoch_start(self) -> None:
        self.val_usage.reset()
        self._val_images = None

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        xrec, q = self.tokenizer(x)
        xrec = xrec.float().clamp(-1, 1)
        b = x.shape[0]
        self.log_dict({"val/rec": self._rec(xrec, x), "val/psnr": psnr(xrec, x).mean(),
                       "val/ssim": ssim(xrec, x).mean(), "val/quant": q.loss},
                      batch_size=b, sync_dist=True, prog_bar=False)
        self.val_usage.update(q.indices)
        if self._val_images is None:
            self._val_images = (x[: self.cfg.n_log_images], xrec[: self.cfg.n_log_images])

    def on_validation_epoch_end(self) -> None:
        self.val_usage.reduce()
        usage, ppl = self.val_usage.usage(), self.val_usage.perplexity()
        self.log_dict({"val/usage": usage, "val/perplexity": ppl}, sync_dist=False, rank_zero_only=True)
        if self._val_images is not None:
            self._log_pairs("val/reconstructions", *self._val_images)
        m = self.trainer.callback_metrics
        if not self.trainer.sanity_checking:
            self.last_val_step = self.global_step
        self.last_val = {k: float(v) for k, v in m.items() if k.startswith("val/")}
        self.last_val.update({"val/usage": usage, "val/perplexity": ppl})

    def _log_pairs(self, tag: str, x: Tensor, xrec: Tensor) -> None:
        exp = self.tensorboard()
        if exp is None:
            return
        n = min(self.cfg.n_log_images, x.shape[0])
        exp.add_image(tag, pairs_grid(x[:n], xrec[:n]), self.global_step, dataformats="HWC")

    def flop_loss(self, batch: dict[str, Any]) -> Tensor:
        """Reconstruction + quantizer loss through the autoencoder and quantizer (the FLOP count's pass; the
        perceptual net and the discriminator are not in it)."""
        x = batch["image"]
        xrec, q = self.tokenizer(x)
        return self.cfg.rec_weight * self._rec(xrec, x) + self.cfg.quant_weight * q.loss

    def final_metrics(self) -> dict[str, float]:
        n = sum(p.numel() for p in self.tokenizer.parameters() if p.requires_grad)
        return {**self.last_train_usage, **self.last_val, "model/params": float(n)}

    def save_artifacts(self, run: Path) -> list[Path]:
        """``reconstructions.png``: validation inputs (odd columns) next to reconstructions (even)."""
        if self._val_images is None:
            return []
        path = Path(run) / "reconstructions.png"
        atomic_write(path, png_bytes(pairs_grid(*self._val_images)))
        return [path]
