"""The training loop: m-per-class batches, base loss + TCM, callbacks, checkpoints, evaluation.

:class:`Trainer` takes its parts (model, losses, optimizer, data, callbacks) the way
PML's trainers do, so a new loss, backbone or hook needs no change here;
:meth:`Trainer.from_config` builds the usual parts from a :class:`TrainConfig` through
the registries (``train.registry``).

A run directory holds everything: ``config.json`` (resolved), ``checkpoint.pt`` (every
epoch, for ``--resume``), ``epochs.json`` (held-out metrics per epoch), ``history.json``
(loss terms and loss statistics per step), and at the end ``model.onnx``,
``metrics.json``, ``curves.png`` and ``utility_curves.npz``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from tqdm import tqdm

from contracts import atomic_write_text
from imagesets import ImageSet
from train import distributed
from train.base_losses import build_losses
from train.callbacks import Callback, StopWhenFlat
from train.config import TrainConfig
from train.data import class_subset, eval_loader, hold_out_classes, load_dataset, train_loader
from train.evaluate import evaluate_embeddings, json_safe
from train.export import embedder_meta, export_model
from train.losses import SharedCosineSimilarity
from train.models import Embedder, build_model
from train.optim import build_schedule
from train.registry import OPTIMIZERS

VAL_SPLIT_SEED = 12345  # the held-out classes are the same for every run and seed


@runtime_checkable
class ReportsStatistics(Protocol):
    """A loss that says what to log about its last call (TCM: its terms and margins)."""

    def statistics(self) -> dict[str, float]: ...


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU degrades to CPU, saying so."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda":
        print("device: CUDA requested but torch sees no GPU; training on CPU instead")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def recipe_of(cfg: TrainConfig, margins: Mapping[str, float] | None = None) -> dict:
    """What goes into the model's metadata: enough to know how it was trained.

    ``margins`` are the TCM margins in force at the end (calibrated runs move them).
    """
    keys = ("dataset", "backbone", "embedding_dim", "loss", "loss_params", "tcm", "epochs", "seed")
    recipe = {k: getattr(cfg, k) for k in keys}
    if cfg.backbone == "glyphnet":
        recipe["width"] = cfg.width
    if cfg.tcm:
        recipe.update(
            lambda_plus=cfg.lambda_plus,
            lambda_minus=cfg.lambda_minus,
            margin_plus=cfg.margin_plus,
            margin_minus=cfg.margin_minus,
            margins=cfg.margins,
        )
        if cfg.margins == "calibrated":
            recipe.update(
                margin_offset=cfg.margin_offset,
                margin_every=cfg.margin_every,
                margin_warmup=cfg.margin_warmup,
                margin_far_range=[cfg.margin_far_lo, cfg.margin_far_hi],
            )
        if margins:
            recipe.update(margin_plus=margins["margin_plus"], margin_minus=margins["margin_minus"])
    return recipe


class Trainer:
    """One run: train the parts it is given, evaluate on held-out classes, export."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: str | Path,
        *,
        model: Embedder,
        losses: Mapping[str, torch.nn.Module],
        optimizer: torch.optim.Optimizer,
        train_set: ImageSet,
        test_set: ImageSet | None = None,
        val_set: ImageSet | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        callbacks: Sequence[Callback] = (),
        device: torch.device | None = None,
        quiet: bool = False,
        export: bool = True,
        progress: bool = True,
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        # progress=False keeps the per-epoch lines but drops the per-step bar (log files)
        self.quiet, self.export, self.progress = quiet, export, progress
        self.device = device or torch.device("cpu")
        self.rank = distributed.rank()
        # channels-last convolutions: ~20% less CPU time per step for glyphnet, measured
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.losses = torch.nn.ModuleDict(dict(losses)).to(self.device)
        self.optimizer = optimizer
        self.scheduler = scheduler or torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        self.train_set, self.val_set, self.test_set = train_set, val_set, test_set
        self.callbacks = list(callbacks)
        self.meta = embedder_meta(self.model, recipe_of(cfg))
        # dense 0..C-1 labels for proxy/classifier losses
        self.train_labels = np.unique(train_set.labels, return_inverse=True)[1].reshape(-1)
        self.net: torch.nn.Module = self.model
        if distributed.is_distributed():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.steps = cfg.steps_per_epoch or max(1, len(train_set) // cfg.batch_size)
        self.amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.epoch = 0
        self.step = 0
        self.history: list[dict] = []
        self.epochs: list[dict] = []
        self.stopped_early = False
        self.seconds = 0.0  # wall time of training and held-out evaluation, over resumes

    # ---- the usual parts ---------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        cfg: TrainConfig,
        run_dir: str | Path,
        quiet: bool = False,
        export: bool = True,
        test: bool = True,
        progress: bool = True,
    ) -> Trainer:
        """Build model, losses, optimizer, schedule, data and callbacks from a config.

        ``test=False`` does not even load the test split: learning-rate tuning
        (``train.tune``) must choose on the held-out train classes alone.
        """
        torch.set_num_threads(max(1, cfg.threads))
        device = resolve_device(cfg.device)
        distributed.init_from_env(device)
        seed_everything(cfg.seed + distributed.rank())
        train_set = load_dataset(cfg.dataset, "train")
        val_set = None
        if cfg.val_fraction > 0:
            train_set, val_set = hold_out_classes(train_set, cfg.val_fraction, VAL_SPLIT_SEED)
        test_set = None
        if test:
            test_set = class_subset(load_dataset(cfg.dataset, "test"), cfg.eval_limit, cfg.seed)
        model = build_model(cfg.backbone, cfg.embedding_dim, cfg.width, cfg.weights).to(device)
        losses = build_losses(
            cfg.loss,
            len(np.unique(train_set.labels)),
            cfg.embedding_dim,
            cfg.loss_params,
            _tcm_params(cfg),
        )
        losses = {k: v.to(device) for k, v in losses.items()}
        optimizer = OPTIMIZERS.create(
            cfg.optimizer, _param_groups(cfg, model, losses), weight_decay=cfg.weight_decay
        )
        steps = cfg.steps_per_epoch or max(1, len(train_set) // cfg.batch_size)
        scheduler = build_schedule(cfg.schedule, optimizer, steps * cfg.epochs, cfg.warmup_steps)
        callbacks: list[Callback] = []
        if cfg.margins not in ("fixed", "calibrated"):
            raise ValueError(f"margins must be fixed or calibrated, got {cfg.margins!r}")
        if cfg.margins == "calibrated":
            if not cfg.tcm:  # silently training without the margins asked for would mislead
                raise ValueError("--margins calibrated moves TCM's margins: add --tcm")
            callbacks.append(_calibrated_margins(cfg, losses["tcm"], val_set))
        if val_set is not None or cfg.patience > 0 or cfg.restore_best:
            callbacks.append(_early_stopping(cfg, val_set))
        return cls(
            cfg,
            run_dir,
            model=model,
            losses=losses,
            optimizer=optimizer,
            train_set=train_set,
            val_set=val_set,
            test_set=test_set,
            scheduler=scheduler,
            callbacks=callbacks,
            device=device,
            quiet=quiet,
            progress=progress,
            export=export,
        )

    # ---- checkpoints -------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        state = {
            "epoch": self.epoch,
            "step": self.step,
            "stopped_early": self.stopped_early,
            "seconds": self.seconds,
            "model": self.model.state_dict(),
            "losses": self.losses.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "callbacks": [cb.state_dict() for cb in self.callbacks],
            "history": self.history,
            "epochs": self.epochs,
            "config": asdict(self.cfg),
        }
        tmp = self.run_dir / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.run_dir / "checkpoint.pt")

    def load_checkpoint(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.losses.load_state_dict(state["losses"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for cb, cb_state in zip(self.callbacks, state.get("callbacks", []), strict=False):
            cb.load_state_dict(cb_state)
        self.epoch, self.history, self.epochs = state["epoch"], state["history"], state["epochs"]
        self.step = state.get("step", self.epoch * self.steps)
        self.stopped_early = state.get("stopped_early", False)
        self.seconds = state.get("seconds", 0.0)
        print(f"resumed {path} after epoch {self.epoch}")

    # ---- training ----------------------------------------------------------------
    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        images = images.to(self.device, memory_format=torch.channels_last)
        labels = labels.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            emb = self.net(images)
        emb, labels = distributed.gather_batch(emb.float(), labels)
        terms = {name: loss(emb, labels) for name, loss in self.losses.items()}
        total = sum(terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        for module in self.losses.modules():
            if isinstance(module, SharedCosineSimilarity):
                module.clear()  # release this step's matrix now, not at the next step
        out = {k: float(v.detach()) for k, v in terms.items()}
        out["loss"] = float(total.detach())
        for name, loss in self.losses.items():
            if isinstance(loss, ReportsStatistics):
                out.update({f"{name}/{k}": v for k, v in loss.statistics().items()})
        return out

    def train_epoch(self) -> None:
        cfg = self.cfg
        loader = train_loader(
            self.train_set,
            self.meta,
            cfg.batch_size,
            cfg.m_per_class,
            self.steps,
            cfg.workers,
            seed=cfg.seed * 1000 + self.epoch + 7919 * self.rank,
        )
        loader.dataset.labels = torch.as_tensor(self.train_labels)
        self.net.train()
        bar = tqdm(
            loader,
            total=self.steps,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
            disable=self.quiet or not self.progress or self.rank != 0,
            dynamic_ncols=True,
        )
        start, seen = time.perf_counter(), 0
        shown = ("base", "tcm", "loss", "tcm/margin_plus", "tcm/margin_minus")
        for images, labels in bar:
            terms = self._step(images, labels)
            self.step += 1
            for cb in self.callbacks:
                terms.update(cb.on_step_end(self, self.step))
            seen += len(images)
            rate = seen / max(time.perf_counter() - start, 1e-9)
            self.history.append({"epoch": self.epoch + 1, "step": self.step, **terms})
            postfix = {
                k.replace("tcm/margin_", "m"): f"{terms[k]:.4f}" for k in shown if k in terms
            }
            bar.set_postfix(postfix | {"img/s": f"{rate:.0f}"})
        self.epoch += 1

    # ---- evaluation --------------------------------------------------------------
    @torch.no_grad()
    def embed(self, images: ImageSet) -> np.ndarray:
        """Embeddings of ``images`` in eval mode; the model's mode is restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            parts = [
                self.model(x.to(self.device, memory_format=torch.channels_last)).float().cpu()
                for x, _ in eval_loader(images, self.meta)
            ]
        finally:
            self.model.train(was_training)
        return torch.cat(parts).numpy()

    def evaluate(self, images: ImageSet):
        emb = self.embed(images)
        return evaluate_embeddings(
            emb, images.labels, images.tenants, images.tenant_names, target_far=self.cfg.target_far
        )

    def run(self) -> dict:
        """Train the remaining epochs, evaluate each ``eval_every``, test and export at the end."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            atomic_write_text(self.run_dir / "config.json", self.cfg.to_json())
        finished = self.epoch >= self.cfg.epochs or self.stopped_early
        if finished and (self.run_dir / "metrics.json").is_file():
            self.say(f"{self.run_dir} already finished {self.epoch} epochs; nothing to do")
            return json.loads((self.run_dir / "metrics.json").read_text())
        for cb in self.callbacks:
            cb.on_fit_start(self)
        while self.epoch < self.cfg.epochs and not self.stopped_early:
            start = time.perf_counter()
            self.train_epoch()
            last = self.epoch == self.cfg.epochs
            if self.rank == 0 and (last or self.epoch % max(1, self.cfg.eval_every) == 0):
                self._evaluate_epoch()
            # only rank 0 evaluates, so its decision is every rank's (else the others hang)
            stop = any(cb.should_stop() for cb in self.callbacks)
            self.stopped_early = distributed.broadcast_flag(stop) and self.epoch < self.cfg.epochs
            self.seconds += time.perf_counter() - start
            if self.stopped_early:
                self.say(f"stopping after epoch {self.epoch}: held-out Recall@1 stopped rising")
            self.save_checkpoint()
        if self.rank != 0:
            return {}
        return self.finish()

    def _evaluate_epoch(self) -> None:
        """Held-out metrics of this epoch: validation classes if held out, else the test set."""
        split, images = ("val", self.val_set) if self.val_set is not None else ("test", None)
        images = images if images is not None else self.test_set
        if images is None:  # neither held out nor tested (a tuning run without val classes)
            return
        metrics, _ = self.evaluate(images)
        for cb in self.callbacks:
            cb.on_evaluate(self, self.epoch, metrics)
        self.epochs.append(
            {"epoch": self.epoch, "step": self.step, "split": split, **_brief(metrics)}
        )
        self.say(f"epoch {self.epoch} ({split}): " + _line(metrics))
        atomic_write_text(self.run_dir / "epochs.json", json.dumps(self.epochs, indent=2))

    def final_margins(self) -> dict[str, float] | None:
        """The margins in force now, from whichever loss reports them (TCM)."""
        for loss in self.losses.values():
            if isinstance(loss, ReportsStatistics):
                stats = loss.statistics()
                if "margin_plus" in stats and "margin_minus" in stats:
                    return stats
        return None

    def finish(self) -> dict:
        """Callbacks' last word (best checkpoint), test metrics, export, metrics.json, figures."""
        from train.plots import plot_training

        ended: dict[str, Any] = {}
        for cb in self.callbacks:
            ended.update(cb.on_fit_end(self))
        metrics: dict[str, Any] = {}
        curves = None
        if self.test_set is not None:
            metrics, curves = self.evaluate(self.test_set)
            self.say("test: " + _line(metrics))
        metrics |= {"epochs": self.epoch, "steps": self.step, "seconds": self.seconds, **ended}
        tested_step = ended["best"]["step"] if ended.get("restored_best") else self.step
        if self.val_set is not None and self.epochs:
            row = next((e for e in self.epochs if e["step"] == tested_step), self.epochs[-1])
            metrics["val"] = {k: v for k, v in row.items() if k != "split"}
        margins = self.final_margins()
        if margins:
            metrics["final_margins"] = {k: margins[k] for k in ("margin_plus", "margin_minus")}
        if self.export:  # sweeps skip it: they compare losses, not ship models
            recipe = recipe_of(self.cfg, margins)
            diff = export_model(self.model.cpu(), self.run_dir / "model.onnx", recipe)
            self.model.to(self.device)
            metrics["export_max_abs_diff"] = diff
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(json_safe(metrics), indent=2))
        atomic_write_text(self.run_dir / "history.json", json.dumps(self.history))
        if curves is not None:
            np.savez_compressed(
                self.run_dir / "utility_curves.npz",
                grid=curves.grid,
                class_utility=curves.class_utility,
                tenant_utility=curves.tenant_utility,
            )
        plot_training(self.history, self.epochs, self.run_dir / "curves.png")
        self.say(f"wrote {self.run_dir}: metrics.json, curves.png" + (", model.onnx" * self.export))
        return metrics

    def say(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(text)


def _tcm_params(cfg: TrainConfig) -> dict[str, float] | None:
    if not cfg.tcm:
        return None
    return {
        "lambda_plus": cfg.lambda_plus,
        "lambda_minus": cfg.lambda_minus,
        "margin_plus": cfg.margin_plus,
        "margin_minus": cfg.margin_minus,
    }


def _param_groups(cfg: TrainConfig, model: torch.nn.Module, losses: Mapping) -> list[dict]:
    """The embedder at ``lr``; loss parameters (proxies, class centres) at ``proxy_lr``."""
    groups = [{"params": list(model.parameters()), "lr": cfg.lr}]
    loss_params = [p for loss in losses.values() for p in loss.parameters() if p.requires_grad]
    if loss_params:
        groups.append({"params": loss_params, "lr": cfg.proxy_lr})
    return groups


def _early_stopping(cfg: TrainConfig, val_set: ImageSet | None) -> StopWhenFlat:
    """``--patience`` / ``--restore-best``: on held-out classes, never the test split.

    Attached whenever classes are held out, so every run records its best held-out
    step (``best`` in metrics.json), stopping and restoring only when asked to.
    """
    if val_set is None:
        raise ValueError(
            "--patience and --restore-best judge held-out train classes (never the test "
            "split): set --val-fraction > 0 (e.g. 0.1)"
        )
    return StopWhenFlat(
        cfg.patience or None, min_delta=cfg.min_delta, restore_best=cfg.restore_best
    )


def _calibrated_margins(cfg: TrainConfig, tcm: torch.nn.Module, val_set: ImageSet | None):
    from train.margins import CalibratedMargins

    if val_set is None:
        raise ValueError(
            "--margins calibrated measures the operating range on held-out train classes: "
            "set --val-fraction > 0 (e.g. 0.1)"
        )
    return CalibratedMargins(
        tcm,
        val_set,
        every=cfg.margin_every,
        warmup=cfg.margin_warmup,
        far_range=(cfg.margin_far_lo, cfg.margin_far_hi),
        offset=cfg.margin_offset,
        momentum=cfg.margin_momentum,
    )


_BRIEF = ("recall_at_1", "map_at_r", "opis", "eps_opis", "tenant_opis", "far_min", "far_max", "tar")


def _brief(metrics: dict[str, Any]) -> dict[str, Any]:
    out = {k: metrics.get(k) for k in _BRIEF}
    out["far_spread"] = metrics["far_spread"] if math.isfinite(metrics["far_spread"]) else None
    return json_safe(out)


def _line(m: dict) -> str:
    return (
        f"R@1 {m['recall_at_1']:.4f}  MAP@R {m['map_at_r']:.4f}  OPIS {m['opis']:.3e}  "
        f"eps-OPIS {m['eps_opis']:.3e}  TAR@{m['target_far']:g} {_num(m.get('tar'))}  "
        f"tenant FAR {m['far_min']:.1e}..{m['far_max']:.1e}"
    )


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
