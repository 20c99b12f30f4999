"""Run the shell transcripts of a Markdown document and compare them with what it shows.

A ```console block holds ``$ command`` lines (a line ending in ``\\`` continues on the
next), each followed by the output the document promises. In that output a line
``...`` stands for any number of lines and ``<...>`` inside a line for any text (a
fresh API key, a decision id); everything else must be printed exactly. All commands
of a document run in order in ONE bash process, as a reader would type them in one
terminal (``export``, ``&`` and ``$!`` carry over), and each must exit 0 unless the
next command is ``echo $?``, whose output then says what it must be.

    python -m testing.transcripts docs/QUICKSTART.md    # run it, print each command's output

tests/test_quickstart.py runs docs/QUICKSTART.md this way, so the document stays true.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ANY_LINES = "..."
ANY_TEXT = "<...>"
FENCE = re.compile(r"^```console\n(?P<body>.*?)^```", re.M | re.S)


@dataclass
class Step:
    command: str
    expected: list[str] = field(default_factory=list)
    line: int = 0  # in the document, for messages


@dataclass
class Outcome:
    step: Step
    output: str
    errors: str
    status: int


def parse(markdown: str) -> list[Step]:
    """The ``$`` commands of every ```console block, with the output shown after each."""
    steps: list[Step] = []
    for block in FENCE.finditer(markdown):
        first = markdown.count("\n", 0, block.start("body")) + 1
        continuing = False
        for n, text in enumerate(block["body"].splitlines()):
            if continuing:
                steps[-1].command += "\n" + text
            elif text.startswith("$ "):
                steps.append(Step(text[2:], line=first + n))
            elif steps:
                steps[-1].expected.append(text)
            continuing = text.endswith("\\") and steps and not steps[-1].expected
    return steps


_NUMBER = re.compile(r"-?\d+\.\d+(?:e[-+]?\d+)?")
_CAPTURE = r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


def _close(got: str, want: str) -> bool:
    """Printed alike (the same digits after the point) and at most one unit apart in the
    last digit: a last digit that float rounding moved on another machine reads the same,
    anything else does not."""
    if _shape(got) != _shape(want):
        return False
    mantissa, _, exponent = want.partition("e")
    unit = 10.0 ** (int(exponent or 0) - len(mantissa.partition(".")[2]))
    return abs(float(got) - float(want)) <= 1.01 * unit


def _shape(literal: str) -> tuple[int, bool]:
    mantissa, e, _ = literal.partition("e")
    return len(mantissa.partition(".")[2]), bool(e)


def _line_pattern(line: str, numbers: list[str]) -> str:
    out = []
    for i, piece in enumerate(line.split(ANY_TEXT)):
        if i:
            out.append(r"[^\n]*?")
        last = 0
        for m in _NUMBER.finditer(piece):
            out.append(_spaces(piece[last : m.start()]))
            out.append(_CAPTURE)
            numbers.append(m.group())
            last = m.end()
        out.append(_spaces(piece[last:]))
    return "".join(out) + r"\n"


def _spaces(text: str) -> str:
    """Literal text, but a run of 2+ spaces (table alignment) takes any run of spaces and
    a rule of 3+ dashes any rule: a column wider or narrower (a longer folder name) is
    the same table."""
    return " +".join(
        "-+".join(re.escape(bit) for bit in re.split(r"-{3,}", part))
        for part in re.split(r" {2,}", text)
    )


def matches(expected: list[str], output: str) -> bool:
    """Whether ``output`` is what ``expected`` shows (with its ``...`` and ``<...>``).
    Decimal numbers may differ by one unit in their last printed digit; integers, words
    and single spaces compare exactly."""
    numbers: list[str] = []
    parts = [
        r"(?:[^\n]*\n)*?" if line.strip() == ANY_LINES else _line_pattern(line, numbers)
        for line in expected
    ]
    text = output if output.endswith("\n") or not output else output + "\n"
    found = re.fullmatch("".join(parts), text)
    if found is None:
        return False
    return all(_close(got, want) for got, want in zip(found.groups(), numbers, strict=True))


def run(
    steps: list[Step],
    cwd: Path,
    replace: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 1800,
) -> list[Outcome]:
    """Run ``steps`` in one bash process in ``cwd``; ``replace`` maps text of the
    document to what this run uses (a free port, a private folder) and back again in
    the outputs. Background jobs left running are stopped (by their own ids) at the end."""
    replace = replace or {}

    def there(text: str) -> str:
        for doc, actual in replace.items():
            text = text.replace(doc, actual)
        return text

    def back(text: str) -> str:
        for doc, actual in replace.items():
            text = text.replace(actual, doc)
        return text

    with tempfile.TemporaryDirectory(prefix="transcript-") as tmp:
        folder = Path(tmp)
        script = ["trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT"]
        for n, step in enumerate(steps):
            script += [
                "{ " + there(step.command),
                f'}} > "{folder}/{n}.out" 2> "{folder}/{n}.err"; rc_=$?',
                f'echo $rc_ > "{folder}/{n}.rc"',
                "(exit $rc_)",  # so that a following `echo $?` reads this command's status
            ]
        proc = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            cwd=cwd,
            env=env,
            timeout=timeout,
            capture_output=True,
            text=True,
            check=False,
        )
        outcomes = []
        for n, step in enumerate(steps):
            rc = folder / f"{n}.rc"
            if not rc.exists():
                raise RuntimeError(f"the transcript stopped before {step.command!r}: {proc.stderr}")
            outcomes.append(
                Outcome(
                    step,
                    back((folder / f"{n}.out").read_text()),
                    back((folder / f"{n}.err").read_text()),
                    int(rc.read_text()),
                )
            )
    return outcomes


def problems(outcomes: list[Outcome]) -> list[str]:
    """What differs from the document: exit statuses and outputs, one message each."""
    found = []
    for i, o in enumerate(outcomes):
        checked_later = i + 1 < len(outcomes) and outcomes[i + 1].step.command == "echo $?"
        where = f"line {o.step.line}: $ {o.step.command}"
        if o.status != 0 and not checked_later:
            found.append(f"{where}\nexited {o.status}; stderr:\n{o.errors[-3000:]}")
        elif not matches(o.step.expected, o.output):
            shown = "\n".join(o.step.expected)
            found.append(f"{where}\nthe document shows:\n{shown}\nit printed:\n{o.output[-3000:]}")
    return found


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m testing.transcripts DOC.md", file=sys.stderr)
        return 2
    doc = Path(args[0])
    outcomes = run(parse(doc.read_text()), Path.cwd(), env=dict(os.environ))
    for o in outcomes:
        print(f"$ {o.step.command}\n{o.output}", end="" if o.output.endswith("\n") else "\n")
        if o.status:
            print(f"[exit {o.status}]")
    for p in problems(outcomes):
        print(f"\nDIFFERS: {p}", file=sys.stderr)
    return 1 if problems(outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
