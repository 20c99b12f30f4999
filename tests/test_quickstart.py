"""docs/QUICKSTART.md, run command by command as a reader would type it.

The commands and the outputs they must print come from the document itself
(testing/transcripts.py), so the page is a tested transcript: a changed message, a
renamed flag or a different number fails here. The only differences from a reader's
run: a private folder instead of out/quickstart, free ports instead of 50051/9464, and
the test session's glyph cache (the first run renders the full glyph set, ~1-2 min).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from testing import transcripts

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "QUICKSTART.md"


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_the_transcript_reader_can_fail() -> None:
    """The comparison is strict where it must be: a word, an integer, a moved digit."""
    steps = transcripts.parse("```console\n$ echo 'a 0.5000 b 12'\na 0.5001 b 12\n```\n")
    assert [s.command for s in steps] == ["echo 'a 0.5000 b 12'"]
    assert transcripts.matches(steps[0].expected, "a 0.5000 b 12\n")  # last digit +-1
    assert not transcripts.matches(steps[0].expected, "a 0.5003 b 12\n")
    assert not transcripts.matches(steps[0].expected, "a 0.5000 b 13\n")
    assert not transcripts.matches(["x", "...", "z"], "x\ny\n")
    assert transcripts.matches(["key <...>", "...", "z"], "key tcm_9f\nmore\nlines\nz\n")
    assert transcripts.matches(["a  b", "---  -"], "a      b\n------ -\n")  # wider column
    assert not transcripts.matches(["a  b"], "a b c\n")


def test_echo_status_reads_the_command_before_it(tmp_path: Path) -> None:
    steps = transcripts.parse("```console\n$ (exit 4)\n$ echo $?\n4\n$ true\n```\n")
    outcomes = transcripts.run(steps, tmp_path)
    assert [o.status for o in outcomes] == [4, 0, 0] and outcomes[1].output == "4\n"
    assert transcripts.problems(outcomes) == []  # exit 4 is what the document says
    steps = transcripts.parse("```console\n$ (exit 4)\n$ true\n```\n")
    (problem,) = transcripts.problems(transcripts.run(steps, tmp_path))
    assert "exited 4" in problem


def test_the_commands_are_parsed_with_their_continuations() -> None:
    steps = transcripts.parse(DOC.read_text())
    assert any(s.command.startswith("python -m server --api-keys") and "\n" in s.command
               for s in steps)  # fmt: skip
    assert steps[-1].command.startswith("kill $server_pid")
    needed_steps = ("imagesets export", "client create-tenant", "client enroll")
    needed_steps += ("client match-batch", "client tenant", "/metrics", "calibrate --check")
    for needed in needed_steps:
        assert any(needed in s.command for s in steps), needed


@pytest.mark.slow
def test_quickstart_reads_as_it_runs(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    env.pop("TCM_API_KEY", None)
    replace = {
        "out/quickstart": str(tmp_path / "quickstart"),
        "50051": free_port(),
        "9464": free_port(),
    }
    outcomes = transcripts.run(transcripts.parse(DOC.read_text()), ROOT, replace, env, 1500)
    found = transcripts.problems(outcomes)
    assert not found, "\n\n".join(found)
