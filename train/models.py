"""Backbones by name (``BACKBONES``): small CNNs for CPUs, timm/torchvision (local weights).

Every model maps ``(N, C, H, W)`` float images (already normalised by the metadata's
mean/std) to L2-normalised ``(N, embedding_dim)`` embeddings, so the exported ONNX
graph returns what calibrate and the server expect without post-processing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from train.registry import BACKBONES, split_spec


@dataclass(frozen=True)
class InputSpec:
    """What the model eats: becomes the embedder metadata at export."""

    height: int
    width: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


GLYPH_INPUT = InputSpec(32, 32, 1, (0.5,), (0.5,))
IMAGENET_INPUT = InputSpec(224, 224, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class Embedder(nn.Module):
    """Backbone features -> linear projection -> L2 normalisation."""

    def __init__(self, backbone: nn.Module, features: int, dim: int, spec: InputSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(features, dim)
        self.spec = spec
        self.dim = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images)), dim=1)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class Backbone(NamedTuple):
    """A feature extractor, its output width and the input it expects."""

    net: nn.Module
    features: int
    spec: InputSpec


@BACKBONES.register("glyphnet")
def glyphnet(width: int = 32) -> Backbone:
    """Small VGG-style CNN for 32x32 glyphs: 4 stages of 2 convs, ~0.15M params at width 16."""
    w = width
    net = nn.Sequential(
        _block(1, w),
        nn.MaxPool2d(2),
        _block(w, 2 * w),
        nn.MaxPool2d(2),
        _block(2 * w, 4 * w),
        nn.MaxPool2d(2),
        _block(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return Backbone(net, 4 * w, GLYPH_INPUT)


@BACKBONES.register("timm")
def timm_backbone(name: str, weights: str = "") -> Backbone:
    """timm:NAME, any timm model without its classifier (local weights; needs timm)."""
    try:
        import timm
    except ImportError as err:
        raise RuntimeError(f"backbone timm:{name} needs `pip install timm`") from err
    net = timm.create_model(name, pretrained=False, num_classes=0)
    _load_weights(net, weights)
    return Backbone(net, int(net.num_features), IMAGENET_INPUT)


@BACKBONES.register("torchvision")
def torchvision_backbone(name: str, weights: str = "") -> Backbone:
    """torchvision:NAME, a torchvision classifier with its head removed (needs torchvision)."""
    try:
        from torchvision import models
    except ImportError as err:
        raise RuntimeError(f"backbone torchvision:{name} needs `pip install torchvision`") from err
    net = models.get_model(name, weights=None)
    _load_weights(net, weights)
    head_name = "fc" if hasattr(net, "fc") else "heads" if hasattr(net, "heads") else None
    if head_name is None:
        raise RuntimeError(f"torchvision:{name}: cannot find its classifier (fc/heads) to remove")
    head = getattr(net, head_name)
    features = head.in_features if isinstance(head, nn.Linear) else head[-1].in_features
    setattr(net, head_name, nn.Identity())
    return Backbone(net, int(features), IMAGENET_INPUT)


def _load_weights(net: nn.Module, weights: str) -> None:
    """Load a local state dict; nothing is ever downloaded at run time."""
    if not weights:
        return
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights {path} not found (weights are never downloaded)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    print(f"loaded {path}: {len(missing)} missing, {len(unexpected)} unexpected keys")


def build_model(backbone: str, dim: int, width: int = 32, weights: str = "") -> Embedder:
    """An embedder from a backbone spec: a registered name, or ``FAMILY:NAME`` (``timm:resnet50``).

    The config's backbone knobs (``width``, ``weights``) go to the factories that take
    them, so each factory declares what it uses and nothing else.
    """
    family, name = split_spec(backbone)
    factory = BACKBONES.get(family)
    accepted = inspect.signature(factory).parameters
    if name and "name" not in accepted:
        raise ValueError(f"backbone {family!r} takes no name: use {family!r}, not {backbone!r}")
    if "name" in accepted and not name:
        raise ValueError(f"backbone {family!r} needs a model name: {family}:NAME")
    knobs = {"name": name, "width": width, "weights": weights}
    net, features, spec = BACKBONES.create(
        family, **{k: v for k, v in knobs.items() if k in accepted}
    )
    return Embedder(net, features, dim, spec)
