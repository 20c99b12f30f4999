"""calibrate's normalisation side: global tail, held-out FAR raw vs normalised, --check, FPIR."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calibrate import evaluate
from calibrate.cli.main import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, main
from calibrate.heldout.fpir import held_out_fpir, independent_fpir, per_pair_far
from calibrate.heldout.holdout import threshold_at
from calibrate.heldout.normalized import held_out
from contracts import load_calibration
from scorenorm import ScoreHistogram, TailSettings
from tests.tenant_sets import save_npz, tenants_with_tails


def spread(values) -> float:
    v = np.maximum(np.asarray(values, dtype=float), 1e-3)
    return float(np.std(np.log10(v)))


def test_tail_level_bins_the_pooled_tail_exactly():
    emb = tenants_with_tails()
    ev = evaluate(emb, (0.01,), tail_level=0.05)
    x = emb.embeddings.astype(np.float64)
    impostors = []
    for k in range(4):
        rows = np.flatnonzero(emb.tenants == k)
        s = (x[rows] @ x[rows].T).astype(np.float32)
        i, j = np.triu_indices(len(rows), 1)
        keep = emb.labels[rows][i] != emb.labels[rows][j]
        impostors.append(s[i, j][keep])
    every = ScoreHistogram.of(np.concatenate(impostors))
    tail = ev.global_tail
    assert tail.total == every.total
    for p in (0.05, 0.01, 1e-3):  # every level down from tail_level is exact
        assert tail.quantile(p)[0] == pytest.approx(every.quantile(p)[0], abs=1e-12)


def test_fixed_thresholds_are_measured_not_recalibrated():
    emb = tenants_with_tails()
    deployed = 0.9
    ev = evaluate(emb, (0.01,), thresholds=[deployed])
    t = ev.targets[0]
    assert t.threshold == deployed
    x = emb.embeddings.astype(np.float64)
    for k, d in enumerate(t.datasets):
        rows = np.flatnonzero(emb.tenants == k)
        s = (x[rows] @ x[rows].T).astype(np.float32)
        i, j = np.triu_indices(len(rows), 1)
        imp = s[i, j][emb.labels[rows][i] != emb.labels[rows][j]]
        assert d.far == pytest.approx(np.mean(imp >= deployed), abs=1e-12)
        assert d.threshold_drift == pytest.approx(d.threshold - deployed)
    with pytest.raises(ValueError, match="one each"):
        evaluate(emb, (0.01, 0.001), thresholds=[0.9])


def test_held_out_normalisation_narrows_the_spread_of_tenant_far():
    emb = tenants_with_tails()
    ev = evaluate(emb, (0.01,), tail_level=0.02)
    t = ev.targets[0].threshold
    [res] = held_out(emb, {0.01: t}, ev.global_tail, TailSettings(), bootstrap=100)
    raw = [d.raw.far / 0.01 for d in res.datasets]
    norm = [d.normalized.far / 0.01 for d in res.datasets]
    assert spread(raw) > 0.4  # one threshold: tenants far apart
    assert spread(norm) < spread(raw) / 3
    for d in res.datasets:
        lo, hi = d.normalized.ci
        assert lo <= d.normalized.far <= hi
        assert d.active == 3  # every gallery part is big enough to map
        assert d.raw.pairs == d.normalized.pairs  # both columns count the same pairs


def test_without_a_tail_only_the_raw_column_is_filled():
    emb = tenants_with_tails()
    [res] = held_out(emb, {0.01: 0.9}, None, TailSettings(), bootstrap=10)
    assert all(d.normalized.far is None and d.raw.far is not None for d in res.datasets)


def test_threshold_at_is_the_design_order_statistic_with_ties():
    v = np.array([0.9, 0.8, 0.8, 0.8, 0.7, 0.5], np.float32)
    # k = floor(0.34 * 6) = 2 may be accepted; the 3rd largest is 0.8 (tied), so the
    # smallest threshold accepting at most 2 is the next value above it: 0.9
    assert threshold_at(v, 6, 0.34) == pytest.approx(0.9)
    assert threshold_at(v, 6, 0.5) == pytest.approx(0.9)  # k = 3: 0.8 would accept 4
    assert threshold_at(v, 6, 0.67) == pytest.approx(0.8)  # k = 4: 0.9 and the three 0.8s
    assert threshold_at(v, 6, 0.1) is None  # a * M < 1: not measurable


def test_fpir_math_round_trips():
    a = per_pair_far(0.01, 1000)
    assert independent_fpir(a, 1000) == pytest.approx(0.01, rel=1e-12)
    assert a == pytest.approx(1 - 0.99 ** (1 / 1000))
    with pytest.raises(ValueError):
        per_pair_far(1.5, 10)


def test_held_out_fpir_grows_with_gallery_size():
    emb = tenants_with_tails()
    t = evaluate(emb, (0.01,)).targets[0].threshold
    small = held_out_fpir(emb, {0.01: t}, 10, bootstrap=0)[0.01]
    large = held_out_fpir(emb, {0.01: t}, 120, bootstrap=0)[0.01]
    assert sum(d.raw.fpir for d in large) > sum(d.raw.fpir for d in small)
    for d in large:
        assert 0 <= d.raw.fpir <= 1 and d.raw.queries > 0 and d.normalized is None


# ------------------------------------------------------------------ the command line
@pytest.fixture
def tails_npz(tmp_path):
    path = tmp_path / "tails.npz"
    save_npz(tenants_with_tails(dim=16), path)
    return path


@pytest.fixture
def model(linear_model, tmp_path):
    """The 16-d linear embedder (.npz data is only checked against its dimension)."""
    copy = tmp_path / "m.onnx"
    copy.write_bytes(linear_model.read_bytes())
    return copy


def calibrate(model, npz, *extra: str) -> tuple[int, object]:
    out = model.parent / "cal" / "calibration.json"
    args = ["--model", str(model), "--dataset", str(npz), "--out", str(out)]
    code = main([*args, "--no-progress", "--bootstrap", "20", *extra])
    return code, out


def test_normalised_calibration_carries_tail_settings_and_held_out_rows(
    model, tmp_path, tails_npz, capsys
):
    code, out = calibrate(model, tails_npz, "--target-far", "0.01")
    assert code == 0
    doc = load_calibration(out)
    norm = doc.normalization()
    assert norm.method == "tenant-tail" and norm.settings.top_level == pytest.approx(0.02)
    assert norm.global_tail.total == doc.raw["targets"][0]["impostor_pairs"]
    rows = doc.raw["targets"][0]["datasets"]
    assert all(r["held_out"]["normalized"]["far"] is not None for r in rows)
    printed = capsys.readouterr().out
    assert "held-out classes" in printed and "tenant-tail" in printed
    assert (out.parent / "far_raw_vs_normalized.png").stat().st_size > 0


@pytest.mark.parametrize("method", ["as-norm", "zscore"])
def test_unknown_or_offline_normalisation_is_a_usage_error(
    model, tmp_path, tails_npz, method, capsys
):
    with pytest.raises(SystemExit) as exit_:
        calibrate(model, tails_npz, "--normalize", method)
    assert exit_.value.code == EXIT_BAD_INPUT
    assert "--normalize" in capsys.readouterr().err
    assert not (tmp_path / "cal").exists()


def test_target_fpir_calibrates_the_per_pair_far_it_implies(model, tails_npz):
    code, out = calibrate(model, tails_npz, "--target-fpir", "0.2", "--gallery-size", "50")
    assert code == 0
    [target] = load_calibration(out).raw["targets"]
    assert target["target_far"] == pytest.approx(-math.expm1(math.log1p(-0.2) / 50))
    assert target["fpir"]["gallery_size"] == 50 and target["fpir"]["target_fpir"] == 0.2
    assert len(target["fpir"]["datasets"]) == 4


def test_target_fpir_without_gallery_size_is_refused(model, tmp_path, tails_npz, capsys):
    code, out = calibrate(model, tails_npz, "--target-fpir", "0.2")
    assert code == EXIT_BAD_INPUT and not out.exists()
    assert "--gallery-size" in capsys.readouterr().err


def check(model, doc, npz, capsys, *extra: str) -> tuple[int, str, str]:
    args = ["--check", str(doc), "--model", str(model), "--dataset", str(npz)]
    code = main([*args, "--no-progress", "--bootstrap", "50", *extra])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def test_check_passes_on_data_like_the_calibration(model, tmp_path, tails_npz, capsys):
    _, doc = calibrate(model, tails_npz, "--target-far", "0.01")
    fresh = tmp_path / "fresh.npz"
    # same kind of tenants, three times the classes: intervals narrow enough to pass
    save_npz(tenants_with_tails(seed=0, classes=144), fresh)
    code, printed, _ = check(model, doc, fresh, capsys)
    assert code == 0, printed
    assert "4 pass, 0 fail, 0 insufficient evidence" in printed
    assert "check passed" in printed


def test_check_fails_the_gate_when_one_threshold_cannot_hold(model, tmp_path, tails_npz, capsys):
    """Served raw (--normalize none), new tenants with other tails land off target."""
    _, doc = calibrate(model, tails_npz, "--target-far", "0.01", "--normalize", "none")
    other = tmp_path / "other.npz"
    save_npz(tenants_with_tails(spreads=(0.3, 1.5), seed=5), other)
    code, printed, err = check(model, doc, other, capsys)
    assert code == EXIT_CHECK_FAILED
    assert "deployed thresholds measured on the new data" in printed
    assert "check failed" in err and "wholly above 2x target" in err
    assert "FAIL" in printed  # the verdict column


@pytest.mark.parametrize(("flag", "code"), [([], 0), (["--fail-if-too-safe"], EXIT_CHECK_FAILED)])
def test_a_too_safe_tenant_fails_only_when_asked(model, tmp_path, tails_npz, capsys, flag, code):
    """Served raw, one new tenant whose classes lie far apart accepts no impostor pair."""
    _, doc = calibrate(model, tails_npz, "--target-far", "0.01", "--normalize", "none")
    safe = tmp_path / "safe.npz"
    save_npz(tenants_with_tails(spreads=(1.5,), seed=5), safe)
    got, printed, err = check(model, doc, safe, capsys, *flag)
    assert got == code, printed + err
    if flag:  # 0 of 23,040 pairs: the upper end 3.69 / 23,040 = 0.016x target is below 1/2
        assert "[0.00, 0.02] x target wholly below target/2 (0 of 23,040" in err
        assert "0 pass, 1 fail, 0 insufficient evidence" in printed
    else:
        assert "1 pass, 0 fail, 0 insufficient evidence" in printed


def test_fail_if_too_safe_belongs_to_check(model, tmp_path, tails_npz, capsys):
    code, out = calibrate(model, tails_npz, "--fail-if-too-safe")
    assert code == EXIT_BAD_INPUT and not out.exists()
    assert "--fail-if-too-safe goes with --check" in capsys.readouterr().err


def test_check_refuses_another_model(model, tmp_path, tails_npz, capsys):
    _, doc = calibrate(model, tails_npz, "--target-far", "0.01")
    other = tmp_path / "other.onnx"
    other.write_bytes(model.read_bytes() + b"\0")  # another file: another sha256
    model = other
    code, _, err = check(model, doc, tails_npz, capsys)
    assert code == EXIT_BAD_INPUT
    assert "sha256" in err
