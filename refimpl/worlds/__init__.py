"""Toy worlds: an exact world (every sequence enumerable) and an arithmetic task world."""
from . import arith, exact, writer

__all__ = ["arith", "exact", "writer"]
