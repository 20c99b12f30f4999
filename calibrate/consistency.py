"""Threshold consistency: utility curves, OPIS and eps-OPIS (docs/DESIGN.md).

These take utility curves that someone else has measured, shape (members, grid):
classes of one dataset, or datasets (tenants) of a pooled set, sampled at the same G
thresholds. Calibrate, training-time evaluation and live monitoring all call these,
so the project has one definition of each metric.
"""

from __future__ import annotations

import math

import numpy as np


def utility(tar: np.ndarray, far: np.ndarray, beta: float = 1.0) -> np.ndarray:
    """U = (1 + b^2) TAR TRR / (b^2 TRR + TAR) with TRR = 1 - FAR; 0 where TAR = TRR = 0.

    The F-beta form of the paper: the harmonic mean of acceptance of genuine pairs and
    rejection of impostor pairs for b = 1. TAR plays the part of F-beta's recall, so
    b > 1 weighs acceptance (TAR) more and b < 1 weighs rejection (TRR) more.
    """
    tar = np.asarray(tar, dtype=np.float64)
    trr = 1.0 - np.asarray(far, dtype=np.float64)
    b2 = beta * beta
    den = b2 * trr + tar
    with np.errstate(invalid="ignore", divide="ignore"):
        u = (1.0 + b2) * tar * trr / den
    return np.where(den > 0, u, 0.0)


def opis_terms(utilities: np.ndarray) -> np.ndarray:
    """Each member's mean squared deviation from the mean curve: its OPIS drift."""
    u = _curves(utilities)
    return ((u - u.mean(axis=0, keepdims=True)) ** 2).mean(axis=1)


def opis(utilities: np.ndarray) -> float:
    """OPIS = (1/T) sum_c (1/G) sum_g (U_c(t_g) - Ubar(t_g))^2."""
    return float(opis_terms(utilities).mean())


def eps_opis(utilities: np.ndarray, eps: float = 0.05) -> float:
    """(1/G) sum_g (Utop(t_g) - Ubottom(t_g))^2 over the best and worst ceil(eps T) members.

    Members are ranked by mean utility over the range; ties keep input order (stable).
    """
    if not 0.0 < eps <= 0.5:
        raise ValueError(f"eps must lie in (0, 0.5], got {eps}")
    u = _curves(utilities)
    n = math.ceil(eps * len(u))
    order = np.argsort(u.mean(axis=1), kind="stable")
    gap = u[order[-n:]].mean(axis=0) - u[order[:n]].mean(axis=0)
    return float((gap**2).mean())


def threshold_grid(t_lo: float, t_hi: float, size: int = 101) -> np.ndarray:
    """G evenly spaced similarity thresholds from t_lo to t_hi, both included."""
    if size < 2:
        raise ValueError(f"the grid needs at least 2 thresholds, got {size}")
    return np.linspace(t_lo, t_hi, size)


def _curves(utilities: np.ndarray) -> np.ndarray:
    u = np.asarray(utilities, dtype=np.float64)
    if u.ndim != 2 or u.shape[0] == 0 or u.shape[1] == 0:
        raise ValueError(f"utility curves must be a non-empty (members, grid) array, got {u.shape}")
    if not np.isfinite(u).all():
        raise ValueError("utility curves contain NaN or infinity")
    return u
