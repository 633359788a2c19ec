"""Strategies: one module each, one table from the plan's strategy name to its chunk function.

A chunk function takes ``(spec, plan, args, n)`` for one chunk of n samples and returns
``(jacs, outputs)``: one (n, *out, *target.shape) tensor per target, and fn's outputs for the chunk.
"""
from . import sum_trick

STRATEGIES = {
    "sum_trick": sum_trick.run_chunk,
}
