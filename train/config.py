"""Training configuration: one flat dataclass, read from TOML, overridden by CLI flags.

Flat on purpose: every field is also a ``--flag``, the run directory stores the
resolved config as JSON, and ``--resume`` reads it back, so a run is reproducible
from its directory alone.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass
class TrainConfig:
    """Everything a training run depends on (see docs/TRAINING.md for each knob)."""

    # data
    dataset: str = "glyphs"
    m_per_class: int = 4
    batch_size: int = 128
    workers: int = 0
    val_fraction: float = 0.1  # train classes held out for validation and margins; 0 = none
    # model
    backbone: str = "glyphnet"
    embedding_dim: int = 64
    width: int = 32
    weights: str = ""  # local file for timm/torchvision backbones; never downloaded
    # loss
    loss: str = "multi_similarity"
    loss_params: dict[str, Any] = field(default_factory=dict)
    tcm: bool = True
    lambda_plus: float = 1.0
    lambda_minus: float = 1.0
    margin_plus: float = 0.9
    margin_minus: float = 0.5
    margins: str = "fixed"  # fixed (the two above) or calibrated (from the operating range)
    margin_every: int = 100  # steps between operating-range measurements (calibrated)
    margin_warmup: int = 200  # steps with the fixed margins before the first measurement
    margin_offset: float = 0.0  # m- = t(FAR_hi) - offset, m+ = t(FAR_lo) + offset
    margin_momentum: float = 0.0  # smoothing of calibrated margins (0 = none)
    margin_far_lo: float = 1e-4
    margin_far_hi: float = 1e-2
    # optimisation
    epochs: int = 3
    steps_per_epoch: int = 0  # 0: one pass over the train set
    lr: float = 1e-3
    proxy_lr: float = 1e-2  # the loss's own parameters (ProxyAnchor proxies, ArcFace centres)
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup_steps: int = 0
    amp: bool = True  # only takes effect on CUDA
    seed: int = 0
    device: str = "auto"
    threads: int = 2
    # evaluation
    eval_every: int = 1
    patience: int = 0  # stop after this many evaluations without a held-out R@1 gain; 0 = off
    min_delta: float = 0.0  # the held-out R@1 gain that counts as one for --patience
    restore_best: bool = False  # test and export the best held-out evaluation, not the last
    eval_limit: int = 0  # 0: whole test split; else at most this many test images
    target_far: float = 1e-3

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> TrainConfig:
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {self.names()}")
        merged = {**asdict(self), **changes}
        return TrainConfig(**merged)


def load_config(path: str | Path | None) -> TrainConfig:
    """Read a TOML (or a run's config.json) file into a config; unknown keys are errors."""
    if path is None:
        return TrainConfig()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot parse config: {err}") from err
    flat: dict[str, Any] = {}
    for key, value in data.items():
        # [loss_params] tables stay dicts; any other table is flattened for readability.
        if isinstance(value, dict) and key != "loss_params":
            flat.update(value)
        else:
            flat[key] = value
    try:
        return TrainConfig().replace(**flat)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
