"""What a user reads: progress bars (one switch, none in logs), help texts, error messages,
and where the demo writes."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contracts import progress

ROOT = Path(__file__).resolve().parents[1]
ENV = {"PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}", "PATH": "/usr/bin:/bin"}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _drawn(monkeypatch, stderr: io.StringIO, **env: str) -> str:
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.delenv(progress.ENV, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert list(progress.bar(range(3), desc="work")) == [0, 1, 2]
    return stderr.getvalue()


def test_a_bar_is_drawn_on_a_terminal_only(monkeypatch) -> None:
    assert "work" in _drawn(monkeypatch, _Terminal())
    assert _drawn(monkeypatch, io.StringIO()) == ""  # a log or a pipe: no \r spam


def test_one_switch_silences_every_bar(monkeypatch) -> None:
    assert _drawn(monkeypatch, _Terminal(), TCM_NO_PROGRESS="1") == ""
    monkeypatch.delenv(progress.ENV, raising=False)
    progress.silence()
    assert os.environ[progress.ENV] == "1"  # inherited by the processes a command starts
    assert not progress.enabled()


def test_calibrate_and_imagesets_no_progress_reach_the_switch(monkeypatch) -> None:
    """``--no-progress`` flips the shared switch, so the bar of rendering a dataset (drawn
    deep inside imagesets) is off too, not only the command's own bars."""
    from calibrate.cli import main as calibrate_main
    from imagesets import __main__ as imagesets_main

    for run, argv in (
        (calibrate_main.main, ["--no-progress", "--target-far", "0"]),
        (imagesets_main.main, ["export", "--no-progress", "nowhere-x", "test", "/nonexistent/x"]),
    ):
        monkeypatch.setenv(progress.ENV, "0")  # recorded: teardown restores the original
        run(argv)  # both fail early (bad FAR, unknown dataset): the switch is set first
        assert os.environ.get(progress.ENV) == "1", argv


def test_no_progress_hides_the_rendering_bar(monkeypatch, tmp_path: Path) -> None:
    """Rendering glyphs-tiny from scratch on a 'terminal' with --no-progress: not one bar."""
    from imagesets import __main__ as imagesets_main

    monkeypatch.setenv("TCM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(progress.ENV, raising=False)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    code = imagesets_main.main(["build", "--tiny", "--no-progress"])
    drawn = terminal.getvalue()
    assert code == 0 and "rendering dataset (once)" in drawn  # the notes go to stderr
    assert "\r" not in drawn and "class/s" not in drawn and "%|" not in drawn  # no bar


def test_demo_help_says_each_default_once() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "demo", "--help"],
        capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60, check=True,
    )  # fmt: skip
    text = " ".join(out.stdout.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: the shipped model)" in text and "(default: 0.001)" in text


def test_the_tiny_demo_writes_to_its_own_folder() -> None:
    from demo.__main__ import parse_args

    assert parse_args([]).out == Path("out/demo")
    assert parse_args(["--tiny"]).out == Path("out/demo-tiny")
    assert parse_args(["--tiny", "--out", "x"]).out == Path("x")


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "calibrate", "--dataset", "nowhere-x", "--no-progress"],
        ["-m", "imagesets", "export", "nowhere-x", "test", "/nonexistent/out-x"],
    ],
)
def test_an_unknown_dataset_is_named_once(argv: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120,
        check=False,
    )  # fmt: skip
    assert out.returncode in (1, 2), out.stderr
    assert out.stderr.count("cannot read dataset 'nowhere-x'") == 1, out.stderr
    assert out.stderr.count("nowhere-x") == 1, out.stderr
    assert "image folder" in out.stderr
