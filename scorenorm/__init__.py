"""Score normalisation: one global threshold that means the same FAR for every tenant.

torch-free (numpy only) and shared by calibrate/ (which measures the global impostor
distribution and judges the methods) and server/ (which keeps each tenant's
statistics and maps every Match score). See docs/CONSISTENCY.md.
"""

from scorenorm.asnorm import Cohort, SideStats, as_norm
from scorenorm.histogram import NBINS, ScoreHistogram, bin_of
from scorenorm.pairs import cross_identity_counts, gallery_histogram, scores
from scorenorm.registry import DEFAULT, choice, info, names
from scorenorm.tail_map import TailMap, TailSettings, build_map, identity_map

__all__ = [
    "DEFAULT",
    "NBINS",
    "Cohort",
    "ScoreHistogram",
    "SideStats",
    "TailMap",
    "TailSettings",
    "as_norm",
    "bin_of",
    "build_map",
    "choice",
    "cross_identity_counts",
    "gallery_histogram",
    "identity_map",
    "info",
    "names",
    "scores",
]
