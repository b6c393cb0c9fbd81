"""Offline training, evaluation and export of Variational Autoencoders."""

__version__ = "0.1.0"
