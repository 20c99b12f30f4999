"""The verdicts of ``calibrate --check`` on constructed counts (calibrate/heldout/verdict.py)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from calibrate.cli.main import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    EXIT_CHECK_INSUFFICIENT,
    main,
)
from calibrate.heldout.verdict import (
    FAIL,
    INSUFFICIENT,
    PASS,
    decide,
    overall,
    poisson_interval,
)

A = 1e-3  # the target FAR of every constructed case below
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("k", [0, 1, 2, 5, 10, 37.5, 100, 1000, 4999, 5001, 20000, 1e6])
def test_poisson_interval_is_garwoods(k):
    chi2 = pytest.importorskip("scipy.stats").chi2
    lo, hi = poisson_interval(k)
    assert hi == pytest.approx(chi2.ppf(0.975, 2 * k + 2) / 2, rel=1e-6)
    assert lo == (0.0 if k == 0 else pytest.approx(chi2.ppf(0.025, 2 * k) / 2, rel=1e-6))


def test_zero_accepted_is_the_rule_of_three_not_a_point():
    lo, hi = poisson_interval(0)
    assert lo == 0 and hi == pytest.approx(-math.log(0.025))  # 3.69 at 95% two-sided


def test_zero_accepted_on_few_pairs_is_insufficient_not_fail():
    """The first defect: [0, 0] from 0 accepted pairs failed a tenant for being too safe."""
    v = decide(0, 400, (0.0, 0.0), A, classes=20)
    assert v.verdict == INSUFFICIENT
    lo, hi = v.interval
    assert lo == 0 and hi == pytest.approx(3.689 / 400, rel=1e-3)  # the bootstrap's [0, 0] widened
    # 0 accepted of n pairs gives an upper end 3.69 / n: showing FAR <= 2a needs 3.69 / (2a)
    assert v.need.pairs == pytest.approx(3.689 / (2 * A), rel=2e-3)
    # held-out pairs grow with the square of the classes
    assert v.need.classes == math.ceil(20 * math.sqrt(v.need.pairs / 400))
    assert "FAR <= 2x target" in v.need.text(400, 20)


def test_zero_accepted_on_enough_pairs_passes():
    v = decide(0, 4000, (0.0, 0.0), A, classes=60)
    assert v.verdict == PASS and v.interval[1] < 2 * A and v.need is None


def test_a_point_estimate_above_twice_the_target_never_passes():
    """The second defect: 2.13x passed because its wide interval overlapped [a/2, 2a]."""
    v = decide(213, 100_000, (0.4 * A, 4.1 * A), A, classes=30)
    assert v.verdict == INSUFFICIENT
    assert "straddles 2x target" in v.reason
    # what would decide it at 2.13x is evidence that the FAR is above 2a
    assert "FAR > 2x target" in v.need.text(100_000, 30)
    assert v.need.pairs > 100_000 and v.need.classes > 30


@pytest.mark.parametrize(
    ("accepted", "pairs", "ci"),
    [
        (2130, 1_000_000, (1.9 * A, 2.4 * A)),  # narrow bootstrap, but it crosses 2a
        (3, 1000, (2.5 * A, 4 * A)),  # bootstrap above, the count's interval is not
    ],
)
def test_any_interval_reaching_above_twice_the_target_is_not_a_pass(accepted, pairs, ci):
    assert decide(accepted, pairs, ci, A, classes=50).verdict == INSUFFICIENT


def test_an_interval_wholly_above_twice_the_target_fails():
    v = decide(3000, 1_000_000, (2.5 * A, 3.6 * A), A, classes=80)
    assert v.verdict == FAIL and v.need is None
    assert v.interval[0] > 2 * A and "wholly above 2x target" in v.reason


def test_too_safe_passes_unless_asked_to_fail_it():
    counts = dict(accepted=20, pairs=1_000_000, ci=(0.01 * A, 0.04 * A), target=A, classes=80)
    assert decide(**counts).verdict == PASS
    v = decide(**counts, fail_if_too_safe=True)
    assert v.verdict == FAIL and "wholly below target/2" in v.reason


def test_zero_accepted_is_too_safe_only_with_enough_pairs():
    v = decide(0, 400, (0.0, 0.0), A, classes=20, fail_if_too_safe=True)
    assert v.verdict == INSUFFICIENT and "straddles 2x target and target/2" in v.reason
    # the upper end must cross both boundaries: only the lower one, a/2, is worth naming
    assert v.need.shows == "FAR < target/2 at the observed 0.00x"
    assert v.need.pairs == pytest.approx(3.689 / (A / 2), rel=2e-3)
    v = decide(0, 100_000, (0.0, 0.0), A, classes=200, fail_if_too_safe=True)
    assert v.verdict == FAIL  # upper end 3.69e-5 < a/2: the data show it is too safe


def test_fail_if_too_safe_needs_the_interval_inside_the_band_to_pass():
    inside = dict(accepted=1000, pairs=1_000_000, ci=(0.8 * A, 1.3 * A), target=A, classes=80)
    assert decide(**inside, fail_if_too_safe=True).verdict == PASS
    straddling = dict(accepted=600, pairs=1_000_000, ci=(0.3 * A, 0.9 * A), target=A, classes=80)
    assert decide(**straddling).verdict == PASS
    v = decide(**straddling, fail_if_too_safe=True)
    assert v.verdict == INSUFFICIENT and "straddles target/2" in v.reason
    assert "FAR >= target/2" in v.need.text(1_000_000, 80)  # 0.6x: heading for a pass


def test_the_bootstrap_width_drives_the_classes_needed():
    """Clustered classes: the bootstrap is much wider than the count's interval, and
    its half-width shrinks like 1/sqrt(classes)."""
    v = decide(1500, 1_000_000, (0.5 * A, 2.5 * A), A, classes=100)
    assert v.verdict == INSUFFICIENT
    # upper half-width 1.0a must shrink to 0.5a: four times the classes
    assert v.need.classes == pytest.approx(400, rel=0.01)
    assert v.need.pairs == pytest.approx(16_000_000, rel=0.02)


def test_a_rate_on_the_boundary_cannot_be_decided():
    v = decide(2000, 1_000_000, (1.5 * A, 2.5 * A), A, classes=100)
    assert v.verdict == INSUFFICIENT and v.need is None


def test_no_held_out_pairs_is_insufficient_and_names_the_classes_needed():
    v = decide(0, 0, None, A, classes=4, min_classes=6)
    assert v.verdict == INSUFFICIENT and v.interval is None
    assert v.need.pairs is None and "needs >= 6 classes (has 4)" in v.need.text(0, 4)


def test_overall_is_the_worst_row():
    assert overall([PASS, PASS]) == PASS
    assert overall([PASS, INSUFFICIENT]) == INSUFFICIENT
    assert overall([INSUFFICIENT, FAIL, PASS]) == FAIL
    assert overall([]) == PASS


# ---------------------------------------------- end to end: exit codes on a small real set
@pytest.fixture(scope="module")
def raw_doc(linear_model, tmp_path_factory):
    """The tiny linear embedder calibrated raw at FAR 0.01 on the glyphs-tiny test split."""
    out = tmp_path_factory.mktemp("check") / "calibration.json"
    argv = ["--model", str(linear_model), "--dataset", "glyphs-tiny", "--target-far", "0.01"]
    assert main([*argv, "--normalize", "none", "--out", str(out), "--no-progress"]) == 0
    return out


def check_train_split(model, doc, capsys, *extra: str) -> tuple[int, str, str]:
    """--check on the glyphs-tiny train split: classes the calibration never saw."""
    argv = ["--check", str(doc), "--model", str(model), "--dataset", "glyphs-tiny"]
    code = main([*argv, "--split", "train", "--no-progress", *extra])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def test_a_small_new_set_without_failures_is_insufficient_evidence(linear_model, raw_doc, capsys):
    code, printed, err = check_train_split(linear_model, raw_doc, capsys)
    assert code == EXIT_CHECK_INSUFFICIENT, printed + err
    assert "0 fail," in printed and " pass," in printed
    rows = {line.split()[0]: line for line in printed.splitlines() if line.startswith("  ")}
    assert rows["greek"].endswith("insufficient evidence")  # 5 classes: no held-out pairs
    assert "needs >= 6 classes (has 5)" in printed
    assert rows["latin"].endswith("pass")
    assert "to show FAR <= 2x target" in printed  # the needs line of an undecided row
    assert "check undecided, insufficient evidence: greek at target FAR 0.01" in err


def test_a_fail_beside_insufficient_rows_exits_as_fail(linear_model, raw_doc, capsys):
    code, printed, err = check_train_split(linear_model, raw_doc, capsys, "--fail-if-too-safe")
    assert code == EXIT_CHECK_FAILED, printed + err
    assert "insufficient evidence" in printed and "FAIL" in printed
    assert "check failed: latin at target FAR 0.01" in err and "wholly below target/2" in err


def test_help_documents_the_exit_codes():
    run = subprocess.run(
        [sys.executable, "-m", "calibrate", "--help"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0
    text = " ".join(run.stdout.split())
    assert "--fail-if-too-safe" in text
    for code in (0, EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_CHECK_INSUFFICIENT):
        assert f" {code} " in text.split("exit status:")[1]
    assert "insufficient evidence" in text
