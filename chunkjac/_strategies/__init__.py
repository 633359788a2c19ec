"""Strategies: one module each, one table from a plan's strategy name to what it knows of itself.

A strategy's chunk function takes ``(spec, plan, args, n, colours[, calls])`` for one chunk of n
samples (``colours``: (n,) colour ids of a coupled chunk, or None for independent samples) and returns
``(jacs, outputs)``: one (n, *out, *target.shape) tensor per target, and fn's outputs for the chunk.
Second-derivative strategies (``spec.part`` set) return the part, and the Jacobian when asked, in
place of the per-target Jacobians (see Spec.result_shapes).

Beside it each strategy tells the planner and the plan's printout about itself (so that neither
names a strategy): its ``candidates`` for a call on independent samples, ranked by its cost model
(forward-pass equivalents per sample); the ``memory`` it needs per sample of a chunk; the batched
``products`` a chunk of a plan costs; the ``check`` its results get on a few samples before the run
trusts it over the batch; and how its work reads (``route``, ``describe``). A new strategy is one
module and one row below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import coloured, double_backward, kronecker, per_sample, taylor


@dataclass(frozen=True)
class Strategy:
    name: str
    run: Callable         # (spec, plan, args, n, colours=None, calls=None) -> (results, outputs)
    candidates: Callable  # (spec, probe, device) -> [(Plan, cost)]: independent samples
    memory: Callable      # (spec, probe, plan) -> (activations, other work) bytes per sample, the result aside
    products: Callable    # plan -> (batched VJPs, batched JVPs) of its largest chunk
    check: Callable       # (spec, plan) -> None, or the exception an explicit mode raises (auto: reverse mode instead)
    describe: Callable    # (plan, "per chunk" | "in all") -> its work in words
    route: str            # its name in messages
    projects: bool = False  # its results are already projected (compute's project=)

    def __call__(self, *args, **kwargs):
        return self.run(*args, **kwargs)


STRATEGIES = {s.name: s for s in (
    # Jacobians: batched VJPs or JVPs, by colour (the sum trick for independent samples)
    Strategy("coloured", coloured.run_chunk, coloured.candidates, coloured.memory,
             coloured.products, coloured.check, coloured.describe, "the sum trick"),
    # Jacobians w.r.t. shared tensors: vmap over samples of jacrev
    Strategy("per_sample", per_sample.run_chunk, per_sample.candidates, per_sample.memory,
             per_sample.products, per_sample.check, per_sample.describe, "per-sample reverse mode"),
    # projected per-sample gradients of Linear layers, from their inputs and output gradients
    Strategy("kronecker", kronecker.run_chunk, kronecker.candidates, kronecker.memory,
             kronecker.products, kronecker.check, kronecker.describe, "Kronecker projection", projects=True),
    # second derivatives: one forward pass carries them
    Strategy("taylor", taylor.run_chunk, taylor.candidates, taylor.memory,
             taylor.products, taylor.check, taylor.describe, "Taylor mode"),
    # second derivatives: reverse over reverse
    Strategy("double_backward", double_backward.run_chunk, double_backward.candidates, double_backward.memory,
             double_backward.products, double_backward.check, double_backward.describe, "reverse over reverse"),
)}
