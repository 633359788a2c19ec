"""Second derivatives by Taylor mode: one forward pass per chunk carries them (see [Second-order
propagation] in _taylor).

Cost per chunk of n samples (k colour groups when samples are coupled): k passes of fn, each over
stacks of 1 + D + s vectors per tensor (D per-sample input elements; s = 1 for a Laplacian, D for
the diagonal, D * D for the full Hessian); no backward pass. Memory: the largest stack fn holds at
once, (1 + D + s) x its activations, and with create_graph the graph of all of them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils._pytree import tree_map

import contextlib

from .._function import call, detached_parameters, reached_modules, select
from .._plan import Plan
from .._spec import Spec
from .._taylor import Jet, Layout, TaylorRefused, taylor_pass
from . import double_backward
from ._second import along, empty, groups, is_empty, merge, shaped, stack

if TYPE_CHECKING:
    from .._probe import Probe


def candidates(spec: Spec, p: Probe, device: torch.device) -> list:
    """One plan for second derivatives where Taylor mode is allowed; its cost, in forward passes, is
    the number of vectors it carries per tensor (see [Choosing a second-order strategy])."""
    if spec.part is None or spec.mode == "reverse":
        return []
    plan = Plan(strategy="taylor", modes=("forward",), rows_per_vjp=1, cols_per_jvp=1, batch_size=spec.batch_size,
                chunk_size=spec.batch_size, out_shape=p.out_shape, in_numels=(spec.targets[0].numel,), dtype=p.dtype,
                device=device, part=spec.part)
    return [(plan, float(stack(spec.targets[0].numel, spec.part)))]


def memory(spec: Spec, p: Probe, plan: Plan) -> tuple[float, float]:
    """(activations, other work) bytes per sample: the activations times the vectors carried (its
    working set per sample: PINN MLP, 10^5 points, chunks of 2-4k ran 0.36 s, of 16k 0.51 s)."""
    return p.saved_bytes_per_sample * stack(spec.targets[0].numel, plan.part), 0.0


def products(plan: Plan) -> tuple[int, int]:
    return 0, plan.colours  # a Taylor pass counts as one JVP


def check(spec: Spec, plan: Plan):
    """Taylor mode's results cross-checked against reverse over reverse on a few samples (see [Why
    Taylor mode is cross-checked] in _check): None, or the error an explicit mode='forward' raises."""
    from .._check import check_second_order
    why = check_second_order(spec, plan)
    if why is None:
        return None
    return ValueError(f"chunkjac: Taylor mode (mode='forward') cannot give fn's exact second derivatives: {why}. "
                      "Pass mode='auto' or mode='reverse' (reverse over reverse).")


def describe(plan: Plan, per: str) -> str:
    dims = plan.in_numels[0]
    passes = f"{plan.colours:,} passes {per}" if plan.colours > 1 else f"one pass {per}"
    terms = {"laplacian": "1 summed second-order term", "diagonal": f"{dims:,} second-order terms",
             "full": f"{dims * dims:,} second-order terms"}[plan.part]
    return (f"{plan.part}: Taylor mode, {passes} carrying the value, {dims:,} direction{'s' * (dims != 1)} and "
            f"{terms}")


def run_chunk(spec: Spec, plan: Plan, args: list, n: int, colours: torch.Tensor | None = None,
              calls: int | None = None):
    """Results of one chunk (see Spec.result_shapes) and fn's outputs. Where Taylor mode cannot follow
    fn on this chunk (TaylorRefused: the planner's check saw none on its samples, a data-dependent
    path can still take one), this chunk is computed by reverse over reverse instead: exact either way."""
    try:
        return run_strict(spec, plan, args, n, colours, calls)
    except TaylorRefused:
        return double_backward.run_chunk(spec, plan, args, n, colours, calls)


def run_strict(spec: Spec, plan: Plan, args: list, n: int, colours: torch.Tensor | None = None,
               calls: int | None = None):
    """As run_chunk, but a TaylorRefused propagates (the planner's check)."""
    if is_empty(spec, plan):
        return empty(spec, plan, args, n, plan.dtype, spec.device)
    t = spec.targets[0]
    i, dim = t.index, spec.in_dims[t.index]
    x = args[i]
    if not (spec.create_graph and x.requires_grad):
        x = x.detach()
    dims = t.numel
    lay = Layout(dims, plan.part)
    eye = torch.eye(dims, dtype=x.dtype, device=x.device).reshape(dims, *t.shape).unsqueeze(1 + dim)
    second = first = outputs = None
    # Gradients stay on, so that fn's own torch.no_grad() blocks show (see _taylor._dispatch); without
    # create_graph the parameters are detached, so that the pass records no graph all the same.
    modules = None if spec.create_graph else reached_modules(spec)
    for mask in groups(colours, calls):
        seed = eye if mask is None else eye * along(mask.to(x.device), 1 + dim, eye.dim())
        d = torch.zeros((lay.size, *x.shape), dtype=x.dtype, device=x.device)
        d[:dims] = seed
        a = list(args)
        plain = contextlib.nullcontext() if modules is None else detached_parameters(modules)
        with taylor_pass(), torch.enable_grad(), plain:
            a[i] = Jet.of(x, d, lay)
            out = call(spec, a)
            y = select(spec, out, n)
            if not isinstance(y, Jet):
                # The derivatives were lost on the way (a torch.func transform or TorchScript inside fn,
                # or fn's output does not depend on x): reverse over reverse says which, exactly.
                raise TaylorRefused("fn's output does not carry Taylor mode's derivatives")
            if tuple(y.shape[1:]) != plan.out_shape:
                raise ValueError(
                    f"chunkjac: fn's per-sample output shape changed from {plan.out_shape} (probe) to "
                    f"{tuple(y.shape[1:])} in a chunk of {n} samples; each sample's output must not depend on "
                    "how many samples are in the batch.")
            s, j = _blocks(y, lay, n)
        second, first = merge(second, s, mask), (merge(first, j, mask) if spec.return_jacobian else None)
        if outputs is None:
            outputs = tree_map(lambda v: _plain(v, spec.create_graph), out)
    return shaped(spec, plan.out_shape, second, first), outputs


def _plain(v, keep_graph: bool):
    if isinstance(v, Jet):
        v = v._v
    if isinstance(v, torch.Tensor) and not keep_graph:
        v = v.detach()
    return v


def _blocks(y: torch.Tensor, lay: Layout, n: int):
    """(second (n, n_out[, D[, D]]), first (n, n_out, D)) from the output's jet."""
    k = lay.dims
    if not isinstance(y, Jet):  # the output does not depend on the input: derivatives zero
        rows = y[0].numel() if n else 0
        d = torch.zeros((lay.size, n, rows), dtype=y.dtype, device=y.device)
    else:
        d = y._d.reshape(lay.size, n, -1)
    first = d[:k].permute(1, 2, 0)                      # (n, n_out, D)
    s = d[k:]
    if lay.part == "laplacian":
        second = s[0]                                   # (n, n_out)
    elif lay.part == "diagonal":
        second = s.permute(1, 2, 0)                     # (n, n_out, D)
    else:
        second = s.permute(1, 2, 0).reshape(n, -1, k, k)  # (n, n_out, D, D)
    return second, first
