"""``python -m calibrate``: end to end on the tiny model, and refusals that write nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from calibrate.cli.main import EXIT_BAD_INPUT, main
from contracts import load_calibration, sha256_file

ROOT = Path(__file__).resolve().parents[1]
DIM = 16  # the embedding size of the linear_model fixture


def write_npz(
    path: Path, n: int = 200, classes: int = 20, seed: int = 0, dim: int = DIM, **extra
) -> Path:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.normal(size=(classes, dim))[labels] + rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    arrays = {"embeddings": x.astype(np.float32), "labels": labels, **extra}
    np.savez(path, **arrays)
    return path


def fake_model(path: Path) -> Path:
    """With .npz data the model is only hashed, never run."""
    path.write_bytes(b"not really onnx")
    return path


def test_cli_on_tiny_glyphs_writes_document_report_and_plots(linear_model, tiny_glyphs, tmp_path):
    out = tmp_path / "cal" / "calibration.json"
    code = main(
        [
            "--model",
            str(linear_model),
            "--dataset",
            "glyphs-tiny",
            "--target-far",
            "0.01,0.05",
            "--target-far",
            "0.1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert code == 0
    doc = load_calibration(out)
    doc.check_model(linear_model)
    assert doc.model_sha256 == sha256_file(linear_model)
    assert [t.target_far for t in doc.targets()] == [0.01, 0.05, 0.1]
    assert set(doc.dataset_names) == set(tiny_glyphs.tenant_names)
    files = {p.name for p in out.parent.iterdir()}
    assert {"report.md", "far_vs_threshold.png", "utility_datasets.png"} <= files
    assert "far_vs_threshold.png" in (out.parent / "report.md").read_text()


def test_cli_prints_the_table(linear_model, tmp_path, capsys):
    npz = write_npz(tmp_path / "e.npz", tenants=np.arange(200) % 2)
    model = linear_model
    assert (
        main(
            [
                "--model",
                str(model),
                "--dataset",
                str(npz),
                "--out",
                str(tmp_path / "o" / "c.json"),
                "--no-progress",
                "--bootstrap",
                "20",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "target FAR 0.001" in text and "FAR@global" in text and "Recall@1" in text
    assert "OPIS" in text and "drift" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "{tmp}/missing.onnx"], "model file not found"),
        (["--target-far", "1.5"], "(0, 1)"),
        (["--target-far", "0"], "(0, 1)"),
        (["--target-far", "abc"], "not a number"),
        (["--target-far", "1e-9"], "not measurable"),
        (["--dataset", "{tmp}/one_class.npz"], "at least 2 classes"),
        (["--dataset", "{tmp}/nan.npz"], "NaN"),
        (["--dataset", "{tmp}/nowhere"], "cannot read dataset"),
        (["--far-range", "0.1", "0.01"], "far_range"),
        (["--dataset", "{tmp}/mismatch.npz"], "labels"),
        (["--model", "{tmp}/garbage.onnx", "--dataset", "glyphs-tiny"], "garbage.onnx"),
        (["--model", "{tmp}/garbage.onnx"], "cannot read model"),
        (["--dataset", "{tmp}/dim8.npz"], "8-d embeddings"),
    ],
)
def test_bad_input_exits_nonzero_and_writes_nothing(linear_model, tmp_path, capsys, args, message):
    write_npz(tmp_path / "good.npz")
    write_npz(tmp_path / "one_class.npz", classes=1)
    bad = np.load(write_npz(tmp_path / "nan.npz"))
    emb = bad["embeddings"].copy()
    emb[5] = np.nan
    np.savez(tmp_path / "nan.npz", embeddings=emb, labels=bad["labels"])
    np.savez(tmp_path / "mismatch.npz", embeddings=emb, labels=bad["labels"][:-3])
    fake_model(tmp_path / "garbage.onnx")
    write_npz(tmp_path / "dim8.npz", dim=8)
    model = linear_model
    out = tmp_path / "out" / "c.json"
    base = ["--model", str(model), "--dataset", str(tmp_path / "good.npz"), "--no-progress"]
    argv = base + [a.format(tmp=tmp_path) for a in args] + ["--out", str(out)]
    assert main(argv) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_default_model_names_the_command(tmp_path, monkeypatch, capsys):
    from embedding import defaults

    monkeypatch.setattr(defaults, "DEFAULT_MODEL", tmp_path / "absent.onnx")
    assert main(["--out", str(tmp_path / "o" / "c.json"), "--no-progress"]) == EXIT_BAD_INPUT
    assert "python -m train" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_module_entry_point_help():
    run = subprocess.run(
        [sys.executable, "-m", "calibrate", "--help"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0
    for flag in ("--target-far", "--model", "--dataset", "--far-range", "--bootstrap", "--plots"):
        assert flag in run.stdout


def test_a_whole_run_never_imports_torch(linear_model, tmp_path):
    """Not only the imports: evaluating, bootstrapping, plotting and writing stay torch-free."""
    npz = write_npz(tmp_path / "e.npz", tenants=np.arange(200) % 2)
    model = linear_model
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'pytorch_metric_learning', 'train'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from calibrate.cli.main import main\n"
        f"code = main(['--model', {str(model)!r}, '--dataset', {str(npz)!r}, '--bootstrap', '5',"
        f" '--out', {str(tmp_path / 'o' / 'c.json')!r}, '--no-progress'])\n"
        "assert code == 0\n"
        "assert 'torch' not in sys.modules\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "o" / "c.json").is_file()


def test_plots_go_to_their_own_folder(linear_model, tmp_path):
    npz = write_npz(tmp_path / "e.npz", n=400, classes=40)
    out = tmp_path / "doc" / "c.json"
    plots = tmp_path / "figs"
    argv = ["--model", str(linear_model), "--dataset", str(npz)]
    argv += ["--target-far", "0.01", "--out", str(out), "--plots", str(plots), "--no-progress"]
    assert main(argv) == 0
    assert (plots / "far_vs_threshold.png").is_file()
    assert not list(out.parent.glob("*.png"))
    assert str(plots / "far_vs_threshold.png") in (out.parent / "report.md").read_text()


def test_precomputed_embeddings_need_their_model(tmp_path, capsys):
    npz = write_npz(tmp_path / "e.npz")
    out = tmp_path / "o" / "c.json"
    assert main(["--dataset", str(npz), "--out", str(out), "--no-progress"]) == EXIT_BAD_INPUT
    assert "--model is required" in capsys.readouterr().err
    assert not out.parent.exists()


def test_unloadable_model_for_images(tiny_glyphs, tmp_path, capsys):
    model = fake_model(tmp_path / "junk.onnx")
    out = tmp_path / "o" / "c.json"
    argv = ["--model", str(model), "--dataset", "glyphs-tiny", "--out", str(out), "--no-progress"]
    assert main(argv) == EXIT_BAD_INPUT
    assert "cannot load model" in capsys.readouterr().err
    assert not out.parent.exists()


def test_the_table_widens_for_long_dataset_names_and_keeps_warnings():
    """A name longer than the 14-character column, and a target with few errors (a warning)."""
    from calibrate import evaluate
    from calibrate.reports.report import table
    from imagesets import EmbeddingSet

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 10)
    x = rng.normal(size=(20, DIM))[labels] + rng.normal(size=(200, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    names = tuple(f"c{i}" for i in range(20))
    emb = EmbeddingSet(
        "e", labels, names, labels % 2, ("coptic-glagolitic", "b"), x.astype(np.float32)
    )
    text = table(evaluate(emb, (0.001, 0.01)))  # a warning at the first, then another
    assert "warning:" in text
    rows = [line for line in text.splitlines() if line.startswith("  coptic-glagolitic ")]
    head = next(line for line in text.splitlines() if line.startswith("  dataset"))
    assert rows and all(len(r) == len(head) for r in rows[:1])
