"""The score normalisers by name: ``register`` / ``create`` / ``names`` (as timm does models).

Every normaliser is fitted per tenant from its gallery alone (vectors and enrolment
identities, never query labels) and judged by the leave-tenant-out protocol of
docs/CONSISTENCY.md. ``servable`` says whether the server can apply it per Match:
the tenant-tail map is a per-tenant monotone function of the raw similarity and is
served; AS-norm is measured offline only (it widened the FAR spread, see the docs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class NormalizerInfo:
    name: str
    summary: str
    servable: bool
    monotone: bool  # a per-tenant increasing function of the raw similarity


_REGISTRY: dict[str, NormalizerInfo] = {}


def register(name: str, summary: str, *, servable: bool, monotone: bool) -> NormalizerInfo:
    if name in _REGISTRY:
        raise ValueError(f"normaliser {name!r} is already registered")
    info = NormalizerInfo(name, summary, servable, monotone)
    _REGISTRY[name] = info
    return info


def names(servable_only: bool = False) -> list[str]:
    return [n for n, i in _REGISTRY.items() if i.servable or not servable_only]


def info(name: str) -> NormalizerInfo:
    """The entry for ``name``; an unknown name is a usage error that lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown normalisation {name!r}; choose one of {names()}") from None


def choice(servable_only: bool = False) -> Callable[[str], str]:
    """An argparse ``type=`` that accepts registered names only."""

    def check(value: str) -> str:
        found = info(value)
        if servable_only and not found.servable:
            raise ValueError(
                f"{value!r} is evaluated offline only; serve with one of {names(True)}"
            )
        return value

    return check


NONE = register("none", "raw cosine similarity, one global threshold", servable=True, monotone=True)
TENANT_TAIL = register(
    "tenant-tail",
    "quantile-map each tenant's impostor tail (from its gallery) onto the calibration's",
    servable=True,
    monotone=True,
)
AS_NORM = register(
    "as-norm",
    "adaptive symmetric normalisation with a top-K cohort from the tenant's gallery",
    servable=False,
    monotone=False,
)
DEFAULT = TENANT_TAIL.name
