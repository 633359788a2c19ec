"""Strategies: one module each, one table from the plan's strategy name to its chunk function.

A chunk function takes ``(spec, plan, args, n, colours)`` for one chunk of n samples (``colours``:
(n,) colour ids of a coupled chunk, or None for independent samples) and returns ``(jacs, outputs)``:
one (n, *out, *target.shape) tensor per target, and fn's outputs for the chunk.
Second-derivative strategies (``spec.part`` set) return the part, and the Jacobian when asked, in
place of the per-target Jacobians (see Spec.result_shapes).
"""
from . import coloured, double_backward, per_sample, taylor

STRATEGIES = {
    "coloured": coloured.run_chunk,            # Jacobians: batched VJPs or JVPs, by colour
    "per_sample": per_sample.run_chunk,        # Jacobians w.r.t. shared tensors: vmap over samples of jacrev
    "taylor": taylor.run_chunk,                # second derivatives: one forward pass carries them
    "double_backward": double_backward.run_chunk,  # second derivatives: reverse over reverse
}
