"""The artifact contracts: embedder metadata and the calibration document."""

from __future__ import annotations

import copy
import json
import stat

import pytest

from contracts import (
    CalibrationDoc,
    CalibrationError,
    EmbedderMeta,
    MetadataError,
    atomic_write_text,
    load_calibration,
    read_embedder_meta,
    save_calibration,
    sha256_file,
)
from contracts.embedder import PREFIX

SHA = "ab" * 32


def meta(**over) -> EmbedderMeta:
    base = dict(
        input_height=32,
        input_width=32,
        input_channels=1,
        pixel_mean=(0.5,),
        pixel_std=(0.25,),
        embedding_dim=64,
    )
    base.update(over)
    return EmbedderMeta(**base)


def calibration(**over) -> dict:
    doc = {
        "schema": "tcm-retrieval.calibration",
        "schema_version": 1,
        "created_at": "2026-11-23T00:00:00Z",
        "model": {"sha256": SHA, "file": "m.onnx", "embedding_dim": 64},
        "settings": {
            "far_range": [1e-4, 1e-2],
            "grid_size": 101,
            "beta": 1.0,
            "eps": 0.05,
            "bootstrap": 0,
        },
        "datasets": [
            {
                "name": "latin",
                "images": 10,
                "classes": 3,
                "excluded_classes": 0,
                "genuine_pairs": 12,
                "impostor_pairs": 33,
            }
        ],
        "targets": [
            {
                "target_far": 0.001,
                "measurable": True,
                "k": 3,
                "impostor_pairs": 3000,
                "genuine_pairs": 100,
                "threshold": {"similarity": 0.8, "distance": 0.2},
                "accepted_impostors": 3,
                "achieved_far": 0.001,
                "tar": 0.9,
                "frr": 0.1,
                "warnings": [],
                "datasets": [],
            },
            {
                "target_far": 1e-5,
                "measurable": False,
                "k": 0,
                "impostor_pairs": 3000,
                "genuine_pairs": 100,
                "threshold": None,
                "warnings": ["not measurable"],
                "datasets": [],
            },
        ],
    }
    doc.update(over)
    return doc


def test_embedder_meta_round_trips_through_props():
    m = meta(recipe={"loss": "proxy_anchor", "tcm": {"margin_plus": 0.9}})
    props = m.to_props()
    assert all(isinstance(v, str) and k.startswith(PREFIX) for k, v in props.items())
    assert EmbedderMeta.from_props(props) == m


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("input_channels", "2", "input_channels"),
        ("pixel_mean", "[0.1, 0.2]", "pixel_mean"),
        ("pixel_std", "[0]", "pixel_std"),
        ("embedding_dim", '"64"', "embedding_dim"),
        ("l2_normalized", "yes", "l2_normalized"),
        ("format_version", "99", "format_version"),
    ],
)
def test_bad_embedder_meta_names_the_field(key, value, needle):
    props = meta().to_props()
    props[PREFIX + key] = value
    with pytest.raises(MetadataError, match=needle):
        EmbedderMeta.from_props(props)


def test_missing_embedder_meta_says_how_to_fix():
    props = meta().to_props()
    del props[PREFIX + "embedding_dim"]
    with pytest.raises(MetadataError, match="python -m train"):
        EmbedderMeta.from_props(props)


def test_read_embedder_meta_from_onnx(linear_model):
    m = read_embedder_meta(linear_model)
    assert (m.input_height, m.input_channels, m.embedding_dim) == (32, 1, 16)


def test_read_embedder_meta_rejects_junk(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(MetadataError, match="not a readable ONNX model"):
        read_embedder_meta(junk)


def test_calibration_document_round_trip(tmp_path):
    path = save_calibration(calibration(), tmp_path / "cal.json")
    doc = load_calibration(path)
    assert doc.model_sha256 == SHA
    assert [t.target_far for t in doc.targets()] == [0.001]  # the unmeasurable one is not served
    assert doc.target(0.001).threshold == 0.8
    assert doc.target(0.001).distance == pytest.approx(0.2)
    with pytest.raises(CalibrationError, match=r"1e-05 is not calibrated \(available: 0.001\)"):
        doc.target(1e-5)


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (
            lambda d: d["targets"][0]["threshold"].update(similarity="high"),
            r"targets\[0\]\.threshold\.similarity",
        ),
        (
            lambda d: d["targets"][0]["threshold"].update(similarity=1.7),
            r"targets\[0\]\.threshold\.similarity",
        ),
        (lambda d: d["targets"][0].update(target_far=0), r"targets\[0\]\.target_far"),
        (lambda d: d["model"].update(sha256="XYZ"), r"model\.sha256"),
        (lambda d: d.update(schema_version=3), "schema_version"),
        (lambda d: d["settings"].pop("grid_size"), r"settings\.grid_size: required"),
        (lambda d: d["datasets"][0].update(images=-1), r"datasets\[0\]\.images"),
        (lambda d: d["targets"][0].update(measurable="true"), r"targets\[0\]\.measurable"),
        (lambda d: d.update(targets=[]), "targets"),
    ],
)
def test_invalid_calibration_names_the_field(mutate, path):
    doc = calibration()
    mutate(doc)
    with pytest.raises(CalibrationError, match=path):
        CalibrationDoc(doc)


def test_repeated_target_is_refused():
    doc = calibration()
    doc["targets"][1] = copy.deepcopy(doc["targets"][0])
    with pytest.raises(CalibrationError, match="repeat"):
        CalibrationDoc(doc)


def test_load_calibration_errors_name_the_file(tmp_path):
    with pytest.raises(CalibrationError, match="not found"):
        load_calibration(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(CalibrationError, match=r"bad\.json: not valid JSON"):
        load_calibration(bad)


def test_invalid_document_is_not_written(tmp_path):
    target = tmp_path / "cal.json"
    target.write_text("old")
    doc = calibration()
    doc["model"]["sha256"] = "short"
    with pytest.raises(CalibrationError):
        save_calibration(doc, target)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cal.json"]


def test_check_model_refuses_another_model(linear_model, tmp_path):
    doc = CalibrationDoc(calibration())
    with pytest.raises(CalibrationError) as err:
        doc.check_model(linear_model)
    assert SHA in str(err.value)
    assert sha256_file(linear_model) in str(err.value)
    good = CalibrationDoc(calibration(model={"sha256": sha256_file(linear_model)}))
    good.check_model(linear_model)


def test_atomic_write_replaces_and_keeps_readable_mode(tmp_path):
    target = tmp_path / "sub" / "file.json"
    atomic_write_text(target, json.dumps({"a": 1}))
    assert json.loads(target.read_text()) == {"a": 1}
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    atomic_write_text(target, "second")
    assert target.read_text() == "second"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]
