"""The training loop: m-per-class batches, base loss + TCM, checkpoints, per-epoch evaluation.

A run directory holds everything: ``config.json`` (resolved), ``checkpoint.pt`` (every
epoch, for ``--resume``), ``epochs.json`` (metrics per epoch), ``history.json`` (loss per
step), and at the end ``model.onnx``, ``metrics.json``, ``curves.png`` and
``utility_curves.npz``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from contracts import atomic_write_text
from imagesets import ImageSet, load_images
from train import distributed
from train.base_losses import build_losses
from train.config import TrainConfig
from train.data import class_subset, eval_loader, train_loader
from train.evaluate import evaluate_embeddings
from train.export import embedder_meta, export_model
from train.losses import SharedCosineSimilarity
from train.models import Embedder, build_model


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


def recipe_of(cfg: TrainConfig) -> dict:
    """What goes into the model's metadata: enough to know how it was trained."""
    keys = ("dataset", "backbone", "embedding_dim", "loss", "loss_params", "tcm", "epochs", "seed")
    recipe = {k: getattr(cfg, k) for k in keys}
    if cfg.tcm:
        recipe.update(
            lambda_plus=cfg.lambda_plus,
            lambda_minus=cfg.lambda_minus,
            margin_plus=cfg.margin_plus,
            margin_minus=cfg.margin_minus,
        )
    return recipe


class Trainer:
    """One run: build everything from a config, train, evaluate, export."""

    def __init__(
        self, cfg: TrainConfig, run_dir: Path, quiet: bool = False, export: bool = True
    ) -> None:
        self.cfg = cfg
        self.export = export
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        torch.set_num_threads(max(1, cfg.threads))
        self.device = resolve_device(cfg.device)
        self.ddp = distributed.init_from_env(self.device)
        self.rank = distributed.rank()
        seed_everything(cfg.seed + self.rank)
        self.train_set = load_images(cfg.dataset, "train")
        self.test_set = class_subset(load_images(cfg.dataset, "test"), cfg.eval_limit, cfg.seed)
        # dense 0..C-1 labels for proxy/classifier losses
        classes, dense = np.unique(self.train_set.labels, return_inverse=True)
        self.train_labels = dense.reshape(-1)
        self.model: Embedder = build_model(cfg.backbone, cfg.embedding_dim, cfg.width, cfg.weights)
        self.meta = embedder_meta(self.model, recipe_of(cfg))
        self.model.to(self.device)
        tcm = (
            {
                "lambda_plus": cfg.lambda_plus,
                "lambda_minus": cfg.lambda_minus,
                "margin_plus": cfg.margin_plus,
                "margin_minus": cfg.margin_minus,
            }
            if cfg.tcm
            else None
        )
        self.losses = torch.nn.ModuleDict(
            build_losses(cfg.loss, len(classes), cfg.embedding_dim, cfg.loss_params, tcm)
        ).to(self.device)
        self.net = self.model
        if self.ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.steps = cfg.steps_per_epoch or max(1, len(self.train_set) // cfg.batch_size)
        self.optimizer = self._optimizer()
        total = self.steps * cfg.epochs
        self.scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total)
            if cfg.schedule == "cosine"
            else torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0)
        )
        self.amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.epoch = 0
        self.history: list[dict] = []
        self.epochs: list[dict] = []

    def _optimizer(self) -> torch.optim.Optimizer:
        groups = [{"params": self.model.parameters(), "lr": self.cfg.lr}]
        loss_params = [p for p in self.losses.parameters() if p.requires_grad]
        if loss_params:
            groups.append({"params": loss_params, "lr": self.cfg.proxy_lr})
        if self.cfg.optimizer == "adamw":
            return torch.optim.AdamW(groups, weight_decay=self.cfg.weight_decay)
        if self.cfg.optimizer == "sgd":
            return torch.optim.SGD(groups, momentum=0.9, weight_decay=self.cfg.weight_decay)
        raise ValueError(f"optimizer must be adamw or sgd, got {self.cfg.optimizer!r}")

    # ---- checkpoints -------------------------------------------------------------
    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        state = {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "losses": self.losses.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
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
        self.epoch, self.history, self.epochs = state["epoch"], state["history"], state["epochs"]
        print(f"resumed {path} after epoch {self.epoch}")

    # ---- training ----------------------------------------------------------------
    def _step(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        images, labels = images.to(self.device), labels.to(self.device)
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
        if "tcm" in self.losses:
            out["tcm+"] = float(self.losses["tcm"].pos_term)
            out["tcm-"] = float(self.losses["tcm"].neg_term)
        out["loss"] = float(total.detach())
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
            disable=self.quiet or self.rank != 0,
            dynamic_ncols=True,
        )
        start, seen = time.perf_counter(), 0
        for images, labels in bar:
            terms = self._step(images, labels)
            seen += len(images)
            rate = seen / max(time.perf_counter() - start, 1e-9)
            self.history.append({"epoch": self.epoch + 1, **terms})
            bar.set_postfix({k: f"{v:.4f}" for k, v in terms.items()} | {"img/s": f"{rate:.0f}"})
        self.epoch += 1

    # ---- evaluation --------------------------------------------------------------
    @torch.no_grad()
    def embed(self, images: ImageSet) -> np.ndarray:
        self.model.eval()
        parts = [
            self.model(x.to(self.device)).float().cpu() for x, _ in eval_loader(images, self.meta)
        ]
        return torch.cat(parts).numpy()

    def evaluate(self):
        emb = self.embed(self.test_set)
        return evaluate_embeddings(
            emb,
            self.test_set.labels,
            self.test_set.tenants,
            self.test_set.tenant_names,
            target_far=self.cfg.target_far,
        )

    def run(self) -> dict:
        """Train the remaining epochs, evaluate each ``eval_every``, export at the end."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            atomic_write_text(self.run_dir / "config.json", self.cfg.to_json())
        metrics, curves = None, None
        while self.epoch < self.cfg.epochs:
            self.train_epoch()
            last = self.epoch == self.cfg.epochs
            if self.rank == 0 and (last or self.epoch % max(1, self.cfg.eval_every) == 0):
                metrics, curves = self.evaluate()
                self.epochs.append({"epoch": self.epoch, **_brief(metrics)})
                self._say(f"epoch {self.epoch}: " + _line(metrics))
                atomic_write_text(self.run_dir / "epochs.json", json.dumps(self.epochs, indent=2))
            self.save_checkpoint()
        if self.rank != 0:
            return {}
        if metrics is None:  # resumed a run that had already finished
            self._say(f"{self.run_dir} already finished {self.epoch} epochs; nothing to do")
            return json.loads((self.run_dir / "metrics.json").read_text())
        return self.finish(metrics, curves)

    def finish(self, metrics: dict, curves) -> dict:
        from train.plots import plot_training

        metrics = {**metrics, "epochs": self.epoch}
        if self.export:  # sweeps skip it: they compare losses, not ship models
            diff = export_model(self.model.cpu(), self.run_dir / "model.onnx", recipe_of(self.cfg))
            metrics["export_max_abs_diff"] = diff
        atomic_write_text(self.run_dir / "metrics.json", json.dumps(json_safe(metrics), indent=2))
        atomic_write_text(self.run_dir / "history.json", json.dumps(self.history))
        np.savez_compressed(
            self.run_dir / "utility_curves.npz",
            grid=curves.grid,
            class_utility=curves.class_utility,
            tenant_utility=curves.tenant_utility,
        )
        plot_training(self.history, self.epochs, self.run_dir / "curves.png")
        self._say(
            f"wrote {self.run_dir}: metrics.json, curves.png" + (", model.onnx" * self.export)
        )
        return metrics

    def _say(self, text: str) -> None:
        if not self.quiet:
            tqdm.write(text)


_BRIEF = ("recall_at_1", "map_at_r", "opis", "eps_opis", "tenant_opis", "far_min", "far_max")


def _brief(metrics: dict) -> dict:
    out = {k: metrics[k] for k in _BRIEF}
    out["far_spread"] = metrics["far_spread"] if math.isfinite(metrics["far_spread"]) else None
    return out


def json_safe(value):
    """JSON has no infinity: an unmeasurable spread becomes null."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _line(m: dict) -> str:
    return (
        f"R@1 {m['recall_at_1']:.4f}  MAP@R {m['map_at_r']:.4f}  OPIS {m['opis']:.3e}  "
        f"eps-OPIS {m['eps_opis']:.3e}  tenant FAR@{m['target_far']:g} "
        f"{m['far_min']:.1e}..{m['far_max']:.1e}"
    )
