"""Independent training runs side by side, each in its own process (``--jobs N``).

Why processes and not one run with more threads: glyphnet's small convolutions use a
second core poorly, so on a small CPU machine two 1-thread runs finish a matrix sooner
than one 2-thread run at a time (docs/TRAINING.md has the measured numbers). Each
process is pinned to ``threads_per_job`` threads for torch, OpenMP and BLAS (the
held-out evaluation's numpy), so ``N`` jobs never oversubscribe the cores.

A run is a folder, and the folder says how far it got:

- ``job.json``: what to train (the resolved config, whether to test and export);
- the trainer's own files (``checkpoint.pt`` every epoch, ``epochs.json`` ...);
- ``train.log``: the process's output;
- ``result.json``: written last, so its presence means finished. :func:`run_jobs`
  skips finished runs and resumes interrupted ones from their checkpoint, which makes
  every command built on it (``train.tune``, ``train.converge``) resumable.

``python -m train.jobs RUN_DIR`` trains the job in ``RUN_DIR`` in this process (what
:func:`run_jobs` starts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from contracts import atomic_write_text
from train.config import TrainConfig

JOB, RESULT, LOG, CLAIM = "job.json", "result.json", "train.log", ".sweep-pid"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
CURVE_KEYS = ("recall_at_1", "tar", "opis", "eps_opis")


@dataclass(frozen=True)
class Job:
    """One training run: its name, folder, config, and what to do at the end.

    ``test=False`` never loads the test split (learning-rate tuning); ``info`` is copied
    into the result (e.g. the setting and seed a matrix groups runs by).
    """

    name: str
    run_dir: Path
    config: TrainConfig
    test: bool = True
    export: bool = True
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Failure:
    """A job whose process exited with an error; its log says why."""

    name: str
    returncode: int
    log: Path


def is_finished(run_dir: Path) -> bool:
    return (run_dir / RESULT).is_file()


def read_result(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / RESULT).read_text())


def curve_of(epochs: Sequence[dict]) -> list[dict[str, Any]]:
    """The held-out curve of a run: step, Recall@1, TAR at the target FAR, OPIS, eps-OPIS."""
    return [{"step": e["step"], **{k: e.get(k) for k in CURVE_KEYS}} for e in epochs]


def claim(run_dir: Path) -> bool:
    """Claim ``run_dir`` for this process; False while another live process holds it.

    Lets several processes share one plan and one output folder without training the
    same run twice. A claim whose process is gone is stale and taken over.
    """
    marker = run_dir / CLAIM
    if marker.is_file():
        try:
            pid = int(marker.read_text())
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            pass  # stale claim of a process that is gone: take it over
        else:
            if pid != os.getpid():
                print(f"{run_dir.name}: being trained by process {pid}, skipped")
                return False
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(os.getpid()))
    return True


# ---- the child: one run in this process ----------------------------------------------
def write_job(job: Job) -> None:
    job.run_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": job.name,
        "config": asdict(job.config),
        "test": job.test,
        "export": job.export,
        "info": job.info,
    }
    atomic_write_text(job.run_dir / JOB, json.dumps(spec, indent=2, sort_keys=True))


def run_job(run_dir: Path) -> dict[str, Any]:
    """Train (or resume) the job in ``run_dir`` here; write and return its result."""
    from train.evaluate import json_safe
    from train.trainer import Trainer

    spec = json.loads((run_dir / JOB).read_text())
    cfg = TrainConfig(**spec["config"])
    trainer = Trainer.from_config(
        cfg, run_dir, export=spec["export"], test=spec["test"], progress=False
    )
    if (run_dir / "checkpoint.pt").is_file():
        trainer.load_checkpoint(run_dir / "checkpoint.pt")
    metrics = trainer.run()
    best = metrics.get("best") or {}
    result = {
        **spec["info"],
        "name": spec["name"],
        "config": asdict(cfg),
        "seconds": metrics.get("seconds"),  # training + held-out evaluations, over resumes
        "steps": metrics.get("steps"),
        "best_step": best.get("step"),
        "restored_best": metrics.get("restored_best", False),
        "stopped_early": trainer.stopped_early,
        "curve": curve_of(trainer.epochs),
        "metrics": json_safe(metrics),
    }
    atomic_write_text(run_dir / RESULT, json.dumps(result, indent=2))
    return result


# ---- the parent: N children at a time ----------------------------------------------
def _child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({var: str(threads) for var in THREAD_VARS})
    return env


def _start(job: Job, threads: int, python: str) -> tuple[subprocess.Popen, IO[str]]:
    """Write ``job.json`` (with this run's thread count) and start its process."""
    write_job(dataclasses.replace(job, config=job.config.replace(threads=threads)))
    log = (job.run_dir / LOG).open("a")
    proc = subprocess.Popen(
        [python, "-m", "train.jobs", str(job.run_dir)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_child_env(threads),
    )
    return proc, log


def _say(text: str) -> None:
    print(text, flush=True)  # progress lines must not wait in a pipe's buffer


def run_jobs(
    jobs: Sequence[Job],
    n_jobs: int = 1,
    threads_per_job: int = 1,
    *,
    python: str = sys.executable,
    poll_s: float = 2.0,
    say: Callable[[str], None] = _say,
) -> list[Failure]:
    """Run every unfinished job, ``n_jobs`` processes at a time; returns the failures.

    Finished jobs (``result.json`` present) are skipped; interrupted ones resume from
    their last checkpoint. A failed job does not stop the others. On Ctrl-C the
    children are terminated (their checkpoints stay, so the next call resumes them).
    """
    if n_jobs < 1 or threads_per_job < 1:
        raise ValueError(f"--jobs and --threads-per-job must be >= 1: {n_jobs}, {threads_per_job}")
    pending = [j for j in jobs if not is_finished(j.run_dir)]
    if done := len(jobs) - len(pending):
        say(f"{done} of {len(jobs)} runs already finished: skipped")
    running: dict[subprocess.Popen, tuple[Job, float, IO[str]]] = {}
    failures: list[Failure] = []
    try:
        while pending or running:
            while pending and len(running) < n_jobs:
                job = pending.pop(0)
                if not claim(job.run_dir):
                    continue
                proc, log = _start(job, threads_per_job, python)
                running[proc] = (job, time.perf_counter(), log)
                say(f"{job.name}: started (pid {proc.pid}, {threads_per_job} thread(s))")
            time.sleep(poll_s if running else 0)
            for proc in [p for p in running if p.poll() is not None]:
                job, start, log = running.pop(proc)
                log.close()
                failures += _finished(job, proc.returncode, time.perf_counter() - start, say)
    finally:
        for proc, (_, _, log) in running.items():
            proc.terminate()
            proc.wait()
            log.close()
    return failures


def _finished(job: Job, code: int, seconds: float, say: Callable[[str], None]) -> list[Failure]:
    """Report one ended process; record its wall time in the result."""
    if code != 0 or not is_finished(job.run_dir):
        tail = (job.run_dir / LOG).read_text(errors="replace").splitlines()[-5:]
        say(f"{job.name}: FAILED (exit {code}); {job.run_dir / LOG} ends:\n  " + "\n  ".join(tail))
        return [Failure(job.name, code, job.run_dir / LOG)]
    result = read_result(job.run_dir)
    result["process_seconds"] = seconds  # the whole process: start-up, test, export included
    atomic_write_text(job.run_dir / RESULT, json.dumps(result, indent=2))
    r1 = (result["curve"] or [{}])[-1].get("recall_at_1")
    say(
        f"{job.name}: done in {seconds:.0f} s, {result['steps']} steps, "
        f"best step {result['best_step']}, last held-out R@1 "
        + ("n/a" if r1 is None else f"{r1:.4f}")
    )
    return []


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m train.jobs RUN_DIR  (a folder with job.json)", file=sys.stderr)
        return 2
    run_job(Path(argv[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
