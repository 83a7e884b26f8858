"""The package's version: one place, below every side (the worker and the host report it)."""

__version__ = "0.1.0"
