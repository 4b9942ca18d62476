"""Diffusion on Diffusion (DoD): method, data, training, sampling, metrics and reports."""

__version__ = "0.1.0"
