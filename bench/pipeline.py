"""The serving path's work in one process, no server: decode + embed + search.

What bench.match_cpu compares a server's CPU per image with, and what bench.scale
takes as the ceiling of a server's throughput.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from bench.harness import cpu_seconds


def in_process(folder: Path, model, pngs: list[bytes], batch: int, seconds: float) -> dict:
    """decode + embed + search here, ``batch`` images a call: CPU seconds per image."""
    import faiss

    from server.matching.imaging import ImageLimits, to_model_input
    from server.storage.faiss.gallery import Gallery

    faiss.omp_set_num_threads(1)
    gallery = Gallery.open(folder, model.embedder.dim, model.sha256)
    limits = ImageLimits()
    done, i = 0, 0
    me = os.getpid()
    before, t0 = cpu_seconds(me), time.perf_counter()
    stop = t0 + seconds
    while time.perf_counter() < stop:
        chunk = [pngs[(i + j) % len(pngs)] for j in range(batch)]
        i += batch
        inputs = np.stack([to_model_input(c, model.embedder.meta, limits) for c in chunk])
        gallery.search(model.embedder.run(inputs), 1, model.sha256)
        done += batch
    cpu, wall = cpu_seconds(me) - before, time.perf_counter() - t0
    gallery.close()
    return {"cpu_per_image": cpu / done, "rate": done / wall}
