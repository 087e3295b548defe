"""``task/generator``: trains the AR generator (raster, Token-Shuffle, VAR, NAR, ...) on token shards.

AdamW (weight decay on ≥2-D weights not marked exempt, :mod:`arlab.layers`) with warm-up and cosine
decay; bf16-mixed on GPU via ``trainer.precision``. Logs ``train/loss``, ``train/ce``,
per-window-position CE (``train/ce_pos{k}``, Token-Shuffle), per-scale CE (VAR), tokens/s and
images/s, validation CE, and every ``sample_every_n_steps`` a grid of samples decoded by the frozen
tokenizer. After training, :meth:`GeneratorModule.evaluate` draws ``eval_samples`` images (balanced
classes) and scores them with the ``eval_metrics`` (``metric/*``). The global RNG is reseeded from
(seed, step, rank) before every step, so a resumed run reproduces the uninterrupted losses (data
position and optimizer state come from the checkpoint).

The tokenizer is an upstream run (:meth:`GeneratorModule.upstream`): ``arlab train`` trains
``tokenizer_experiment`` into ``tokenizer_ckpt``'s run first when that checkpoint does not exist.
Assembly and loading without Lightning: :mod:`arlab.generator.build`; sampling to files:
:mod:`arlab.generator.sample`; scoring: :mod:`arlab.generator.evaluate`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from arlab.backbone.base import check_serves
from arlab.config import build, check_range, load_experiment, resolve_node, validate_component
from arlab.data.stream import sample_seed
from arlab.data.tokens import TokenDataModule
from arlab.errors import ConfigError
from arlab.generator.build import generator_from_meta
from arlab.generator.evaluate import eval_conditions, score
from arlab.generator.layout import Layout
from arlab.generator.sample import generate_images
from arlab.generator.sampling import check_schedule
from arlab.optim import check_strategy
from arlab.registry import get, register
from arlab.rundir import read_task_checkpoint
from arlab.task.base import Task, Upstream
from arlab.tokenizer.load import load_tokenizer
from arlab.tokenizer.vqgan import VQGANTokenizer
from arlab.utils import atomic_write, image_grid, png_bytes

log = logging.getLogger("arlab.generator")


@register("task", "generator")
class GeneratorModule(Task):
    """Trains an AR generator (order, Token-Shuffle window, backbone, conditioner) on token shards."""

    @dataclass
    class Config:
        tokenizer_ckpt: str = ""  # frozen tokenizer (decodes samples; its vocabulary and grid size the model)
        tokenizer_experiment: str = ""  # trained into tokenizer_ckpt's run first when that file is missing
        tokenizer_overrides: list[str] = field(default_factory=list)  # dotlist overrides for that training
        vocab_size: int = 0  # 0 = the tokenizer's; otherwise must equal it
        optimizer: str = "adamw"  # adamw, or muon (Muon on the hidden matrices, AdamW on embeddings, head, gains)
        lr: float = 1e-3
        betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # LlamaGen (0.9, 0.95)
        muon_lr: float = 0.02  # optimizer muon: peak learning rate of the hidden matrices (arlab.optim)
        muon_momentum: float = 0.95
        muon_weight_decay: float = 0.0
        weight_decay: float = 0.05  # on >=2-D weights not marked exempt (LlamaGen 0.05)
        warmup_steps: int = 100
        lr_schedule: str = "cosine"  # constant or cosine (to min_lr_ratio · lr)
        min_lr_ratio: float = 0.1
        grad_clip: float = 1.0
        z_loss: float = 0.0  # PaLM z-loss weight on logsumexp² (Token-Shuffle's stabiliser; e.g. 1e-4)
        token_dropout: float = 0.0  # dropout on the input sequence embeddings (LlamaGen 0.1)
        loss_chunk: int = 4096  # head + CE over this many tokens at a time, no full logits; 0 = plain full logits
        compile: Any = "auto"  # torch.compile the training forward + loss: true, false, auto (= on CUDA only)
        sample_every_n_steps: int = 500  # sample grid to TensorBoard; 0 = never
        n_sample_images: int = 20
        sample_cfg: float = 2.0  # CFG scale of logged / evaluated samples
        sample_schedule: str = "half-linear"  # constant, linear, half-linear, cosine, var (VAR: 1 + w·k/(S-1))
        sample_temperature: float = 1.0
        sample_top_k: int = 0
        eval_samples: int = 200  # drawn at the end (balanced classes) and scored with eval_metrics; 0 = skip
        eval_metrics: list[str] = field(default_factory=list)  # metric/* names, e.g. [shapes_checker]

        def __post_init__(self) -> None:
            if self.lr_schedule not in ("constant", "cosine"):
                raise ConfigError(f"lr_schedule {self.lr_schedule!r} is not one of constant, cosine")
            if self.optimizer not in ("adamw", "muon"):
                raise ConfigError(f"optimizer {self.optimizer!r} is not one of adamw, muon")
            try:
                check_schedule(self.sample_schedule)
            except ConfigError as e:
                raise ConfigError(f"sample_schedule={self.sample_schedule!r}: {e}") from None
            if self.compile not in (True, False, "auto"):
                raise ConfigError(f"compile={self.compile!r}: must be true, false or auto (true on CUDA, false on CPU)")
            if len(self.betas) != 2:
                raise ConfigError(f"betas must be two numbers, got {self.betas}")
            for i, b in enumerate(self.betas):
                check_range(f"betas[{i}]", b, ge=0, lt=1)
            check_range("lr", self.lr, gt=0)
            check_range("muon_lr", self.muon_lr, gt=0)
            check_range("muon_momentum", self.muon_momentum, ge=0, lt=1)
            values = dataclasses.asdict(self)
            for key in ("weight_decay", "muon_weight_decay", "warmup_steps", "grad_clip", "z_loss",
                        "sample_every_n_steps", "n_sample_images", "sample_cfg", "sample_temperature", "sample_top_k",
                        "eval_samples", "vocab_size", "loss_chunk"):
                check_range(key, values[key], ge=0)
            check_range("min_lr_ratio", self.min_lr_ratio, ge=0, le=1)
            check_range("token_dropout", self.token_dropout, ge=0, lt=1)
            if self.sample_every_n_steps and self.n_sample_images < 1:
                raise ConfigError(f"n_sample_images={self.n_sample_images}: must be >= 1 when sample_every_n_steps > 0 "
                                  "(or set sample_every_n_steps: 0)")

        def check(self, exp) -> None:
            """Config-time checks: slots present, the backbone serves the order, metrics fit the data."""
            for slot in ("backbone", "data"):
                if not exp.has(slot):
                    raise ConfigError(f"task 'generator' needs a '{slot}' slot")
            check_strategy(self.optimizer, exp.tree.get("trainer", {}).get("strategy", "auto"))
            if not self.tokenizer_ckpt:
                raise ConfigError("task.tokenizer_ckpt is empty: name the tokenizer checkpoint (and "
                                  "task.tokenizer_experiment to train it when missing)")
            tree = exp.tree
            order = get("order", tree["order"]["type"]).cls if exp.has("order") else get("order", "raster").cls
            bb = get("backbone", tree["backbone"]["type"])
            check_serves(bb.cls, exp.config("backbone"), attention=order.attention, heads=order.heads,
                         order_name=order.registry_key, backbone_name=bb.key)
            self._check_layout(exp)
            for name in self.eval_metrics:
                node = resolve_node("metric", name, source="task.eval_metrics")
                entry, cfg = validate_component("metric", node, where="task.eval_metrics")
                entry.cls.check_data(cfg, tree["data"])

        def _check_layout(self, exp) -> None:
            """The tokenizer's token maps (from its checkpoint, else from the experiment that trains it) against
            the Token-Shuffle window and the order, before any tokenizer is trained or data tokenized."""
            if Path(self.tokenizer_ckpt).is_file():
                hp = read_task_checkpoint(self.tokenizer_ckpt, "tokenizer", mmap=True)[1]  # mapped: no tensor reads
                tok_node = hp["experiment"]["tokenizer"]
                where = f"tokenizer checkpoint {self.tokenizer_ckpt}"
            elif self.tokenizer_experiment:
                tok_exp = load_experiment(self.tokenizer_experiment, list(self.tokenizer_overrides))
                if not tok_exp.has("tokenizer"):
                    raise ConfigError(f"task.tokenizer_experiment {self.tokenizer_experiment} has no tokenizer slot")
                tok_node, where = tok_exp.tree["tokenizer"], f"tokenizer experiment {self.tokenizer_experiment}"
            else:
                return  # upstream() reports the missing checkpoint
            scales = validate_component("tokenizer", tok_node)[1].token_scales()
            tree = exp.tree
            s = int(tree.get("shuffle", {}).get("s", 1)) if exp.has("shuffle") else 1
            order = build("order", tree["order"] if exp.has("order") else "raster")
            try:
                order.plan(Layout([(p, p) for p in scales], s))
            except ConfigError as e:
                raise ConfigError(f"{e} (token maps {scales} of the {where})") from None

    @classmethod
    def upstream(cls, cfg: Config, experiment: Any) -> list[Upstream]:
        if Path(cfg.tokenizer_ckpt).is_file():
            return []
        if not cfg.tokenizer_experiment:
            raise ConfigError(f"tokenizer checkpoint '{cfg.tokenizer_ckpt}' does not exist and "
                              "task.tokenizer_experiment is empty (name the experiment that trains it)")
        return [Upstream(cfg.tokenizer_ckpt, cfg.tokenizer_experiment, list(cfg.tokenizer_overrides), "tokenizer")]

    @classmethod
    def data_meta(cls, cfg: Config, datamodule: Any) -> dict[str, Any]:
        if not isinstance(datamodule, TokenDataModule):
            raise ConfigError(f"task 'generator' trains on token shards (data: tokens), not on "
                              f"{type(datamodule).__name__}")
        tok = datamodule.tokenizer_meta
        vocab = int(tok["vocab_size"])
        if cfg.vocab_size and cfg.vocab_size != vocab:
            raise ConfigError(f"task.vocab_size={cfg.vocab_size} does not match the tokenizer's vocabulary "
                              f"{vocab} ({tok['checkpoint']}); set it to 0 or {vocab}")
        side = int(tok["scales"][-1])
        return {"vocab_size": vocab, "grid": [side, side], "scales": [int(p) for p in tok["scales"]],
                "num_classes": datamodule.num_classes, "classes": datamodule.classes,
                "dataset": datamodule.manifest["name"], "images": datamodule.cfg.images,
                "tokenizer_ckpt": str(Path(cfg.tokenizer_ckpt).resolve()),
                "image_size": int(tok["image_size"]), "captions": bool(datamodule.manifest.get("captions"))}

    @staticmethod
    def check_captions(experiment: dict[str, Any], meta: dict[str, Any]) -> None:
        """A text conditioner needs captions: from the data (its manifest says ``captions: true``) or made from
        class names by ``conditioner.template``; refused before training otherwise."""
        node = experiment.get("conditioner") or {"type": "class"}
        node = {"type": node} if isinstance(node, str) else node
        if not get("conditioner", str(node.get("type"))).cls.accepts_text or node.get("template"):
            return
        if meta.get("captions", True):  # (a checkpoint from before the key: trust it)
            return
        raise ConfigError(f"conditioner {node.get('type')} trains on captions, but the data '{meta.get('dataset')}' "
                          "has none (its manifest says captions: false) and conditioner.template is empty: set "
                          "conditioner.template (e.g. 'a photo of a {}') to caption images by class name, or use "
                          "conditioner: class")

    def __init__(self, cfg: Config | None = None, experiment: dict[str, Any] | None = None,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        if experiment is None or meta is None:
            raise ConfigError("GeneratorModule needs the experiment config and the data meta (experiment=, meta=)")
        self.check_captions(experiment, meta)
        self.cfg = cfg if cfg is not None else validate_component("task", experiment["task"])[1]
        self.grad_clip = self.cfg.grad_clip
        self.save_hyperparameters({"experiment": experiment, "meta": meta})  # plain dicts only
        self.meta = meta
        self.run_seed = int((experiment.get("run") or {}).get("seed", 0))
        self._tokenizer: VQGANTokenizer | None = None
        multiscale = len(meta.get("scales", [0])) > 1  # next-scale inputs come from the tokenizer's msvq
        self.model = generator_from_meta(experiment, meta, self.cfg, self.tokenizer if multiscale else None)
        self.tokens_per_sample = self.model.layout.num_tokens
        self.last_val: dict[str, float] = {}
        self.final: dict[str, float] = {}
        self._samples_png: np.ndarray | None = None
        self._train_fn: Any = None  # the (possibly compiled) training forward, chosen on the first step

    # ------------------------------------------------------------------------------ pieces
    @property
    def tokenizer(self) -> VQGANTokenizer:
        """The frozen tokenizer (loaded on first use; not part of this module's state dict)."""
        if self._tokenizer is None:
            tok = load_tokenizer(self.meta["tokenizer_ckpt"], map_location="cpu").to(self.device)
            object.__setattr__(self, "_tokenizer", tok)
        return self._tokenizer.to(self.device)  # (no-op when already there; a bound msvq moves with the model)

    def configure_optimizers(self):
        c = self.cfg  # decay on >= 2-D weights except those a component marks exempt; a bound msvq is frozen
        muon = (dict(lr=c.muon_lr, momentum=c.muon_momentum, weight_decay=c.muon_weight_decay)
                if c.optimizer == "muon" else None)
        return self.adamw_warmup_cosine(self.model, c.lr, c.betas, c.weight_decay, c.warmup_steps, c.lr_schedule,
                                        c.min_lr_ratio, muon=muon)

    def _codes(self, batch: dict[str, Any]) -> Tensor:
        tokens = batch["tokens"]
        n = self.model.layout.num_tokens
        if tokens.shape[1] != n:
            raise ValueError(f"token shards hold {tokens.shape[1]} tokens per image but the generator expects {n} "
                             f"(scales {self.model.layout.scales})")
        return tokens.long()

    def train_forward(self) -> Any:
        """The training forward + chunked loss, ``torch.compile``-d when ``task.compile`` says so (``auto``: on
        CUDA); the fixed attention mask is prepared before compiling."""
        if self._train_fn is None:
            on = self.cfg.compile is True or (self.cfg.compile == "auto" and self.device.type == "cuda")
            self.model.static_mask()
            fn = functools.partial(self.model.forward, return_logits=False)
            self._train_fn = torch.compile(fn, dynamic=False) if on else fn
        return self._train_fn

    def _cond(self, batch: dict[str, Any]) -> Tensor:
        """The batch's condition: class labels, or caption ids for a text conditioner."""
        return self.model.conditioner.from_batch(batch, self.meta["classes"])

    # ------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        codes = self._codes(batch)
        cond = self.model.conditioner.drop(self._cond(batch))
        out = self.train_forward()(codes, cond)
        # checking finiteness reads the loss on the host: every step on a CPU (free), at logging steps on a GPU
        # (a sync per step would stall the queue); a diverged run stops within one logging interval
        if (codes.device.type == "cpu" or self.global_step % max(1, self.trainer.log_every_n_steps) == 0) \
                and not torch.isfinite(out.loss):
            raise FloatingPointError(f"non-finite generator loss {out.loss.item()} at step {self.global_step} "
                                     f"(batch {batch_idx}, keys {batch['key'][:4]}...); the last good checkpoint "
                                     "is kept")
        b = codes.shape[0]
        logs = {"train/loss": out.loss.detach(), "train/ce": out.ce.detach()}
        if self.cfg.z_loss > 0:
            logs["train/z_loss"] = out.z_loss.detach()
        if out.ce_per_window_pos.numel() > 1:
            logs.update({f"train/ce_pos{k}": v for k, v in enumerate(out.ce_per_window_pos)})
        if out.ce_per_scale.numel() > 1:
            logs.update({f"train/ce_scale{k}": v for k, v in enumerate(out.ce_per_scale)})
        self.log_dict(logs, batch_size=b)
        self.log("ce", out.ce.detach(), prog_bar=True, logger=False, batch_size=b)
        n = self.cfg.sample_every_n_steps
        if n and self.global_step > 0 and self.global_step % n == 0:
            self._log_samples()
        return out.loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out = self.model(self._codes(batch), self._cond(batch), return_logits=False)
        b = batch["tokens"].shape[0]
        self.log("val/ce", out.ce, batch_size=b, sync_dist=True)
        if out.ce_per_scale.numel() > 1:
            self.log_dict({f"val/ce_scale{k}": v for k, v in enumerate(out.ce_per_scale)}, batch_size=b, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.last_val_step = self.global_step
        self.last_val = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val/")}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Reseed the global RNG from (run seed, step, rank) before every step: label dropout and dropout
        then draw the same numbers whether the run was resumed or not (data-loader iterators and the
        sanity check also consume the global RNG, so restoring a saved RNG state is not enough)."""
        torch.manual_seed(sample_seed(self.run_seed, self.global_step, self.global_rank) % (2**63))

    # ------------------------------------------------------------------------------ samples
    def _sampling(self) -> dict[str, Any]:
        c = self.cfg
        return {"cfg_scale": c.sample_cfg, "cfg_schedule": c.sample_schedule, "temperature": c.sample_temperature,
                "top_k": c.sample_top_k}

    def _log_samples(self) -> None:
        tb = self.tensorboard()
        if tb is None:
            return
        cond = eval_conditions(self.model.conditioner, self.meta, self.cfg.n_sample_images)[0]
        images, _ = generate_images(self.model, self.tokenizer, cond, seed=self.global_step, **self._sampling())
        tb.add_image("samples", image_grid(images, nrow=self.meta["num_classes"]), self.global_step, dataformats="HWC")

    def evaluate(self) -> dict[str, float]:
        """``eval_samples`` images with balanced classes, scored by ``eval_metrics``; kept for ``samples.png``."""
        if self.cfg.eval_samples <= 0:
            return {}
        cond, labels, _ = eval_conditions(self.model.conditioner, self.meta, self.cfg.eval_samples)
        images, rate = generate_images(self.model, self.tokenizer, cond, seed=1234, **self._sampling())
        self.final = {"sample/images_per_s": rate, "sample/steps_per_image": float(self.model.steps_per_image)}
        self.final.update(score(list(self.cfg.eval_metrics), images, labels.numpy(), self.meta))
        k = self.meta["num_classes"]
        self._samples_png = image_grid(images[: 10 * k], nrow=k)
        tb = self.tensorboard()
        if tb is not None:
            tb.add_image("samples_final", self._samples_png, self.global_step, dataformats="HWC")
            for key, v in self.final.items():
                tb.add_scalar(key, v, self.global_step)
        return self.final

    # ------------------------------------------------------------------------------ FLOPs (arlab.flops)
    def flop_loss(self, batch: dict[str, Any]) -> Tensor:
        """The training loss (conditioner, backbone, heads on the token sequence), without logging."""
        return self.model(self._codes(batch), self.model.conditioner.drop(self._cond(batch))).loss

    def flop_sample(self) -> bool:
        """One image at the run's sampling settings (decoded to pixels by the tokenizer); not drawn (False) by a
        run that never samples (``eval_samples`` and ``sample_every_n_steps`` 0): it costs one sampling."""
        if self.cfg.eval_samples == 0 and self.cfg.sample_every_n_steps == 0:
            return False
        cond = eval_conditions(self.model.conditioner, self.meta, 1)[0]
        generate_images(self.model, self.tokenizer, cond, seed=0, **self._sampling())
        return True

    def analytic_flops_per_image(self) -> float:
        """Kaplan's ``6·N·T`` over the parameters outside embedding tables: the output head(s) at the token
        rate (T = tokens per image), the rest at the backbone's (T = condition prefix + cells − 1)."""
        tables = {id(m.weight) for m in self.model.modules() if isinstance(m, torch.nn.Embedding)}
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad and id(p) not in tables)
        heads = sum(p.numel() for h in (self.model.head, self.model.head2) if h is not None for p in h.parameters())
        return 6.0 * ((n - heads) * self.sequence_length + heads * self.model.layout.num_tokens)

    @property
    def sequence_length(self) -> int:
        return self.model.prefix_len + self.model.layout.num_cells - 1

    def final_metrics(self) -> dict[str, float]:
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)  # a bound msvq is not counted
        return {**self.last_val, **self.final, "model/params": float(n),
                "model/tokens_per_image": float(self.model.layout.num_tokens),
                "model/backbone_params": float(sum(p.numel() for m in (self.model.backbone, self.model.branch)
                                                   if m is not None for p in m.parameters()))}

    def save_artifacts(self, run: Path) -> list[Path]:
        """``samples.png``: one column per class (rows: different seeds)."""
        if self._samples_png is None:
            return []
        path = Path(run) / "samples.png"
        atomic_write(path, png_bytes(self._samples_png))
        return [path]
