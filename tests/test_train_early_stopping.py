"""Early stopping restores the best held-out checkpoint; the loss's own parameters get their LR."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch",
    reason="the optional train extra; ./test.sh installs it and fails on any skip",
)
pytest.importorskip(
    "pytorch_metric_learning",
    reason="the optional train extra; ./test.sh installs it and fails on any skip",
)

from train.cli import TINY  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.trainer import Trainer  # noqa: E402

pytestmark = pytest.mark.torch

# held-out Recall@1 the test makes the run "measure" at evaluations 1, 2, 3, ...: the best
# is the second; with patience 2 the run stops after the fourth (6 epochs allowed)
SCRIPTED_RECALL = [0.50, 0.90, 0.60, 0.40, 0.95, 0.99]


def _tiny(**changes) -> TrainConfig:
    return TrainConfig().replace(**{**TINY, "threads": 1, "tcm": False, **changes})


class _Snapshots:
    """Copies the model's weights at every held-out evaluation (what best.pt should hold)."""

    def __init__(self) -> None:
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_evaluate(self, trainer: Trainer) -> None:
        state = trainer.model.state_dict()
        self.by_step[trainer.step] = {k: v.detach().clone() for k, v in state.items()}


def _scripted(trainer: Trainer, snapshots: _Snapshots) -> None:
    """Held-out evaluations report SCRIPTED_RECALL in turn; the test split stays real."""
    real = trainer.evaluate
    calls = iter(SCRIPTED_RECALL)

    def evaluate(images):
        metrics, curves = real(images)
        if images is trainer.val_set:
            snapshots.on_evaluate(trainer)
            metrics = {**metrics, "recall_at_1": next(calls)}
        return metrics, curves

    trainer.evaluate = evaluate


@pytest.mark.slow
def test_early_stopping_stops_and_restores_the_best_checkpoint(tmp_path: Path) -> None:
    cfg = _tiny(epochs=6, patience=2, restore_best=True, min_delta=0.0)
    trainer = Trainer.from_config(cfg, tmp_path, quiet=True, export=True)
    snapshots = _Snapshots()
    _scripted(trainer, snapshots)
    metrics = trainer.run()

    steps = cfg.steps_per_epoch
    assert trainer.stopped_early and metrics["steps"] == 4 * steps  # 0.90, then 2 flat
    assert metrics["best"] == {"step": 2 * steps, "epoch": 2, "recall_at_1": 0.90}
    assert metrics["restored_best"] is True
    assert metrics["val"]["step"] == 2 * steps and metrics["val"]["recall_at_1"] == 0.90
    best = snapshots.by_step[2 * steps]
    last = snapshots.by_step[4 * steps]
    now = trainer.model.state_dict()
    assert all(torch.equal(now[k], best[k]) for k in best)  # the model is the best one ...
    assert any(not torch.equal(best[k], last[k]) for k in best)  # ... which is not the last
    # the exported model computes what the best weights compute
    import onnxruntime as ort

    from train.models import build_model

    ref = build_model("glyphnet", cfg.embedding_dim, width=cfg.width)
    ref.load_state_dict(best)
    x = np.random.default_rng(0).uniform(-1, 1, size=(4, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = ref.eval()(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x})[0]
    assert np.abs(got - want).max() <= 1e-4
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["best"]["step"] == 2 * steps and saved["seconds"] > 0


def test_patience_and_restore_need_held_out_classes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="val-fraction"):
        Trainer.from_config(_tiny(patience=2, val_fraction=0.0), tmp_path, quiet=True)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_loss_parameters_train_at_their_own_learning_rate(tmp_path: Path, schedule: str) -> None:
    cfg = _tiny(loss="proxy_anchor", lr=1e-3, proxy_lr=0.25, schedule=schedule, warmup_steps=0)
    trainer = Trainer.from_config(cfg, tmp_path, quiet=True, export=False, test=False)
    assert trainer.test_set is None  # test=False never loads the test split
    model_group, loss_group = trainer.optimizer.param_groups
    proxies = trainer.losses["base"].proxies
    assert [p is proxies for p in loss_group["params"]] == [True]
    assert {id(p) for p in model_group["params"]} == {id(p) for p in trainer.model.parameters()}
    assert (model_group["lr"], loss_group["lr"]) == (1e-3, 0.25)
    assert trainer.scheduler.base_lrs == [1e-3, 0.25]
    # and the rates act: Adam's first step moves every parameter with a gradient by ~lr
    before_p = proxies.detach().clone()
    head = trainer.model.head.weight
    before_h = head.detach().clone()
    trainer.cfg = cfg.replace(epochs=1, steps_per_epoch=1)
    trainer.steps = 1
    trainer.train_epoch()
    proxy_step = (proxies.detach() - before_p).abs().max().item()
    head_step = (head.detach() - before_h).abs().max().item()
    assert proxy_step == pytest.approx(0.25, rel=0.05)
    assert head_step == pytest.approx(1e-3, rel=0.05)


def test_torchvision_notices_are_dropped_and_nothing_else(caplog) -> None:
    import logging

    from train.export import _REGISTRATION_LOGGER, _quiet_torchvision_notices

    logger = logging.getLogger(_REGISTRATION_LOGGER)
    with caplog.at_level(logging.WARNING, logger=_REGISTRATION_LOGGER):
        with _quiet_torchvision_notices():
            logger.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
            logger.warning("torchvision is not installed. Skipping %s", "other::op")
            logger.warning("something else")
        logger.warning("torchvision is not installed. Skipping %s", "torchvision::roi_align")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "torchvision is not installed. Skipping other::op",
        "something else",
        "torchvision is not installed. Skipping torchvision::roi_align",  # outside an export
    ]
