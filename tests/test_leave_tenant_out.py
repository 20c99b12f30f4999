"""The leave-tenant-out consistency study (calibrate/studies/leave_tenant_out.py) on
synthetic tenants."""

from __future__ import annotations

import numpy as np
import pytest

from calibrate.heldout.holdout import rotations, split_classes
from calibrate.studies.consistency_report import markdown
from calibrate.studies.leave_tenant_out import main, run_study
from calibrate.studies.outcomes import FLOOR, StudySettings, far_stats
from tests.tenant_sets import save_npz, tenants_with_tails


@pytest.fixture(scope="module")
def study():
    settings = StudySettings(
        targets=(1e-2, 1e-3), splits=2, bootstrap=20, gallery_sizes=(15, 200), as_norm_top_k=20
    )
    return run_study(tenants_with_tails(per_class=10), settings, progress=False)


def test_every_class_is_evaluated_once_per_split_and_roles_rotate():
    emb = tenants_with_tails()
    parts = split_classes(emb.labels, emb.tenants, 3, np.random.default_rng(0))
    for rows in parts:
        classes = [set(emb.labels[r]) for r in rows]
        assert not (classes[0] & classes[1]) and not (classes[1] & classes[2])
    evaluated = [e for _, _, e in rotations(3)]
    galleries = [g for g, _, _ in rotations(3)]
    assert sorted(evaluated) == [0, 1, 2] and sorted(galleries) == [0, 1, 2]
    assert all(len({g, c, e}) == 3 for g, c, e in rotations(3))


def test_normalisation_reaches_the_floor_and_raw_does_not(study):
    a = 1e-2
    raw, tail, floor = (study.summary(m, a) for m in ("raw", "tenant-tail", FLOOR))
    assert raw["std_log10"] > 3 * floor["std_log10"]
    assert tail["std_log10"] < raw["std_log10"] / 2
    assert 0.5 < tail["pooled"] < 2
    far, tar = study.per_tenant("tenant-tail", a)
    assert far.shape == tar.shape == (4,) and np.all((tar >= 0) & (tar <= 1))


def test_intervals_bracket_the_split_average(study):
    s = study.summary("tenant-tail", 1e-2)
    ci = study.intervals("tenant-tail", 1e-2)
    assert ci["within"][0] <= 4 and ci["max_min"][0] >= 1
    assert ci["max_min"][0] <= ci["max_min"][1]
    assert s["within"] <= 4


def test_small_galleries_fall_back_to_the_identity(study):
    sizes = study.splits[0].sizes
    acc15, _, active15 = sizes[(15, 1e-2, "gallery")]
    _, _, active200 = sizes[(200, 1e-2, "gallery")]
    assert active15 == 0  # 15 items: ~100 pairs, far below 30 / top_level
    assert active200 == 3 * 4  # every tenant gallery in every rotation
    assert np.isfinite(acc15).all()
    # served traffic is evidence too: the 15-item galleries come alive
    _, _, traffic15 = sizes[(15, 1e-2, "traffic")]
    assert traffic15 > active15


def test_far_stats_counts_a_silent_tenant_as_half_an_accept():
    s = far_stats(np.array([10.0, 0.0]), np.array([1000.0, 1000.0]), 0.01)
    assert s["max_min"] == pytest.approx(20.0)
    assert s["within"] == 1 and s["pooled"] == pytest.approx(0.5)


def test_report_states_each_goal_as_met_or_missed(study):
    text = markdown([study], "python -m calibrate.studies.leave_tenant_out --test")
    assert "| 0.01 | tenant-tail |" in text and "| 0.01 | oracle |" in text
    goals = [line for line in text.splitlines() if line.startswith("- tails, tenant-tail")]
    assert len(goals) == 2 and all(("met" in g) or ("MISSED" in g) for g in goals)


def test_command_writes_report_and_figure(linear_model, tmp_path, capsys):
    npz = tmp_path / "tails.npz"
    save_npz(tenants_with_tails(per_class=8), npz)
    data = ["--model", f"lin={linear_model}", "--dataset", str(npz), "--splits", "1"]
    settings = ["--target-far", "0.01", "--bootstrap", "5", "--gallery-sizes", ""]
    code = main([*data, *settings, "--methods", "tenant-tail", "--out", str(tmp_path / "out")])
    assert code == 0
    assert "### lin" in (tmp_path / "out" / "report.md").read_text()
    assert (tmp_path / "out" / "per_tenant_far.png").stat().st_size > 0


def test_command_refuses_an_unknown_method(tmp_path, capsys):
    assert main(["--methods", "zscore", "--out", str(tmp_path)]) == 2
    assert "unknown methods" in capsys.readouterr().err
