"""The parts registry (register / create / names), ``--list``, and a Trainer built from parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("onnxscript")

from train.registry import (  # noqa: E402
    BACKBONES,
    DATASETS,
    LOSSES,
    OPTIMIZERS,
    Registry,
    UnknownNameError,
)

pytestmark = pytest.mark.torch


def test_register_create_names() -> None:
    reg: Registry = Registry("widget")

    @reg.register("big")
    def big(size: int = 10) -> int:
        """A big widget."""
        return size * 2

    @reg.register()
    def small() -> int:
        return 1

    assert reg.names() == ["big", "small"]
    assert reg.create("big", size=4) == 8 and reg.create("small") == 1
    assert "big" in reg and "huge" not in reg
    assert reg.describe() == {"big": "A big widget.", "small": ""}
    assert reg.get("big") is big


def test_unknown_name_duplicate_and_bad_parameters_are_clear_errors() -> None:
    reg: Registry = Registry("widget")
    reg.register("a")(lambda x=1: x)
    with pytest.raises(UnknownNameError, match=r"unknown widget 'b'; choose one of \['a'\]"):
        reg.create("b")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a")(lambda: 2)
    with pytest.raises(ValueError, match="bad parameters for widget 'a'"):
        reg.create("a", y=3)


def test_builtin_registries_fill_themselves() -> None:
    assert {"multi_similarity", "proxy_anchor", "none"} <= set(LOSSES.names())
    assert {"glyphnet", "timm", "torchvision"} <= set(BACKBONES.names())
    assert {"adamw", "sgd"} <= set(OPTIMIZERS.names())
    assert {"glyphs", "glyphs-tiny", "folder", "cub", "sop"} <= set(DATASETS.names())


def test_list_prints_every_registry(capsys) -> None:
    from train.cli import main

    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for kind in ("losses:", "backbones:", "optimizers:", "datasets:"):
        assert kind in out
    for name in ("proxy_anchor", "glyphnet", "adamw", "glyphs-tiny"):
        assert f"  {name} " in out


def test_a_registered_backbone_is_buildable_by_name() -> None:
    from train.models import GLYPH_INPUT, Backbone, build_model

    @BACKBONES.register("test-flat")
    def flat(width: int = 4) -> Backbone:
        """Flatten + linear: a test backbone."""
        return Backbone(
            torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(width)), width, GLYPH_INPUT
        )

    try:
        model = build_model("test-flat", 5, width=7)
        out = model(torch.randn(3, 1, 32, 32))
        assert out.shape == (3, 5)
        assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
        with pytest.raises(ValueError, match="takes no name"):
            build_model("test-flat:x", 5)
        with pytest.raises(ValueError, match="needs a model name"):
            build_model("timm", 5)
    finally:
        BACKBONES._factories.pop("test-flat")


def test_dataset_specs() -> None:
    from train.data import load_dataset

    tiny = load_dataset("glyphs-tiny", "test")
    assert tiny.name == "glyphs-test" and len(tiny) > 0
    with pytest.raises(UnknownNameError, match="unknown dataset 'nope'"):
        load_dataset("nope", "train")
    with pytest.raises(FileNotFoundError):
        load_dataset("cub:/does/not/exist", "train")


class CountingLoss(torch.nn.Module):
    """A loss the trainer has never heard of: mean similarity, with its own statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return (emb @ emb.T).mean()

    def statistics(self) -> dict[str, float]:
        return {"calls": float(self.calls)}


@pytest.mark.slow
def test_trainer_runs_on_injected_parts(tmp_path: Path) -> None:
    from train.config import TrainConfig
    from train.data import load_dataset
    from train.models import build_model
    from train.trainer import Trainer

    torch.manual_seed(0)
    cfg = TrainConfig(
        dataset="glyphs-tiny", epochs=2, steps_per_epoch=2, batch_size=16, embedding_dim=8, width=4
    )
    model = build_model("glyphnet", 8, width=4)
    loss = CountingLoss()
    trainer = Trainer(
        cfg,
        tmp_path / "run",
        model=model,
        losses={"spread": loss},
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_set=load_dataset("glyphs-tiny", "train"),
        test_set=load_dataset("glyphs-tiny", "test"),
        quiet=True,
        export=False,
    )
    metrics = trainer.run()
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["spread/calls"] for h in history] == [1.0, 2.0, 3.0, 4.0]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert metrics["steps"] == 4 and "val" not in metrics  # no validation set given
    assert 0.0 <= metrics["recall_at_1"] <= 1.0
    epochs = json.loads((tmp_path / "run" / "epochs.json").read_text())
    assert [e["split"] for e in epochs] == ["test", "test"]
    assert not (tmp_path / "run" / "model.onnx").exists()
    assert np.isfinite(history[-1]["loss"])
