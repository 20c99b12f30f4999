"""python -m train end to end on glyphs-tiny: run directory, ONNX export, metrics, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("onnxscript")

from train.cli import build_parser, main, resolve_config  # noqa: E402
from train.config import TrainConfig, load_config  # noqa: E402

pytestmark = pytest.mark.torch

METRIC_KEYS = {
    "recall_at_1",
    "map_at_r",
    "opis",
    "eps_opis",
    "far_spread",
    "far_min",
    "far_max",
    "tar",
    "steps",
    "val",
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    argv = ["--tiny", "--quiet", "--threads", "1", "--device", "cuda", "--tcm", "--out", str(out)]
    assert main(argv) == 0
    return out


@pytest.mark.slow
def test_run_directory_has_everything(tiny_run: Path) -> None:
    for name in ("config.json", "checkpoint.pt", "epochs.json", "metrics.json", "curves.png"):
        assert (tiny_run / name).is_file(), name
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS
    assert 0.0 <= metrics["recall_at_1"] <= 1.0 and 0.0 <= metrics["tar"] <= 1.0
    assert metrics["export_max_abs_diff"] <= 1e-4
    # per-epoch metrics come from the held-out train classes, the final ones from test
    epochs = json.loads((tiny_run / "epochs.json").read_text())
    assert [e["split"] for e in epochs] == ["val"] and metrics["val"]["step"] == 3
    assert json.loads((tiny_run / "config.json").read_text())["dataset"] == "glyphs-tiny"


@pytest.mark.slow
def test_exported_model_serves_like_torch(tiny_run: Path, tiny_glyphs) -> None:
    from contracts import read_embedder_meta
    from embedding import OnnxEmbedder
    from train.models import build_model

    meta = read_embedder_meta(tiny_run / "model.onnx")
    assert meta.embedding_dim == 16 and meta.l2_normalized
    assert meta.recipe["tcm"] is True and meta.recipe["margin_plus"] == 0.9
    state = torch.load(tiny_run / "checkpoint.pt", map_location="cpu", weights_only=False)
    model = build_model("glyphnet", 16, width=8)
    model.load_state_dict(state["model"])
    images = np.stack([tiny_glyphs.image(i) for i in range(5)])
    got = OnnxEmbedder(tiny_run / "model.onnx", device="cpu").embed(images)
    from embedding.preprocess import preprocess

    with torch.no_grad():
        want = model.eval()(torch.from_numpy(preprocess(images, meta))).numpy()
    assert np.abs(got - want).max() <= 1e-4
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_export_subcommand_and_resume(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "again.onnx"
    assert main(["export", str(tiny_run), "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    # resuming a finished run trains nothing and leaves the model alone
    before = (tiny_run / "model.onnx").stat().st_mtime_ns
    assert main(["--resume", str(tiny_run), "--quiet"]) == 0
    assert (tiny_run / "model.onnx").stat().st_mtime_ns == before
    assert json.loads((tiny_run / "metrics.json").read_text())["epochs"] == 1


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "resumed"
    shutil.copytree(tiny_run, run)
    (run / "metrics.json").unlink()
    assert main(["--resume", str(run), "--quiet", "--epochs", "2", "--eval-every", "5"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 1, 1, 2, 2, 2]


def test_flags_override_the_config_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text(
        '[loss]\nloss = "proxy_anchor"\nmargin_plus = 0.7\n[loss_params]\nalpha = 16.0\n'
    )
    args = build_parser().parse_args(
        [
            "--config",
            str(cfg_file),
            "--margin-plus",
            "0.8",
            "--no-tcm",
            "--loss-param",
            "margin=0.2",
        ]
    )
    cfg = resolve_config(args)
    assert (cfg.loss, cfg.margin_plus, cfg.tcm) == ("proxy_anchor", 0.8, False)
    assert cfg.loss_params == {"alpha": 16.0, "margin": 0.2}


def test_bad_config_is_a_clear_error(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("lossy = 1\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        load_config(bad)
    assert main(["--config", str(bad)]) == 2
    assert "lossy" in capsys.readouterr().err


def test_default_config_parses() -> None:
    from train.cli import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG)
    assert isinstance(cfg, TrainConfig)
    assert cfg.dataset == "glyphs" and cfg.backbone == "glyphnet"
    # the measured recipe (docs/RESULTS.md): 4000 steps, the test split evaluated whole
    assert cfg.epochs * cfg.steps_per_epoch == 4000 and cfg.eval_limit == 0


@pytest.mark.parametrize(
    "loss",
    ["multi_similarity", "proxy_anchor", "smooth_ap", "arcface", "contrastive", "triplet_margin"],
)
def test_every_base_loss_trains_a_step(loss: str) -> None:
    from train.base_losses import build_losses

    losses = build_losses(loss, num_classes=4, dim=8, tcm={"margin_plus": 0.9})
    emb = torch.randn(16, 8, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(4)
    total = sum(fn(emb, labels) for fn in losses.values())
    total.backward()
    assert torch.isfinite(total) and emb.grad is not None and emb.grad.abs().sum() > 0


def test_unknown_loss_and_backbone_are_clear_errors() -> None:
    from train.base_losses import build_losses
    from train.models import build_model

    with pytest.raises(ValueError, match="unknown base loss"):
        build_losses("nope", 2, 4)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("resnet9000", 8)


def test_cuda_request_degrades_to_cpu(capsys) -> None:
    from train.trainer import resolve_device

    device = resolve_device("cuda")
    if torch.cuda.is_available():
        assert device.type == "cuda"
    else:
        assert device.type == "cpu"
        assert "CPU instead" in capsys.readouterr().out


def _brute_map_at_r(emb, labels, tenants) -> float:
    """MAP@R straight from its definition, one query at a time."""
    aps = []
    for q in range(len(emb)):
        others = [i for i in range(len(emb)) if i != q and tenants[i] == tenants[q]]
        r = sum(labels[i] == labels[q] for i in others)
        if r == 0:
            continue
        ranked = sorted(others, key=lambda i: -float(emb[q] @ emb[i]))[:r]
        hits, total = 0, 0.0
        for rank, i in enumerate(ranked, start=1):
            if labels[i] == labels[q]:
                hits += 1
                total += hits / rank
        aps.append(total / r)
    return sum(aps) / len(aps)


def test_map_at_r_matches_its_definition_within_tenants():
    from train.evaluate import map_at_r

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(90, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = rng.integers(0, 12, size=90)
    tenants = labels % 3  # a class lives in one tenant
    assert map_at_r(emb, labels, tenants) == pytest.approx(_brute_map_at_r(emb, labels, tenants))


def test_map_at_r_ignores_neighbours_of_other_tenants():
    from train.evaluate import map_at_r

    # tenant 1 holds exact copies of tenant 0's images under other classes, so across
    # tenants a query's best neighbours are impostors; within a tenant the classes are
    # perfectly separated
    e = np.eye(4, dtype=np.float32)
    near = lambda a, b: (e[a] + 0.1 * e[b]) / np.linalg.norm(e[a] + 0.1 * e[b])  # noqa: E731
    emb = np.stack([e[0], near(0, 2), e[1], near(1, 3), e[0], e[0], e[1], e[1]])
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    tenants = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    assert map_at_r(emb, labels, tenants) == 1.0
    assert map_at_r(emb, labels, np.zeros(8, int)) < 1.0  # one pooled gallery mixes them


@pytest.mark.slow
def test_evaluate_cli_measures_the_exported_model_like_the_run(tiny_run: Path, tmp_path, capsys):
    from train.evaluate import main as evaluate_main

    model = tiny_run / "model.onnx"
    out = tmp_path / "eval.json"
    assert evaluate_main([str(model), "--dataset", "glyphs-tiny", "--json", str(out)]) == 0
    got = json.loads(out.read_text())[str(model)]
    from embedding import OnnxEmbedder
    from imagesets import load_images
    from train.evaluate import evaluate_embeddings

    images = load_images("glyphs-tiny", "test")
    emb = OnnxEmbedder(model, device="cpu").embed_set(images)
    want, _ = evaluate_embeddings(emb, images.labels, images.tenants, images.tenant_names)
    for key in ("recall_at_1", "map_at_r", "opis", "eps_opis", "tar", "far_min", "far_max"):
        assert got[key] == want[key], key
    # and the run's own (torch) test metrics: the same split; a 3-step model has many
    # near-tied neighbours, so 1e-7 embedding differences may flip a few of them
    run = json.loads((tiny_run / "metrics.json").read_text())
    assert got["recall_at_1"] == pytest.approx(run["recall_at_1"], abs=0.05)
    assert got["images"] == run["images"]
    table = capsys.readouterr().out
    assert "| Recall@1 |" in table and "| TAR at target FAR |" in table
