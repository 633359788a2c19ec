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

from .._function import call, detached_parameters, reached_modules
from .._plan import Plan
from .._spec import Spec
from .. import _taylor4
from .._taylor import Jet, Layout, TaylorRefused, taylor_pass
from .._taylor4 import Layout4
from . import double_backward
from ._second import along, empty, groups, is_empty, merge, selected

if TYPE_CHECKING:
    from .._probe import Probe


def candidates(spec: Spec, p: Probe, device: torch.device) -> list:
    """One plan for the operator where Taylor mode is allowed; its cost, in forward passes, is the
    number of vectors it carries per tensor (see [Choosing a second-order strategy])."""
    if spec.part is None or spec.mode == "reverse":
        return []
    plan = Plan(strategy="taylor", modes=("forward",), rows_per_vjp=1, cols_per_jvp=1, batch_size=spec.batch_size,
                chunk_size=spec.batch_size, out_shape=p.out_shape, in_numels=(spec.targets[0].numel,), dtype=p.dtype,
                device=device, part=spec.part)
    return [(plan, float(spec.part.stack))]


def memory(spec: Spec, p: Probe, plan: Plan) -> tuple[float, float]:
    """(activations, other work) bytes per sample: the activations times the vectors carried (its
    working set per sample: PINN MLP, 10^5 points, chunks of 2-4k ran 0.36 s, of 16k 0.51 s)."""
    return p.saved_bytes_per_sample * plan.part.stack, 0.0


def products(plan: Plan) -> tuple[int, int]:
    return 0, plan.colours  # a Taylor pass counts as one JVP


def check(spec: Spec, plan: Plan):
    """Taylor mode's results cross-checked against reverse mode on a few samples (see [Why Taylor mode
    is cross-checked] in _check): None, or the error an explicit mode='forward' raises."""
    from .._check import check_second_order
    why = check_second_order(spec, plan)
    if why is None:
        return None
    return ValueError(f"chunkjac: Taylor mode (mode='forward') cannot give fn's exact derivatives: {why}. "
                      "Pass mode='auto' or mode='reverse' (reverse mode).")


def describe(plan: Plan, per: str) -> str:
    op = plan.part
    passes = f"{plan.colours:,} passes {per}" if plan.colours > 1 else f"one pass {per}"
    k = op.num_directions
    if op.order > 2:
        carried = (f"{k:,} direction{'s' * (k != 1)} to order {op.order} and {op.num_terms:,} collapsed "
                   f"order-{op.order} term{'s' * (op.num_terms != 1)}")
    else:
        t = op.num_terms
        terms = {"laplacian": "1 summed second-order term"}.get(op.engine, f"{t:,} second-order term{'s' * (t != 1)}")
        carried = f"{k:,} direction{'s' * (k != 1)}" + (f" and {terms}" if t else "")
    return f"{op}: Taylor mode, {passes} carrying the value, {carried}"


def run_chunk(spec: Spec, plan: Plan, args: list, n: int, colours: torch.Tensor | None = None,
              calls: int | None = None):
    """Results of one chunk (see Spec.result_shapes) and fn's outputs. Where Taylor mode cannot follow
    fn on this chunk (TaylorRefused: the planner's check saw none on its samples, a data-dependent
    path can still take one), this chunk is computed by reverse mode instead: exact either way."""
    try:
        return run_strict(spec, plan, args, n, colours, calls)
    except TaylorRefused:
        return double_backward.run_chunk(spec, plan, args, n, colours, calls)


def layout(op):
    """The Taylor layout of an operator's pass."""
    if op.order > 2:
        return Layout4(op.num_directions, op.order, op.num_terms, op.top)
    if op.engine == "pairs":
        return Layout(op.num_directions, "pairs", op.pairs, op.num_terms)
    return Layout(op.num_directions, op.engine)


def directions(op, start: int, n: int, x: torch.Tensor, dim: int, shape: tuple) -> tuple:
    """(the chunk's directions as the operator gives them (K, D) or (K, n, D), the seed stack
    (K, *x.shape) with the batch at 1 + dim)."""
    k = op.num_directions
    v = op.seeds(start, n, x.dtype, x.device)
    if v.dim() == 2:
        seed = v.reshape(k, *shape).unsqueeze(1 + dim)
    else:
        seed = v.reshape(k, n, *shape).movedim(1, 1 + dim)
    return v, seed


def run_strict(spec: Spec, plan: Plan, args: list, n: int, colours: torch.Tensor | None = None,
               calls: int | None = None):
    """As run_chunk, but a TaylorRefused propagates (the planner's check)."""
    if is_empty(spec, plan):
        return empty(spec, plan, args, n, plan.dtype, spec.device)
    t = spec.targets[0]
    op = plan.part
    i, dim = t.index, spec.in_dims[t.index]
    x = args[i]
    if not (spec.create_graph and x.requires_grad):
        x = x.detach()
    lay = layout(op)
    v, seed = directions(op, getattr(args, "start", 0), n, x, dim, t.shape)
    results = outputs = None
    # Gradients stay on, so that fn's own torch.no_grad() blocks show (see _taylor._dispatch); without
    # create_graph the parameters are detached, so that the pass records no graph all the same.
    modules = None if spec.create_graph else reached_modules(spec)
    for mask in groups(colours, calls):
        s = seed if mask is None else seed * along(mask.to(x.device), 1 + dim, seed.dim())
        d = torch.zeros((lay.size, *x.shape), dtype=x.dtype, device=x.device)
        d[:op.num_directions] = s
        a = list(args)
        plain = contextlib.nullcontext() if modules is None else detached_parameters(modules)
        with taylor_pass(), torch.enable_grad(), plain:
            a[i] = Jet.of(x, d, lay)
            out = call(spec, a)
            y = selected(spec, plan, out, n)
            if not isinstance(y, Jet):
                # The derivatives were lost on the way (a torch.func transform or TorchScript inside fn,
                # or fn's output does not depend on x): reverse mode says which, exactly.
                raise TaylorRefused("fn's output does not carry Taylor mode's derivatives")
            r = _results(op, lay, y, n, plan.out_shape, v)
        results = r if mask is None else [merge(None if results is None else p, q, mask)
                                          for p, q in zip(results or [None] * len(r), r)]
        if outputs is None:
            outputs = tree_map(lambda v: _plain(v, spec.create_graph), out)
    return results, outputs


def _plain(v, keep_graph: bool):
    if isinstance(v, Jet):
        v = v._v
    if isinstance(v, torch.Tensor) and not keep_graph:
        v = v.detach()
    return v


def _results(op, lay, y: torch.Tensor, n: int, out_shape: tuple, v: torch.Tensor) -> list:
    """The operator's results from the output's jet: first-order terms (n, n_out, K), the carried terms
    (n, n_out, T) and, to fourth order, every direction's coefficients (n, n_out, K) by order."""
    k = op.num_directions
    d = y._d.reshape(lay.size, n, -1)
    if isinstance(lay, Layout4):
        by_order, terms = _taylor4.blocks(y, lay, n)
        first = by_order[1]
    else:
        by_order, first, terms = None, d[:k].permute(1, 2, 0), d[k:].permute(1, 2, 0)
    return op.assemble(first, terms, n, out_shape, by_order, v)
