"""Where the block products run: numpy on the CPU, faiss on a GPU when one is present.

calibrate never imports torch. The GPU path computes block scores with faiss'
GPU inner products (float32 accumulation), so its scores can differ from the CPU
path in the last bit; it is selected only when asked for and degrades to the CPU,
with a warning, when faiss has no GPU.
"""

from __future__ import annotations

import warnings

import numpy as np

from calibrate.engine.sweep import ScoreFn, scores_cpu

DEVICES = ("cpu", "cuda", "auto")
GPU_MARGIN = 4e-3  # > TF32's 2^-11 relative rounding of each product, summed, for unit rows


def score_function(device: str) -> tuple[ScoreFn, str]:
    """(score function, the device actually used)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return scores_cpu, "cpu"
    gpu = _faiss_gpu()
    if gpu is None:
        if device == "cuda":
            warnings.warn("no faiss GPU available; calibrating on the CPU", stacklevel=3)
        return scores_cpu, "cpu"
    return gpu, "cuda"


def _faiss_gpu() -> ScoreFn | None:
    try:
        import faiss
    except ImportError:
        return None
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        return None
    res = faiss.StandardGpuResources()

    def scores_gpu(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # pragma: no cover - GPU only
        a32 = np.ascontiguousarray(a, dtype=np.float32)
        b32 = np.ascontiguousarray(b, dtype=np.float32)
        return faiss.pairwise_distance_gpu(res, a32, b32, metric=faiss.METRIC_INNER_PRODUCT)

    scores_gpu.min_margin = GPU_MARGIN  # type: ignore[attr-defined]
    return scores_gpu
