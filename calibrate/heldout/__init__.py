"""Measured on held-out classes: per-dataset FAR raw and normalised (``normalized``, on
the class splits of ``holdout``), FPIR of 1:N search (``fpir``), and the serving report
that gathers them for a calibration (``serving``)."""
