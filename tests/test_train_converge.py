"""The convergence matrix (train.converge), its process runner (train.jobs) and LR tuning.

Process-level tests run a stub "python" that writes a fabricated result instead of
training, so resuming and aggregation are checked in well under a second per test.
"""

from __future__ import annotations

import json
import math
import stat
import sys
from pathlib import Path

import pytest

from train.config import TrainConfig
from train.converge import load_matrix, main, plan
from train.jobs import RESULT, Job, run_jobs
from train.sweep import summary
from train.tune import choose, set_toml_values, short_config

# per setting, per seed: test OPIS and Recall@1 the fabricated runs report
OPIS = {
    "pa": [0.040, 0.042, 0.038],
    "pa-tcm": [0.020, 0.021, 0.019],
    "ms-ref": [0.020, 0.020, 0.020],
    "ms-tcm": [0.021, 0.019, 0.020],
}
R1 = {"pa": [0.80, 0.81, 0.79], "pa-tcm": [0.82, 0.82, 0.82], "ms-ref": [0.97] * 3}
# +0.0, +0.5, +2.5 points: mean +1.0, between one and two standard errors (0.76 pt)
R1["ms-tcm"] = [0.97, 0.975, 0.995]

MATRIX = """
[protocol]
epochs = 3
steps_per_epoch = 2
patience = 1
restore_best = true

[[setting]]
name = "pa"
config = "recipe.toml"
set = { loss = "proxy_anchor" }

[[setting]]
name = "pa-tcm"
config = "recipe.toml"
base = "pa"
set = { loss = "proxy_anchor", tcm = true, lambda_plus = 10.0 }

[[setting]]
name = "ms-ref"
config = "recipe.toml"

[[setting]]
name = "ms-tcm"
config = "retuned.toml"
base = "ms-ref"
set = { tcm = true }
"""

STUB = """#!{python}
# stands in for `python -m train.jobs RUN_DIR`: a result from the tables, no training
import json, sys
from pathlib import Path

run = Path(sys.argv[3])
job = json.loads((run / "job.json").read_text())
with open(sys.argv[0] + ".calls", "a") as calls:
    calls.write(job["name"] + "\\n")
table = json.loads({tables!r})
info = job["info"]
opis = table["opis"][info["setting"]][info["seed"]]
r1 = table["r1"][info["setting"]][info["seed"]]
metrics = {{"recall_at_1": r1, "opis": opis, "eps_opis": 10 * opis, "tenant_opis": opis / 4,
           "tar": 0.5, "map_at_r": 0.5, "far_spread": 10.0, "steps": 6}}
curve = [{{"step": s, "recall_at_1": r1 - 0.1 / s, "tar": 0.4, "opis": opis, "eps_opis": 0.1}}
         for s in (2, 4, 6)]
result = {{**info, "name": job["name"], "config": job["config"], "seconds": 1.5, "steps": 6,
          "best_step": 6, "stopped_early": False, "restored_best": False, "curve": curve,
          "metrics": metrics}}
(run / "result.json").write_text(json.dumps(result))
"""


@pytest.fixture
def matrix_dir(tmp_path: Path) -> Path:
    (tmp_path / "recipe.toml").write_text('[data]\ndataset = "glyphs-tiny"\n[optim]\nlr = 0.002\n')
    (tmp_path / "retuned.toml").write_text('[data]\ndataset = "glyphs-tiny"\n[optim]\nlr = 0.005\n')
    (tmp_path / "matrix.toml").write_text(MATRIX)
    return tmp_path


@pytest.fixture
def stub(tmp_path: Path) -> Path:
    path = tmp_path / "stub-python"
    tables = json.dumps({"opis": OPIS, "r1": R1})
    path.write_text(STUB.format(python=sys.executable, tables=tables))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _calls(stub: Path) -> list[str]:
    calls = Path(str(stub) + ".calls")
    return calls.read_text().split() if calls.is_file() else []


def test_matrix_resolves_recipe_protocol_changes_and_seed(matrix_dir: Path) -> None:
    matrix = load_matrix(matrix_dir / "matrix.toml")
    assert matrix.bases() == {"pa-tcm": "pa", "ms-tcm": "ms-ref"}
    jobs = plan(matrix, [0, 1], matrix_dir / "out", {"threads": 2})
    assert [j.name for j in jobs[:4]] == ["pa-s0", "pa-tcm-s0", "ms-ref-s0", "ms-tcm-s0"]
    cfg = jobs[1].config
    assert (cfg.dataset, cfg.lr, cfg.loss, cfg.tcm, cfg.lambda_plus) == (
        "glyphs-tiny",
        0.002,
        "proxy_anchor",
        True,
        10.0,
    )
    assert (cfg.epochs, cfg.patience, cfg.restore_best, cfg.threads) == (3, 1, True, 2)
    assert jobs[5].config.seed == 1 and jobs[5].info == {
        "setting": "pa-tcm",
        "seed": 1,
        "base": "pa",
    }
    with pytest.raises(ValueError, match="unknown settings"):
        matrix.select(["nope"])


def test_matrix_file_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "m.toml"
    bad.write_text('[[setting]]\nname = "a"\nconfig = "x.toml"\nbase = "b"\n')
    with pytest.raises(ValueError, match="unknown 'b'"):
        load_matrix(bad)
    bad.write_text('[protocol]\npatiense = 3\n[[setting]]\nname = "a"\nconfig = "x.toml"\n')
    with pytest.raises(ValueError, match="unknown config keys"):
        load_matrix(bad)


def test_run_jobs_skips_finished_runs_and_resumes_the_rest(tmp_path: Path, stub: Path) -> None:
    cfg = TrainConfig()
    jobs = [
        Job(
            f"ms-ref-s{seed}",
            tmp_path / f"ms-ref-s{seed}",
            cfg,
            info={"setting": "ms-ref", "seed": seed},
        )
        for seed in range(3)
    ]
    jobs[1].run_dir.mkdir()
    (jobs[1].run_dir / RESULT).write_text(json.dumps({"name": "kept"}))
    lines: list[str] = []
    failures = run_jobs(
        jobs, n_jobs=2, threads_per_job=1, python=str(stub), poll_s=0.05, say=lines.append
    )
    assert failures == []
    assert sorted(_calls(stub)) == ["ms-ref-s0", "ms-ref-s2"]  # the finished one is not rerun
    assert json.loads((jobs[1].run_dir / RESULT).read_text()) == {"name": "kept"}
    assert "1 of 3 runs already finished: skipped" in lines
    # the runner pins each process's threads: in job.json and in its environment
    assert json.loads((jobs[0].run_dir / "job.json").read_text())["config"]["threads"] == 1
    assert json.loads((jobs[0].run_dir / RESULT).read_text())["process_seconds"] > 0
    # everything finished: a second call starts nothing
    assert run_jobs(jobs, python=str(stub), poll_s=0.05, say=lines.append) == []
    assert len(_calls(stub)) == 2


def test_a_failing_run_is_reported_and_the_others_go_on(tmp_path: Path) -> None:
    failing = tmp_path / "fails"
    failing.write_text("#!/bin/sh\necho 'boom: out of memory' >&2\nexit 3\n")
    failing.chmod(0o755)
    job = Job("x-s0", tmp_path / "x-s0", TrainConfig())
    lines: list[str] = []
    (failure,) = run_jobs([job], python=str(failing), poll_s=0.05, say=lines.append)
    assert failure.returncode == 3 and "boom" in (job.run_dir / "train.log").read_text()
    assert any("FAILED (exit 3)" in line and "boom" in line for line in lines)
    assert not (job.run_dir / RESULT).exists()


def test_converge_resumes_and_aggregates_paired_changes(
    matrix_dir: Path, stub: Path, monkeypatch
) -> None:
    import functools

    from train import converge

    monkeypatch.setattr(
        converge, "run_jobs", functools.partial(run_jobs, python=str(stub), poll_s=0.05)
    )
    out = matrix_dir / "out"
    argv = ["--matrix", str(matrix_dir / "matrix.toml"), "--out", str(out), "--jobs", "2"]
    assert main([*argv, "--seeds", "0"]) == 0  # seed 0 first: a partial matrix
    assert len(_calls(stub)) == 4
    assert main([*argv, "--seeds", "0", "1", "2"]) == 0  # resumed: only seeds 1 and 2 run
    calls = _calls(stub)
    assert len(calls) == 12 and len(set(calls)) == 12

    doc = json.loads((out / "results.json").read_text())
    assert len(doc["runs"]) == 12 and (out / "curves.png").stat().st_size > 10_000
    run = doc["runs"][0]
    assert {"seconds", "steps", "best_step", "curve"} <= set(run)
    assert set(run["curve"][0]) == {"step", "recall_at_1", "tar", "opis", "eps_opis"}
    # the pair whose recipes also differ in the learning rate says so (its own set does not)
    assert doc["confounds"] == {"ms-tcm": {"lr": [0.002, 0.005]}}

    pa = next(p for p in doc["paired"] if p["setting"] == "pa-tcm")
    assert pa["base"] == "pa" and pa["seeds"] == [0, 1, 2]
    want = [(t - b) / b for b, t in zip(OPIS["pa"], OPIS["pa-tcm"], strict=True)]
    assert pa["opis"]["per_seed"] == pytest.approx(want)
    diffs = [t - b for b, t in zip(R1["pa"], R1["pa-tcm"], strict=True)]  # +0.02, +0.01, +0.03
    assert pa["recall_at_1"]["mean"] == pytest.approx(0.02)
    assert pa["recall_at_1"]["std"] == pytest.approx(0.01)
    assert pa["recall_at_1"]["se"] == pytest.approx(0.01 / math.sqrt(3))
    assert pa["recall_at_1"]["per_seed"] == pytest.approx(diffs)
    assert pa["opis"]["outside"] is True and pa["recall_at_1"]["outside"] is True
    ms = next(p for p in doc["paired"] if p["setting"] == "ms-tcm")
    assert ms["base"] == "ms-ref"
    assert ms["opis"]["mean"] == pytest.approx(0.0) and ms["opis"]["outside"] is False
    assert ms["recall_at_1"]["per_seed"] == pytest.approx([0.0, 0.005, 0.025])
    assert ms["recall_at_1"]["se"] < ms["recall_at_1"]["mean"] < 2 * ms["recall_at_1"]["se"]
    assert ms["recall_at_1"]["outside"] is False
    assert doc["settings"]["pa"]["opis"]["mean"] == pytest.approx(0.040)
    assert doc["settings"]["pa"]["opis"]["std"] == pytest.approx(0.002)
    md = (out / "results.md").read_text()
    assert "| pa-tcm | pa | 3 |" in md and "| ms-tcm | ms-ref | 3 |" in md


def test_noise_needs_two_seeds() -> None:
    one = [
        {"name": f"{s}-s0", "setting": s, "seed": 0, "metrics": m}
        for s, m in (
            (
                "a",
                {
                    "opis": 0.02,
                    "eps_opis": 0.2,
                    "tenant_opis": 0.01,
                    "recall_at_1": 0.9,
                    "tar": 0.5,
                },
            ),
            (
                "b",
                {
                    "opis": 0.01,
                    "eps_opis": 0.1,
                    "tenant_opis": 0.01,
                    "recall_at_1": 0.9,
                    "tar": 0.5,
                },
            ),
        )
    ]
    (pair,) = summary(one, {"b": "a"})["paired"]
    assert pair["opis"]["mean"] == pytest.approx(-0.5)
    assert pair["opis"]["se"] is None and pair["opis"]["outside"] is None


# ---- learning-rate tuning ----------------------------------------------------------------
def _tuned(lr: float, plr: float | None, seed: int, curve: list[float]) -> dict:
    return {
        "lr": lr,
        "proxy_lr": plr,
        "seed": seed,
        "best_step": 100 * (curve.index(max(curve)) + 1),
        "seconds": 1.0,
        "curve": [{"step": 100 * (i + 1), "recall_at_1": v} for i, v in enumerate(curve)],
    }


def test_tuning_chooses_the_best_mean_held_out_recall() -> None:
    results = [
        _tuned(1e-3, 0.1, 0, [0.5, 0.8, 0.85]),
        _tuned(1e-3, 0.1, 1, [0.5, 0.8, 0.83]),  # mean best 0.84
        _tuned(2e-3, 0.1, 0, [0.6, 0.9, 0.88]),
        _tuned(2e-3, 0.1, 1, [0.6, 0.7, 0.72]),  # mean best 0.81: one lucky seed is not enough
        _tuned(1e-3, 1.0, 0, [0.2, 0.3, 0.3]),
        _tuned(1e-3, 1.0, 1, [0.2, 0.3, 0.3]),
    ]
    candidates, choice = choose(results)
    assert choice == {"lr": 1e-3, "proxy_lr": 0.1, "score": pytest.approx(0.84)}
    first = next(c for c in candidates if (c["lr"], c["proxy_lr"]) == (1e-3, 0.1))
    assert first["seeds"] == [0, 1] and set(first["curves"]) == {"0", "1"}
    # a tie on the best value goes to the higher last value, then to the smaller rates
    tie = [_tuned(4e-3, None, 0, [0.9, 0.8]), _tuned(2e-3, None, 0, [0.9, 0.85])]
    assert choose(tie)[1]["lr"] == 2e-3
    tie = [_tuned(4e-3, None, 0, [0.9]), _tuned(2e-3, None, 0, [0.9])]
    assert choose(tie)[1]["lr"] == 2e-3


def test_tuned_rates_are_written_into_the_config_keeping_comments() -> None:
    text = (
        "# learning rates: PROVISIONAL\n[optim]\nlr = 0.002   # the backbone\n"
        "proxy_lr = 0.2  # proxies\nwarmup_lr = 1.0\n"
    )
    new = set_toml_values(text, {"lr": 0.001, "proxy_lr": 0.05}, note="chosen by tune")
    assert new == (
        "# learning rates: chosen by tune\n[optim]\nlr = 0.001   # the backbone\n"
        "proxy_lr = 0.05  # proxies\nwarmup_lr = 1.0\n"
    )
    with pytest.raises(ValueError, match="one 'proxy_lr"):
        set_toml_values("lr = 1\n", {"proxy_lr": 0.1})


def test_short_tuning_runs_keep_their_whole_budget() -> None:
    cfg = short_config(TrainConfig(patience=5, restore_best=True), steps=700, eval_steps=100)
    assert (cfg.epochs, cfg.steps_per_epoch, cfg.eval_every) == (7, 100, 1)
    assert cfg.patience == 0 and cfg.restore_best is False
    with pytest.raises(ValueError, match="val_fraction"):
        short_config(TrainConfig(val_fraction=0.0), 700, 100)


@pytest.mark.slow
@pytest.mark.torch
def test_tune_end_to_end_on_glyphs_tiny(tmp_path: Path) -> None:
    """Two real candidate processes side by side; the test split is never loaded."""
    pytest.importorskip(
        "torch",
        reason="the optional train extra; ./test.sh installs it and fails on any skip",
    )
    from train.tune import main as tune_main

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        "# learning rates: PROVISIONAL\n"
        '[data]\ndataset = "glyphs-tiny"\nbatch_size = 32\n'
        "[model]\nwidth = 8\nembedding_dim = 16\n"
        '[loss]\nloss = "proxy_anchor"\ntcm = false\n'
        "[optim]\nlr = 0.002\nproxy_lr = 0.2\nthreads = 1\n"
    )
    out = tmp_path / "tune"
    argv = ["--config", str(recipe), "--lrs", "1e-3", "3e-3", "--proxy-lrs", "0.1"]
    argv += ["--steps", "4", "--eval-steps", "2", "--jobs", "2", "--out", str(out)]
    assert tune_main([*argv, "--write-config"]) == 0
    doc = json.loads((out / "tune.json").read_text())
    assert len(doc["candidates"]) == 2 and doc["steps"] == 4
    assert all([e["step"] for e in c["curves"]["0"]] == [2, 4] for c in doc["candidates"])
    assert (out / "tune.png").is_file()
    written = recipe.read_text()
    assert f"lr = {doc['choice']['lr']!r}" in written and "proxy_lr = 0.1" in written
    assert "# learning rates: chosen by python -m train.tune" in written
    for run in out.glob("lr*-s0"):
        metrics = json.loads((run / "metrics.json").read_text())
        assert "recall_at_1" not in metrics and "val" in metrics  # held-out only, no test
        assert not (run / "model.onnx").exists()


def test_the_shipped_matrix_and_recipes_agree() -> None:
    """The issue's 4 settings; the converge_*.toml recipes carry the matrix's protocol, so
    `python -m train --config converge_<loss>.toml` alone also runs to convergence."""
    from dataclasses import asdict

    from train.config import load_config
    from train.converge import DEFAULT_MATRIX

    matrix = load_matrix(DEFAULT_MATRIX)
    assert matrix.bases() == {
        "proxy_anchor-calibrated-l10": "proxy_anchor",
        "multi_similarity-calibrated-l1": "multi_similarity-shipped",
    }
    assert matrix.protocol["epochs"] * matrix.protocol["steps_per_epoch"] >= 4000
    assert matrix.protocol["restore_best"] and matrix.protocol["patience"] > 0
    for s in matrix.settings:
        recipe = asdict(load_config(s.config))
        if s.config.name.startswith("converge_"):
            assert {k: recipe[k] for k in matrix.protocol} == matrix.protocol, s.config
        cfg = s.resolve(matrix.protocol, {}, seed=0)
        assert (cfg.backbone, cfg.width, cfg.embedding_dim, cfg.batch_size) == (
            "glyphnet",
            32,
            128,
            128,
        )
    tcm = {s.name: s.resolve(matrix.protocol, {}, 0) for s in matrix.settings}
    assert tcm["proxy_anchor-calibrated-l10"].margins == "calibrated"
    assert tcm["multi_similarity-calibrated-l1"].lambda_plus == 1.0
