"""Distributed batch image restoration and synthesis on Ray."""

__version__ = "0.1.0"
