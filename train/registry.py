"""One small registry for the parts of a training run, in timm's shape.

``LOSSES``, ``BACKBONES``, ``OPTIMIZERS`` and ``DATASETS`` each map a name to a factory;
``register`` adds one (as a decorator), ``create`` calls it, ``names`` lists them. Adding a
loss or a backbone is then one decorated function in any module, with no edit to the
trainer or the CLI::

    from train.registry import BACKBONES

    @BACKBONES.register("tinynet")
    def tinynet(width: int = 8) -> Backbone:
        ...

Each registry fills itself on first use by importing the module that holds the
built-in entries (``home``), so ``import train.registry`` stays cheap and there is no
import cycle between the registry and the modules that register into it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class UnknownNameError(ValueError):
    """A name that no factory is registered under; the message lists the known names."""


class Registry(Generic[T]):
    """Names -> factories of one kind of part (a loss, a backbone, ...)."""

    def __init__(self, kind: str, home: str | None = None) -> None:
        self.kind = kind
        self._home = home
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str | None = None) -> Callable[[F], F]:
        """Decorator: register the function under ``name`` (default: its own name)."""

        def add(factory: F) -> F:
            key = name or factory.__name__
            if key in self._factories and self._factories[key] is not factory:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._factories[key] = factory
            return factory

        return add

    def get(self, name: str) -> Callable[..., T]:
        """The factory itself (its signature documents its parameters)."""
        self._load()
        try:
            return self._factories[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; choose one of {self.names()}"
            ) from None

    def create(self, name: str, /, *args: Any, **kwargs: Any) -> T:
        """Call the factory registered as ``name``; bad parameters are a ValueError."""
        factory = self.get(name)
        try:
            inspect.signature(factory).bind(*args, **kwargs)
        except TypeError as err:
            raise ValueError(f"bad parameters for {self.kind} {name!r}: {err}") from err
        return factory(*args, **kwargs)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._factories)

    def describe(self) -> dict[str, str]:
        """Name -> the first line of its factory's docstring (for ``--list``)."""
        return {n: (inspect.getdoc(self._factories[n]) or "").split("\n")[0] for n in self.names()}

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._factories

    def _load(self) -> None:
        if self._home is None:
            return
        home, self._home = self._home, None  # set first: the home module registers into us
        try:
            importlib.import_module(home)
        except BaseException:
            self._home = home
            raise


LOSSES: Registry = Registry("base loss", home="train.base_losses")
BACKBONES: Registry = Registry("backbone", home="train.models")
OPTIMIZERS: Registry = Registry("optimizer", home="train.optim")
DATASETS: Registry = Registry("dataset", home="train.data")

REGISTRIES: dict[str, Registry] = {
    "losses": LOSSES,
    "backbones": BACKBONES,
    "optimizers": OPTIMIZERS,
    "datasets": DATASETS,
}


def split_spec(spec: str) -> tuple[str, str]:
    """``"cub:/data/CUB"`` -> ``("cub", "/data/CUB")``; ``"glyphs"`` -> ``("glyphs", "")``."""
    name, _, arg = spec.partition(":")
    return name, arg
