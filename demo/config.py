"""What one demo run does: the flags of ``python -m demo``, as one frozen settings object."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoConfig:
    target_far: float = 1e-3
    model: Path | None = None
    tenants: tuple[str, ...] = ("latin", "greek", "cyrillic", "math")
    enrolled: int = 100
    gallery_per_class: int = 5
    genuine_per_class: int = 2
    impostor_classes: int = 60
    impostor_per_class: int = 3
    out: Path = Path("out/demo")
    device: str = "auto"
    seed: int = 0
    tiny: bool = False
    train: bool = False
    compare: bool = False
    compare_steps: int = 400
    prometheus: bool = False
    serve: bool = False

    @property
    def dataset(self) -> str:
        return "glyphs-tiny" if self.tiny else "glyphs"
