"""Docs that quote a shipped asset say what the asset says (calibrate/reports/docs.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from calibrate.reports import docs

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_quote_the_shipped_calibration() -> None:
    stale = docs.update(ROOT, check=True)
    assert not stale, "\n\n".join(map(str, stale)) + "\n\nrun python -m calibrate.reports.docs"


def test_every_generated_block_appears_in_a_doc() -> None:
    """Deleting a marker pair (and typing the numbers back by hand) is caught too."""
    text = "\n".join((ROOT / d).read_text() for d in docs.DOCS)
    used = {m["name"] for m in docs.BLOCK.finditer(text)}
    assert used == set(docs.RENDERERS)


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    for rel in (*docs.DOCS, docs.SHIPPED):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    return tmp_path


def test_a_number_edited_by_hand_is_caught_and_rewritten(copy: Path) -> None:
    doc = copy / "docs/CALIBRATION.md"
    text = doc.read_text()
    assert "| latin | 0.94 [0.74, 1.19] |" in text
    doc.write_text(text.replace("| latin | 0.94 [0.74, 1.19] |", "| latin | 1.27 [1.02, 1.56] |"))
    (stale,) = docs.update(copy, check=True)
    assert (stale.doc, stale.block) == (Path("docs/CALIBRATION.md"), "heldout-table")
    assert "-| latin | 1.27 [1.02, 1.56] |" in str(stale)
    assert "+| latin | 0.94 [0.74, 1.19] |" in str(stale)
    docs.update(copy)  # rewrite from the asset
    assert doc.read_text() == text and docs.update(copy, check=True) == []


def test_a_new_asset_makes_the_docs_stale(copy: Path) -> None:
    asset = copy / docs.SHIPPED
    doc = json.loads(asset.read_text())
    for target in doc["targets"]:
        if target["target_far"] == 1e-3:
            target["tar"] = 0.5
    asset.write_text(json.dumps(doc))
    names = {s.block for s in docs.update(copy, check=True)}
    assert names == {"tar", "targets-table"}


def test_the_check_command_exits_1_on_a_stale_doc(copy: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(docs, "ROOT", copy)
    readme = copy / "README.md"
    readme.write_text(readme.read_text().replace("TAR 0.706 at FAR 1e-3", "TAR 0.8 at FAR 1e-3"))
    assert docs.main(["--check"]) == 1
    assert "README.md: block 'tar' differs" in capsys.readouterr().err
    assert docs.main([]) == 0 and docs.main(["--check"]) == 0
