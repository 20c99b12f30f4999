"""Reliability tooling: the malformed-image corpus, the fuzz run and the crash-and-load run.

``python -m reliability.fuzz`` and ``python -m reliability.crashload`` are the long
commands behind docs/RELIABILITY.md; a fixed-seed subset of the fuzzing runs in the
tests (tests/test_fuzz_images.py, tests/test_fuzz_server.py).
"""
