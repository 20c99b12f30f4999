"""Backbones by name: a small CNN for CPUs, timm/torchvision when installed (local weights).

Every model maps ``(N, C, H, W)`` float images (already normalised by the metadata's
mean/std) to L2-normalised ``(N, embedding_dim)`` embeddings, so the exported ONNX
graph returns what calibrate and the server expect without post-processing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


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


def glyphnet(width: int = 32) -> tuple[nn.Module, int]:
    """Four conv stages 32->16->8->4 px, then global average pooling: ~0.3M params at w=32."""
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
    return net, 4 * w


def _timm(name: str, weights: str) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError as err:
        raise RuntimeError(f"backbone timm:{name} needs `pip install timm`") from err
    net = timm.create_model(name, pretrained=False, num_classes=0)
    _load_weights(net, weights)
    return net, int(net.num_features)


def _torchvision(name: str, weights: str) -> tuple[nn.Module, int]:
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
    return net, int(features)


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


BACKBONES: dict[str, Callable[..., tuple[nn.Module, int]]] = {"glyphnet": glyphnet}


def build_model(backbone: str, dim: int, width: int = 32, weights: str = "") -> Embedder:
    """``glyphnet`` (default), ``timm:NAME`` or ``torchvision:NAME``."""
    kind, _, name = backbone.partition(":")
    if backbone in BACKBONES:
        net, features = BACKBONES[backbone](width)
        return Embedder(net, features, dim, GLYPH_INPUT)
    if kind == "timm" and name:
        return Embedder(*_timm(name, weights), dim, IMAGENET_INPUT)
    if kind == "torchvision" and name:
        return Embedder(*_torchvision(name, weights), dim, IMAGENET_INPUT)
    raise ValueError(
        f"unknown backbone {backbone!r}: use one of {sorted(BACKBONES)}, timm:NAME or "
        "torchvision:NAME"
    )
