"""Small parts of a run: held-out classes, the learning-rate schedule, early stopping."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_metric_learning")

from train.callbacks import StopWhenFlat  # noqa: E402
from train.data import hold_out_classes  # noqa: E402
from train.optim import build_schedule  # noqa: E402

pytestmark = pytest.mark.torch


def test_held_out_classes_are_whole_disjoint_per_tenant_and_fixed(tiny_glyphs) -> None:
    from imagesets import load_images

    train = load_images("glyphs-tiny", "train")
    fit, val = hold_out_classes(train, 0.1, seed=3)
    assert len(fit) + len(val) == len(train)
    assert not set(fit.labels) & set(val.labels)  # whole classes, never split
    for t in np.unique(train.tenants):
        held = np.unique(val.labels[val.tenants == t])
        kept = np.unique(fit.labels[fit.tenants == t])
        assert len(held) >= 2 and len(kept) >= 2  # FAR needs >= 2 classes in a tenant
    again, _ = hold_out_classes(train, 0.1, seed=3)
    assert np.array_equal(again.labels, fit.labels)
    other, _ = hold_out_classes(train, 0.1, seed=4)
    assert not np.array_equal(other.labels, fit.labels)
    with pytest.raises(ValueError, match="fraction"):
        hold_out_classes(train, 0.0)


def _factors(name: str, total: int, warmup: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = build_schedule(name, opt, total, warmup)
    out = []
    for _ in range(total):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_warms_up_then_decays_to_zero() -> None:
    lr = _factors("cosine", 10, 2)
    assert lr[:2] == pytest.approx([0.5, 1.0])
    assert lr[2] == pytest.approx(1.0) and lr[-1] == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 7 / 8))
    )
    assert all(a >= b for a, b in itertools.pairwise(lr[1:]))
    # no warm-up: the same curve as torch's CosineAnnealingLR (the old recipe's schedule)
    plain = _factors("cosine", 8, 0)
    assert plain == pytest.approx([0.5 * (1 + math.cos(math.pi * t / 8)) for t in range(8)])
    assert _factors("constant", 5, 0) == [1.0] * 5
    with pytest.raises(ValueError, match="schedule"):
        _factors("linear", 5, 0)


def test_stop_when_flat() -> None:
    from types import SimpleNamespace

    stop = StopWhenFlat(patience=2, min_delta=0.001)
    trainer = SimpleNamespace(step=0)
    evaluations = [(1, 0.90, False), (2, 0.95, False), (3, 0.9505, False), (4, 0.94, True)]
    for step, value, should in evaluations:
        trainer.step = step
        stop.on_evaluate(trainer, step, {"recall_at_1": value})
        assert stop.should_stop() is should
    # patience counts from the last gain of min_delta (0.95); the best is the highest value
    assert (stop.level, stop.best, stop.best_step) == (0.95, 0.9505, 3)
    restored = StopWhenFlat(patience=2)
    restored.load_state_dict(stop.state_dict())
    assert restored.should_stop() and restored.best == 0.9505 and restored.best_step == 3
    never = StopWhenFlat(patience=None)
    for step in range(1, 20):
        never.on_evaluate(SimpleNamespace(step=step), step, {"recall_at_1": 0.5})
    assert not never.should_stop() and never.best_step == 1
    with pytest.raises(ValueError, match="patience"):
        StopWhenFlat(patience=0)
