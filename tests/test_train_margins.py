"""Calibration-aware TCM margins: the measured range, the callback, and a real tiny run."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("onnxscript")

from imagesets import ImageSet  # noqa: E402
from train.losses import TCMLoss  # noqa: E402
from train.margins import CalibratedMargins, margins_from_range, operating_range  # noqa: E402

pytestmark = pytest.mark.torch


def _embedded(seed: int, n: int = 240, d: int = 6, classes: int = 24, tenants: int = 3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, size=n)
    centres = rng.normal(size=(classes, d))
    emb = centres[labels] + 0.8 * rng.normal(size=(n, d))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), labels, labels % tenants  # a class lives in one tenant


def _brute_threshold(emb, labels, tenants, far: float) -> float:
    """Smallest observed impostor score that accepts at most floor(far * M) impostor pairs."""
    scores = []
    for t in np.unique(tenants):
        idx = np.flatnonzero(tenants == t)
        sim = emb[idx] @ emb[idx].T
        i, j = np.triu_indices(len(idx), k=1)
        impostor = labels[idx][i] != labels[idx][j]
        scores.append(sim[i, j][impostor])
    s = np.sort(np.concatenate(scores))[::-1]
    k = math.floor(far * len(s))
    candidates = np.unique(s)
    ok = [x for x in candidates if (s >= x).sum() <= k]
    return float(min(ok))


def test_operating_range_is_calibrates_exact_thresholds():
    emb, labels, tenants = _embedded(0)
    names = ("a", "b", "c")
    lo, hi = operating_range(emb, labels, tenants, names, far_range=(1e-2, 1e-1))
    assert lo < hi
    assert lo == pytest.approx(_brute_threshold(emb, labels, tenants, 1e-1), abs=1e-6)
    assert hi == pytest.approx(_brute_threshold(emb, labels, tenants, 1e-2), abs=1e-6)


def test_operating_range_not_measurable_is_none():
    emb, labels, tenants = _embedded(1, n=30, classes=6)
    # 1e-6 of a few hundred impostor pairs is less than one pair
    assert operating_range(emb, labels, tenants, ("a", "b", "c"), (1e-7, 1e-6)) is None


def test_margins_from_range_widen_and_clip():
    assert margins_from_range(0.80, 0.95, 0.0) == (0.95, 0.80)
    plus, minus = margins_from_range(0.80, 0.95, 0.02)
    assert plus == pytest.approx(0.97) and minus == pytest.approx(0.78)
    assert margins_from_range(0.5, 0.99, 0.1) == (1.0, 0.4)
    assert margins_from_range(-0.95, 0.2, 0.1)[1] == -1.0


class FakeTrainer:
    """Just what the callback talks to: embed() and say(); counts the embeddings."""

    def __init__(self, emb: np.ndarray) -> None:
        self.emb, self.calls, self.said = emb, 0, []

    def embed(self, images) -> np.ndarray:
        self.calls += 1
        return self.emb

    def say(self, text: str) -> None:
        self.said.append(text)


def _held_out(labels, tenants) -> ImageSet:
    pixels = np.zeros((len(labels), 2, 2), np.uint8)
    return ImageSet(
        "held",
        labels,
        tuple(map(str, range(labels.max() + 1))),
        tenants,
        ("a", "b", "c"),
        pixels=pixels,
    )


def test_callback_sets_margins_from_the_measured_range():
    emb, labels, tenants = _embedded(2)
    held = _held_out(labels, tenants)
    tcm = TCMLoss()
    cb = CalibratedMargins(tcm, held, every=5, far_range=(1e-2, 1e-1), offset=0.01)
    trainer = FakeTrainer(emb)
    cb.on_fit_start(trainer)  # measures before the first step
    lo, hi = operating_range(emb, labels, tenants, held.tenant_names, (1e-2, 1e-1))
    assert (tcm.margin_plus, tcm.margin_minus) == pytest.approx((hi + 0.01, lo - 0.01))
    assert cb.on_step_end(trainer, 3) == {} and trainer.calls == 1
    logged = cb.on_step_end(trainer, 5)
    assert trainer.calls == 2 and logged == pytest.approx({"range_lo": lo, "range_hi": hi})
    assert [row["step"] for row in cb.measured] == [0, 5]


def test_callback_waits_for_the_warm_up():
    emb, labels, tenants = _embedded(6)
    tcm = TCMLoss(margin_plus=0.9, margin_minus=0.5)
    cb = CalibratedMargins(
        tcm, _held_out(labels, tenants), every=2, warmup=3, far_range=(1e-2, 1e-1)
    )
    trainer = FakeTrainer(emb)
    cb.on_fit_start(trainer)
    measured_at = [step for step in range(1, 8) if cb.on_step_end(trainer, step)]
    assert trainer.calls == 3 and measured_at == [3, 5, 7]
    assert (tcm.margin_plus, tcm.margin_minus) != (0.9, 0.5)
    with pytest.raises(ValueError, match="warm-up"):
        CalibratedMargins(tcm, _held_out(labels, tenants), warmup=-1)


def test_callback_momentum_and_resume():
    emb, labels, tenants = _embedded(3)
    held = _held_out(labels, tenants)
    tcm = TCMLoss()
    cb = CalibratedMargins(tcm, held, every=1, far_range=(1e-2, 1e-1), momentum=0.5)
    trainer = FakeTrainer(emb)
    cb.on_fit_start(trainer)
    first = tcm.margin_plus
    tcm.set_margins(0.0, 0.0)  # pretend the margins had drifted to 0
    cb.on_step_end(trainer, 1)
    assert tcm.margin_plus == pytest.approx(0.5 * first)  # half old (0), half measured
    # a resumed run puts back the last margins without measuring
    again = TCMLoss()
    resumed = CalibratedMargins(again, held, every=1, far_range=(1e-2, 1e-1))
    resumed.load_state_dict(json.loads(json.dumps(cb.state_dict())))
    fresh = FakeTrainer(emb)
    resumed.on_fit_start(fresh)
    assert fresh.calls == 0
    assert (again.margin_plus, again.margin_minus) == (tcm.margin_plus, tcm.margin_minus)


def test_callback_keeps_margins_when_not_measurable():
    emb, labels, tenants = _embedded(4, n=30, classes=6)
    tcm = TCMLoss(margin_plus=0.9, margin_minus=0.5)
    cb = CalibratedMargins(tcm, _held_out(labels, tenants), every=1, far_range=(1e-7, 1e-6))
    trainer = FakeTrainer(emb)
    cb.on_fit_start(trainer)
    assert (tcm.margin_plus, tcm.margin_minus) == (0.9, 0.5)
    assert "not measurable" in trainer.said[0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every"),
        ({"momentum": 1.0}, "momentum"),
        ({"far_range": (0.1, 0.01)}, "range"),
    ],
)
def test_callback_rejects_bad_settings(kwargs, match):
    _, labels, tenants = _embedded(5)
    with pytest.raises(ValueError, match=match):
        CalibratedMargins(TCMLoss(), _held_out(labels, tenants), **kwargs)


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory) -> Path:
    from train.cli import main

    out = tmp_path_factory.mktemp("calibrated")
    argv = ["--tiny", "--quiet", "--threads", "1", "--out", str(out), "--epochs", "2"]
    argv += ["--tcm", "--margins", "calibrated", "--margin-every", "2", "--margin-offset", "0.01"]
    argv += ["--margin-warmup", "2", "--margin-plus", "0.9", "--margin-minus", "0.5"]
    argv += ["--margin-far-lo", "1e-3", "--margin-far-hi", "1e-1"]
    assert main(argv) == 0
    return out


@pytest.mark.slow
def test_a_calibrated_run_moves_its_margins_to_the_measured_range(calibrated_run: Path):
    history = json.loads((calibrated_run / "history.json").read_text())
    measured = [h for h in history if "range_lo" in h]
    assert [h["step"] for h in measured] == [2, 4, 6]
    # the warm-up steps train with the configured (paper's) margins
    assert [(h["tcm/margin_plus"], h["tcm/margin_minus"]) for h in history[:2]] == [(0.9, 0.5)] * 2
    for before, after in itertools.pairwise(history):
        if "range_lo" in before:  # the step after a measurement trains with its margins
            assert after["tcm/margin_plus"] == pytest.approx(min(1.0, before["range_hi"] + 0.01))
            assert after["tcm/margin_minus"] == pytest.approx(before["range_lo"] - 0.01)
    metrics = json.loads((calibrated_run / "metrics.json").read_text())
    last = history[-1]
    assert metrics["final_margins"] == pytest.approx(
        {"margin_plus": last["tcm/margin_plus"], "margin_minus": last["tcm/margin_minus"]}
    )
    from contracts import read_embedder_meta

    recipe = read_embedder_meta(calibrated_run / "model.onnx").recipe
    assert recipe["margins"] == "calibrated" and recipe["margin_offset"] == 0.01
    assert recipe["margin_plus"] == pytest.approx(metrics["final_margins"]["margin_plus"])
    assert metrics["val"]["recall_at_1"] >= 0.0 and metrics["steps"] == 6


@pytest.mark.slow
def test_resuming_a_calibrated_run_restores_its_margins(calibrated_run: Path, tmp_path: Path):
    import shutil

    from train.cli import main

    run = tmp_path / "resumed"
    shutil.copytree(calibrated_run, run)
    (run / "metrics.json").unlink()
    assert main(["--resume", str(run), "--quiet", "--epochs", "3"]) == 0
    history = json.loads((run / "history.json").read_text())
    before = json.loads((calibrated_run / "history.json").read_text())
    first_new = history[len(before)]
    assert first_new["step"] == 7
    # step 7 trains with the margins measured at step 6, restored from the checkpoint
    assert first_new["tcm/margin_minus"] == pytest.approx(before[-1]["range_lo"] - 0.01)


def test_calibrated_margins_need_held_out_classes(tmp_path: Path, capsys):
    from train.cli import main

    argv = ["--tiny", "--quiet", "--out", str(tmp_path), "--margins", "calibrated"]
    assert main([*argv, "--tcm", "--val-fraction", "0"]) == 2
    assert "--val-fraction" in capsys.readouterr().err
    assert main([*argv, "--no-tcm"]) == 2  # calibrated margins without TCM would do nothing
    assert "add --tcm" in capsys.readouterr().err
    assert main(["--tiny", "--quiet", "--out", str(tmp_path), "--margins", "adaptive"]) == 2
    assert "fixed or calibrated" in capsys.readouterr().err
