"""Measurement instruments: accuracy-matrix metrics, update-subspace geometry and its tracker, upstream retention."""
