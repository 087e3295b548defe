"""``task/generator``: trains the AR generator (raster, Token-Shuffle, ...) on token shards.

AdamW (weight decay on ≥2-D weights only) with warm-up and cosine decay; bf16-mixed on GPU via
``trainer.precision``. Logs ``train/loss``, ``train/ce``, per-window-position CE
(``train/ce_pos{k}``, Token-Shuffle), tokens/s and images/s, validation CE, and every
``sample_every_n_steps`` a grid of class-conditional samples decoded by the frozen tokenizer.
At the end it draws ``eval_samples`` images (balanced classes) and, on ``shapes``, scores them
with the non-neural checker (``sample/class_acc``). The global RNG is reseeded from (seed, step,
rank) before every step, so a resumed run reproduces the uninterrupted losses (data position and
optimizer state come from the checkpoint).

``arlab train`` of a generator experiment runs the whole chain: when ``tokenizer_ckpt`` does not
exist yet it first trains ``tokenizer_experiment`` into that run directory, then the data module
tokenizes the image set, then the generator trains.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from arlab.errors import ConfigError
from arlab.generator.model import Generator
from arlab.generator.sampling import check_schedule
from arlab.registry import build, register
from arlab.tokenizer.module import warmup_cosine

log = logging.getLogger("arlab.generator")


def build_generator(experiment: dict[str, Any], vocab_size: int, scales: list | tuple[int, int], num_classes: int,
                    z_loss: float = 0.0, token_dropout: float = 0.0, quantizer: torch.nn.Module | None = None
                    ) -> Generator:
    """Assemble the generator from an experiment's backbone / order / shuffle / conditioner slots.

    ``scales``: the tokenizer's (h, w) grid or its list of scales; ``quantizer``: the tokenizer's msvq
    (the next-scale order builds its inputs with it)."""
    backbone = build("backbone", experiment["backbone"])
    order = build("order", experiment.get("order", "raster"))
    shuffle = build("shuffle", experiment.get("shuffle", {"type": "window", "s": 1}), dim=backbone.dim)
    cond = build("conditioner", experiment.get("conditioner", "class"), dim=backbone.dim, num_classes=num_classes)
    return Generator(backbone, order, shuffle, cond, vocab_size, scales, z_loss=z_loss, token_dropout=token_dropout,
                     quantizer=quantizer)


@register("task", "generator")
class GeneratorModule(pl.LightningModule):
    """Trains an AR generator (order, Token-Shuffle window, backbone, conditioner) on token shards."""

    @dataclass
    class Config:
        tokenizer_ckpt: str = ""  # frozen tokenizer (decodes samples; its vocabulary and grid size the model)
        tokenizer_experiment: str = ""  # trained into tokenizer_ckpt's run first when that file is missing
        tokenizer_overrides: list[str] = field(default_factory=list)  # dotlist overrides for that training
        vocab_size: int = 0  # 0 = the tokenizer's; otherwise must equal it
        lr: float = 1e-3
        betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # LlamaGen (0.9, 0.95)
        weight_decay: float = 0.05  # on >=2-D weights only (LlamaGen 0.05)
        warmup_steps: int = 100
        lr_schedule: str = "cosine"  # constant or cosine (to min_lr_ratio · lr)
        min_lr_ratio: float = 0.1
        grad_clip: float = 1.0
        z_loss: float = 0.0  # PaLM z-loss weight on logsumexp² (Token-Shuffle's stabiliser; e.g. 1e-4)
        token_dropout: float = 0.0  # dropout on the input sequence embeddings (LlamaGen 0.1)
        sample_every_n_steps: int = 500  # sample grid to TensorBoard; 0 = never
        n_sample_images: int = 20
        sample_cfg: float = 2.0  # CFG scale of logged / evaluated samples
        sample_schedule: str = "half-linear"  # constant, linear, half-linear, cosine, var (VAR: 1 + w·k/(S-1))
        sample_temperature: float = 1.0
        sample_top_k: int = 0
        eval_samples: int = 200  # drawn at the end (balanced classes); scored on shapes; 0 = skip

        def __post_init__(self) -> None:
            if self.lr_schedule not in ("constant", "cosine"):
                raise ConfigError(f"lr_schedule {self.lr_schedule!r} is not one of constant, cosine")
            check_schedule(self.sample_schedule)
            if len(self.betas) != 2:
                raise ConfigError(f"betas must be two numbers, got {self.betas}")

        def check(self, exp) -> None:
            for slot in ("backbone", "data"):
                if not exp.has(slot):
                    raise ConfigError(f"task 'generator' needs a '{slot}' slot")
            if not self.tokenizer_ckpt:
                raise ConfigError("task.tokenizer_ckpt is empty: name the tokenizer checkpoint (and "
                                  "task.tokenizer_experiment to train it when missing)")

        def prepare(self, exp) -> None:
            """Train the tokenizer first when its checkpoint does not exist (the experiment chain)."""
            ckpt = Path(self.tokenizer_ckpt)
            if ckpt.is_file():
                return
            if not self.tokenizer_experiment:
                raise ConfigError(f"tokenizer checkpoint '{ckpt}' does not exist and task.tokenizer_experiment "
                                  "is empty (name the experiment that trains it)")
            from arlab.config import load_experiment
            from arlab.train import fit

            run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
            log.info("tokenizer %s missing: training %s into %s first", ckpt, self.tokenizer_experiment, run)
            overrides = [*self.tokenizer_overrides, f"run.dir={run}",
                         f"trainer.enable_progress_bar={exp.trainer.enable_progress_bar}"]
            fit(load_experiment(self.tokenizer_experiment, overrides))
            if not ckpt.is_file():
                raise ConfigError(f"training {self.tokenizer_experiment} did not produce '{ckpt}'")

    def __init__(self, cfg: Config | None = None, experiment: dict[str, Any] | None = None,
                 meta: dict[str, Any] | None = None):
        super().__init__()
        if experiment is None:
            raise ConfigError("GeneratorModule needs the experiment config (experiment=...)")
        if cfg is None:
            from arlab.config import validate_component

            cfg = validate_component("task", experiment["task"])[1]
        self.cfg = cfg
        if meta is None:
            meta = self._read_meta(experiment)
        self.save_hyperparameters({"experiment": experiment, "meta": meta})  # plain dicts only
        self.meta = meta
        self.run_seed = int((experiment.get("run") or {}).get("seed", 0))
        self.grid = tuple(meta["grid"])
        scales = [(int(p), int(p)) for p in meta.get("scales", [self.grid[0]])]
        self._tokenizer = None
        quantizer = None
        if len(scales) > 1:  # next-scale inputs come from the tokenizer's msvq
            quantizer = self.tokenizer.quantizer
        self.model = build_generator(experiment, meta["vocab_size"], scales, meta["num_classes"],
                                     z_loss=cfg.z_loss, token_dropout=cfg.token_dropout, quantizer=quantizer)
        self.tokens_per_sample = self.model.layout.num_tokens
        self.last_val: dict[str, float] = {}
        self.last_val_step = -1
        self.final: dict[str, float] = {}
        self._samples_png: np.ndarray | None = None

    def _read_meta(self, experiment: dict[str, Any]) -> dict[str, Any]:
        dm = build("data", experiment["data"])
        tok = dm.tokenizer_meta
        vocab = int(tok["vocab_size"])
        if self.cfg.vocab_size and self.cfg.vocab_size != vocab:
            raise ConfigError(f"task.vocab_size={self.cfg.vocab_size} does not match the tokenizer's vocabulary "
                              f"{vocab} ({tok['checkpoint']}); set it to 0 or {vocab}")
        side = int(tok["scales"][-1])
        return {"vocab_size": vocab, "grid": [side, side], "scales": [int(p) for p in tok["scales"]],
                "num_classes": dm.num_classes, "classes": dm.classes,
                "dataset": dm.manifest["name"], "tokenizer_ckpt": str(Path(self.cfg.tokenizer_ckpt).resolve()),
                "image_size": int(tok["image_size"])}

    # ------------------------------------------------------------------------------ pieces
    @property
    def tokenizer(self):
        """The frozen tokenizer (loaded on first use; not part of this module's state dict)."""
        if self._tokenizer is None:
            from arlab.tokenizer.module import load_tokenizer

            tok = load_tokenizer(self.meta["tokenizer_ckpt"], map_location="cpu").to(self.device)
            object.__setattr__(self, "_tokenizer", tok)
        return self._tokenizer.to(self.device)  # (no-op when already there; a bound msvq moves with the model)

    def configure_optimizers(self):
        c = self.cfg
        # decay on >= 2-D weights (LlamaGen) except an order's position / level embeddings (VAR exempts them);
        # a bound msvq is frozen
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        exempt = [p.ndim < 2 or n.startswith("order.") and ("pos" in n or "lvl" in n) for n, p in named]
        decay = [p for (_, p), e in zip(named, exempt) if not e]
        no_decay = [p for (_, p), e in zip(named, exempt) if e]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=c.lr, betas=tuple(c.betas))
        total = int(self.trainer.max_steps) if self.trainer.max_steps > 0 else 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(c.warmup_steps, total, c.lr_schedule,
                                                                     c.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        if self.cfg.grad_clip > 0:
            self.clip_gradients(optimizer, gradient_clip_val=self.cfg.grad_clip, gradient_clip_algorithm="norm")

    def _codes(self, batch: dict[str, Any]) -> Tensor:
        tokens = batch["tokens"]
        n = self.model.layout.num_tokens
        if tokens.shape[1] != n:
            raise ValueError(f"token shards hold {tokens.shape[1]} tokens per image but the generator expects {n} "
                             f"(scales {self.model.layout.scales})")
        return tokens.long()

    def _cond(self, batch: dict[str, Any]) -> Tensor:
        """The batch's condition: class labels, or caption ids for a text conditioner."""
        return self.model.conditioner.from_batch(batch, self.meta["classes"])

    # ------------------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        codes = self._codes(batch)
        cond = self.model.conditioner.drop(self._cond(batch))
        out = self.model(codes, cond)
        if not torch.isfinite(out.loss):
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
        out = self.model(self._codes(batch), self._cond(batch))
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
        from arlab.data.stream import sample_seed

        torch.manual_seed(sample_seed(self.run_seed, self.global_step, self.global_rank) % (2**63))

    # ------------------------------------------------------------------------------ samples
    @torch.no_grad()
    def generate(self, cond: Tensor, seed: int, batch_size: int = 100, **kw: Any) -> tuple[np.ndarray, float]:
        """Sample images (N, H, W, 3) uint8 for conditions ``cond`` (labels or caption ids); returns them and
        the images/s."""
        c = self.cfg
        was_training = self.model.training
        self.model.eval()
        g = torch.Generator(device=self.device).manual_seed(seed)
        opts = {"cfg_scale": c.sample_cfg, "cfg_schedule": c.sample_schedule, "temperature": c.sample_temperature,
                "top_k": c.sample_top_k} | kw
        out, t0 = [], time.perf_counter()
        for i in range(0, len(cond), batch_size):
            codes = self.model.sample(cond[i:i + batch_size].to(self.device), generator=g, **opts)
            if self.model.layout.multiscale:
                codes = self.tokenizer.unflatten_indices(codes)
            x = self.tokenizer.detokenize(codes)
            out.append(x.float().clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
        dt = time.perf_counter() - t0
        self.model.train(was_training)
        return np.concatenate(out), len(cond) / max(dt, 1e-9)

    def balanced_labels(self, n: int) -> Tensor:
        return torch.arange(n) % self.meta["num_classes"]

    def eval_conditions(self, n: int) -> tuple[Tensor, Tensor, list[str] | None]:
        """``n`` conditions with balanced classes: (cond, labels, prompts or None). A text model on shapes
        gets the captions of the first ``n`` test images (their class is read from the caption's shape
        word); otherwise the class labels (text: ``conditioner.template`` with the class name)."""
        labels = self.balanced_labels(n)
        cond = self.model.conditioner
        if not hasattr(cond, "encode"):
            return labels, labels, None
        if self.meta["dataset"].startswith("shapes"):
            from arlab.data.shapes import TEST_START, class_from_caption, render

            samples = [render(TEST_START + i, size=self.meta["image_size"]) for i in range(n)]
            prompts = [s.caption for s in samples]
            labels = torch.tensor([class_from_caption(t) for t in prompts])
        else:
            prompts = cond.decode(cond.from_labels(labels, self.meta["classes"]))
        return cond.encode(prompts), labels, prompts

    def _log_samples(self) -> None:
        exp = getattr(self.logger, "experiment", None)
        if exp is None or not hasattr(exp, "add_image") or self.global_rank != 0:
            return
        images, _ = self.generate(self.eval_conditions(self.cfg.n_sample_images)[0], seed=self.global_step)
        exp.add_image("samples", _grid(images, nrow=self.meta["num_classes"]), self.global_step, dataformats="HWC")

    def on_train_end(self) -> None:
        if self.global_rank != 0 or self.cfg.eval_samples <= 0:
            return
        cond, labels, _ = self.eval_conditions(self.cfg.eval_samples)
        images, rate = self.generate(cond, seed=1234)
        self.final = {"sample/images_per_s": rate, "sample/steps_per_image": float(self.model.steps_per_image)}
        if self.meta["dataset"].startswith("shapes"):
            from arlab.data.shapes import classify_batch

            pred = classify_batch(images)
            self.final["sample/class_acc"] = float((pred == labels.numpy()).mean())
        self._samples_png = _grid(images[: 10 * self.meta["num_classes"]], nrow=self.meta["num_classes"])
        exp = getattr(self.logger, "experiment", None)
        if exp is not None and hasattr(exp, "add_image"):
            exp.add_image("samples_final", self._samples_png, self.global_step, dataformats="HWC")
            for k, v in self.final.items():
                exp.add_scalar(k, v, self.global_step)

    def final_metrics(self) -> dict[str, float]:
        n = sum(p.numel() for p in self.model.parameters() if p.requires_grad)  # a bound msvq is not counted
        return {**self.last_val, **self.final, "model/params": float(n),
                "model/backbone_params": float(sum(p.numel() for m in (self.model.backbone, self.model.branch)
                                                   if m is not None for p in m.parameters()))}

    def save_artifacts(self, run: Path) -> list[Path]:
        """``samples.png``: one column per class (rows: different seeds)."""
        if self._samples_png is None:
            return []
        from PIL import Image

        path = Path(run) / "samples.png"
        Image.fromarray(self._samples_png).save(path)
        return [path]


def _grid(images: np.ndarray, nrow: int, pad: int = 1) -> np.ndarray:
    """(N, H, W, 3) uint8 → one (rows·(H+pad), nrow·(W+pad), 3) image, row-major."""
    n, h, w, _ = images.shape
    rows = (n + nrow - 1) // nrow
    out = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return out


def load_generator(path: str | Path, map_location: str = "cpu") -> GeneratorModule:
    """A trained ``task/generator`` module from its checkpoint (eval mode)."""
    from arlab.train import read_task_checkpoint

    ckpt, hp = read_task_checkpoint(path, "generator", map_location)
    module = GeneratorModule(None, experiment=hp["experiment"], meta=hp["meta"])
    own = module.state_dict()
    changed = [k for k in ckpt["state_dict"] if k.startswith("model.order.quant.") and k in own
               and not torch.equal(own[k], ckpt["state_dict"][k].to(own[k].dtype))]
    if changed:
        raise ConfigError(f"the tokenizer '{hp['meta']['tokenizer_ckpt']}' is not the one '{path}' was trained with: "
                          f"its quantizer differs ({changed[0]}, ...); restore that tokenizer checkpoint")
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def sample_to_files(ckpt: str | Path, out: str | Path, n: int = 100, batch_size: int = 100,
                    classes: list[int] | None = None, cfg: float | None = None, cfg_schedule: str | None = None,
                    top_k: int | None = None, top_p: float = 1.0, temperature: float | None = None, seed: int = 0,
                    device: str = "cpu", use_cache: bool = True, prompts: list[str] | None = None) -> dict[str, Any]:
    """``arlab sample``: draw ``n`` images (balanced over ``classes``; a text model: ``prompts`` cycled, or
    captions for the classes), write ``samples.png`` and ``samples.npz`` (``images`` N×H×W×3 uint8,
    ``labels`` N (-1 = unknown), ``prompts``) under ``out``; returns a summary."""
    module = load_generator(ckpt).to(device)
    c = module.cfg
    k = module.meta["num_classes"]
    explicit = bool(classes)
    classes = list(range(k)) if not classes else classes
    bad = [i for i in classes if not 0 <= i < k]
    if bad:
        raise ConfigError(f"class index {bad[0]} is outside the dataset's classes 0..{k - 1} "
                          f"({', '.join(module.meta['classes'])})")
    schedule = cfg_schedule or c.sample_schedule
    check_schedule(schedule)
    labels = torch.tensor([classes[i % len(classes)] for i in range(n)])
    cond, prompt_list = labels, None
    cmod = module.model.conditioner
    if hasattr(cmod, "encode"):  # a text model: the given prompts, else captions/templates for the classes
        if prompts:
            prompt_list = [prompts[i % len(prompts)] for i in range(n)]
            if module.meta["dataset"].startswith("shapes"):
                from arlab.data.shapes import class_from_caption

                labels = torch.tensor([class_from_caption(t) for t in prompt_list])
            else:
                labels = torch.full((n,), -1)
            cond = cmod.encode(prompt_list)
        elif explicit:  # the classes through the conditioner's caption template
            if not cmod.cfg.template:
                raise ConfigError(f"'{ckpt}' is conditioned on captions and its conditioner has no class template; "
                                  "give --prompt instead of --classes")
            cond = cmod.from_labels(labels, module.meta["classes"])
            prompt_list = cmod.decode(cond)
        else:
            cond, labels, prompt_list = module.eval_conditions(n)
    elif prompts:
        raise ConfigError(f"--prompt needs a text-conditioned generator; '{ckpt}' is conditioned on class labels "
                          "(use --classes)")
    opts = {"cfg_scale": c.sample_cfg if cfg is None else cfg, "cfg_schedule": schedule,
            "temperature": c.sample_temperature if temperature is None else temperature,
            "top_k": c.sample_top_k if top_k is None else top_k, "top_p": top_p, "use_cache": use_cache}
    images, rate = module.generate(cond, seed=seed, batch_size=batch_size, **opts)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "samples.npz", images=images, labels=labels.numpy(), prompts=np.array(prompt_list or [], dtype=str))
    from PIL import Image

    Image.fromarray(_grid(images, nrow=min(len(classes), 20))).save(out / "samples.png")
    summary: dict[str, Any] = {"n": n, "images_per_s": rate, "steps_per_image": module.model.steps_per_image, **opts}
    known = labels.numpy() >= 0
    if module.meta["dataset"].startswith("shapes") and known.any():
        from arlab.data.shapes import classify_batch

        summary["class_acc"] = float((classify_batch(images)[known] == labels.numpy()[known]).mean())
    return summary
