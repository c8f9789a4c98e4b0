"""Signpost: an end-to-end MLOps pipeline for PyTorch image classifiers (GTSRB traffic signs first)."""

__version__ = "0.1.0"
