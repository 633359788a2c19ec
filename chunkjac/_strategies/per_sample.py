"""Per-sample reverse mode: d y_i / d theta for every sample i and a shared theta (a layer's weights),
by ``vmap`` over the samples of ``jacrev`` of one sample's output.

# NOTE: [Per-sample Jacobians of shared tensors]
# The sum trick cannot serve a shared tensor: one VJP over the batch adds every sample's contribution
# into theta's gradient. Forward mode can (one JVP per element of theta gives every sample's column),
# which is right for a handful of elements (seed 000's scalar C) and wrong for a layer: 2,560 JVPs for
# a 256x10 weight. Here each sample runs as a batch of one under vmap, so each gets its own gradient:
# n_out VJPs per sample, vectorised over the chunk's samples, whatever the size of theta. fn must
# treat its samples independently (the coupling check has said so before this strategy is planned).
# Tied parameters (one tensor reached under two names) are one target: their Jacobian is the total
# derivative, summed over every use, as autograd gives it.

Cost per chunk of n samples: one vmapped forward of n batches of one sample and n_out vmapped VJPs;
memory ~ the chunk's activations plus the result n x n_out x (elements of the targets).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.func import jacrev, vjp, vmap

from .._errors import RandomFunctionError
from .._function import call, detach_all, own_buffers, reached_modules, select, shielded
from .._plan import Plan
from .._spec import Spec
from ._cost import PER_SAMPLE_COST

if TYPE_CHECKING:
    from .._probe import Probe


def candidates(spec: Spec, p: Probe, device: torch.device) -> list:
    """One plan where shared tensors are differentiated and forward mode is not required."""
    if spec.part is not None or spec.mode == "forward" or all(t.batched for t in spec.targets):
        return []
    n_out = p.out_numel
    plan = Plan(strategy="per_sample", modes=("reverse",) * len(spec.targets), batch_size=spec.batch_size,
                chunk_size=spec.batch_size, rows_per_vjp=max(n_out, 1), cols_per_jvp=1, out_shape=p.out_shape,
                in_numels=tuple(t.numel for t in spec.targets), dtype=p.dtype, device=device)
    return [(plan, PER_SAMPLE_COST * n_out)]


def memory(spec: Spec, p: Probe, plan: Plan) -> tuple[float, float]:
    """(activations, other work) bytes per sample: each sample's activations, and their gradients."""
    return p.saved_bytes_per_sample, p.saved_bytes_per_sample


def products(plan: Plan) -> tuple[int, int]:
    return 1, 0


def check(spec: Spec, plan: Plan):
    """Nothing to cross-check: plain reverse mode, whose formulas the others are checked against."""
    return None


def describe(plan: Plan, per: str) -> str:
    rows = math.prod(plan.out_shape)
    return f"per-sample reverse mode, {rows:,} VJP{'s' * (rows != 1)} per sample, vectorised over the chunk's samples"


def run_chunk(spec: Spec, plan: Plan, args: list, n: int, colours: torch.Tensor | None = None,
              calls: int | None = None):
    create = spec.create_graph
    targets = spec.targets
    values = []
    for t in targets:
        v = spec.param(t.name) if t.kind == "param" else args[t.index]
        values.append(v if create else v.detach())
    batched = [i for i, d in enumerate(spec.in_dims) if d is not None]
    target_at = {t.index: k for k, t in enumerate(targets) if t.kind == "input"}
    free = [i for i in batched if i not in target_at]  # batched inputs not differentiated
    modules = reached_modules(spec)

    def one(*vs):
        tv, rest = vs[:len(targets)], vs[len(targets):]
        a = list(args)
        params = own_buffers(spec)
        for t, v in zip(targets, tv):
            if t.kind == "param":
                params[t.name] = v
            elif t.batched:
                a[t.index] = v.unsqueeze(spec.in_dims[t.index])
            else:
                a[t.index] = v
        for i, v in zip(free, rest):
            a[i] = v.unsqueeze(spec.in_dims[i])
        with shielded(modules):
            y = select(spec, call(spec, a, params), 1)
        return y[0]

    in_dims = tuple(spec.in_dims[t.index] if t.kind == "input" and t.batched else None for t in targets) + \
        tuple(spec.in_dims[i] for i in free)
    inputs = list(values) + [args[i] for i in free]
    argnums = tuple(range(len(targets)))
    if math.prod(plan.out_shape) == 1:
        # One output per sample (a per-sample loss): one VJP, as torch.func.grad does. jacrev would vmap
        # it over a basis of one, and that second vmap level turns the layers' bmm into copies (2x slower
        # for per-sample gradients of an MLP, measured).
        def jac(*vs):
            y, pull = vjp(lambda *t: one(*t, *vs[len(targets):]), *vs[:len(targets)])
            return pull(torch.ones_like(y))
    else:
        jac = jacrev(one, argnums=argnums)
    with torch.enable_grad() if create else torch.no_grad():
        try:
            jacs = vmap(jac, in_dims=in_dims)(*inputs)
        except RuntimeError as e:
            if "randomness" in str(e):
                raise RandomFunctionError(
                    "chunkjac: fn draws random numbers (dropout in training mode?): per-sample derivatives of a "
                    "random draw are not one answer. Call model.eval().") from None
            raise
    jacs = [j.reshape(n, *plan.out_shape, *t.shape) for j, t in zip(jacs, targets)]
    if not create:
        jacs = [j.detach() for j in jacs]
    outputs = None
    if spec.return_outputs:  # fn's own outputs for the chunk, from one plain forward
        with torch.enable_grad() if create else torch.no_grad():
            outputs = call(spec, list(args))
        outputs = outputs if create else detach_all(outputs)
    return jacs, outputs
