"""Calibration jobs: collect records, fit the uncertainty-to-rejection model, derive thresholds."""
