"""Optimizers by name (``OPTIMIZERS``) and the learning-rate schedule.

An optimizer factory takes torch parameter groups (the embedder's, and the loss's own
parameters such as proxies with their own learning rate) and ``weight_decay``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from train.registry import OPTIMIZERS

ParamGroups = Iterable[dict]


@OPTIMIZERS.register("adamw")
def adamw(groups: ParamGroups, weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay): the default for every recipe here."""
    return torch.optim.AdamW(list(groups), weight_decay=weight_decay)


@OPTIMIZERS.register("sgd")
def sgd(groups: ParamGroups, weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """SGD with Nesterov-free momentum 0.9."""
    return torch.optim.SGD(list(groups), momentum=0.9, weight_decay=weight_decay)


SCHEDULES = ("cosine", "constant")


def build_schedule(
    name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step multiplier: linear warm-up, then cosine decay to 0 or constant.

    A warm-up keeps the first steps of a randomly initialised network (whose embeddings
    start nearly collapsed) from taking full-size Adam steps.
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {name!r}")
    total, warm = max(1, total_steps), max(0, min(warmup_steps, total_steps - 1))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if name == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
