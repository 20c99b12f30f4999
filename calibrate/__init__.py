"""Calibration: one global threshold per target FAR, per-dataset drift and OPIS."""
