"""Strategies: one module each, one table from the plan's strategy name to its chunk function.

A chunk function takes ``(spec, plan, args, n, colours)`` for one chunk of n samples (``colours``:
(n,) colour ids of a coupled chunk, or None for independent samples) and returns ``(jacs, outputs)``:
one (n, *out, *target.shape) tensor per target, and fn's outputs for the chunk.
"""
from . import coloured

STRATEGIES = {
    "coloured": coloured.run_chunk,
}
