"""Second derivatives by reverse over reverse (the seed's grad-of-grad, batched): the reference
strategy, and what Taylor mode falls back to (see _taylor) where it cannot follow fn.

With independent samples (the sum trick, see [The sum trick] in coloured): for each per-sample
output element r, one VJP gives every sample's gradient g_r (n, D) with its graph; the gradient of
g_r[:, k] summed over samples gives row k of every sample's Hessian of y_r. Coupled samples: the same
per colour group, whose samples share products.

Cost per chunk of n samples, k colour groups: 1 forward + k * n_out * (1 + ceil(D / rows_per_vjp))
VJPs over the chunk's graph (rows_per_vjp rows of the Hessian in one is_grads_batched call), the
second ones through the first ones' graph: about 3 forwards each. Memory: the chunk's graph, twice.
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch

from .. import _autograd
from .._function import call, detach_all
from .._plan import Plan
from .._spec import Spec
from ._cost import SECOND_VJP_COST
from ._second import empty, groups, is_empty, merge, selected

if TYPE_CHECKING:
    from .._probe import Probe


def candidates(spec: Spec, p: Probe, device: torch.device) -> list:
    """Reverse over reverse for second derivatives where reverse mode is allowed: all D Hessian rows
    in one call, or one per call; 1 + D VJPs per output element (see [Choosing a second-order strategy])."""
    if spec.part is None or spec.mode == "forward":
        return []
    dims = spec.targets[0].numel
    if spec.part.reverse_name == "directional":
        plan = Plan(strategy="double_backward", modes=("reverse",), rows_per_vjp=1, cols_per_jvp=1,
                    batch_size=spec.batch_size, chunk_size=spec.batch_size, out_shape=p.out_shape, in_numels=(dims,),
                    dtype=p.dtype, device=device, part=spec.part)
        return [(plan, p.out_numel * (1 + _weighted_vjps(spec.part)))]
    cost = p.out_numel * (1 + SECOND_VJP_COST * dims)
    return [(Plan(strategy="double_backward", modes=("reverse",), rows_per_vjp=k, cols_per_jvp=1,
                  batch_size=spec.batch_size, chunk_size=spec.batch_size, out_shape=p.out_shape, in_numels=(dims,),
                  dtype=p.dtype, device=device, part=spec.part), cost * (1 + 1e-3 * j))
            for j, k in enumerate(dict.fromkeys((dims, 1)))]


def memory(spec: Spec, p: Probe, plan: Plan) -> tuple[float, float]:
    """(activations, other work) bytes per sample: the forward's activations; the first VJP's graph
    and the rows in flight."""
    return p.saved_bytes_per_sample, p.saved_bytes_per_sample * (1 + plan.rows_per_vjp)


def _weighted_vjps(op) -> float:
    """The directional route's VJPs after the first, per output element, in VJP rows: the m-th in a
    chain runs through the graphs of the m - 1 before it (about m - 1 times SECOND_VJP_COST)."""
    if op.order <= 2:
        return SECOND_VJP_COST * _vjps_per_output(op)
    return op.num_directions * SECOND_VJP_COST * sum(m - 1 for m in range(2, op.order + 1))


def _vjps_per_output(op) -> int:
    """VJPs after the first, per output element, of the directional route."""
    if op.order <= 2:
        return len({p[0] for p in op.pairs})
    return op.num_directions * (op.order - 1)


def products(plan: Plan) -> tuple[int, int]:
    if plan.part.reverse_name == "directional":
        return plan.colours * math.prod(plan.out_shape) * (1 + _vjps_per_output(plan.part)), 0
    dims = plan.in_numels[0]
    return plan.colours * math.prod(plan.out_shape) * (1 + -(-dims // max(plan.rows_per_vjp, 1))), 0


def check(spec: Spec, plan: Plan):
    """Nothing to cross-check: plain reverse mode, whose formulas the others are checked against."""
    return None


def describe(plan: Plan, per: str) -> str:
    vjps = products(plan)[0]
    if plan.part.reverse_name == "directional":
        return f"{plan.part}: reverse mode along its directions, {vjps:,} VJP call{'s' * (vjps != 1)} {per}"
    return (f"{plan.part}: reverse over reverse, {vjps:,} VJP call{'s' * (vjps != 1)} {per} "
            f"({plan.rows_per_vjp:,} Hessian row{'s' * (plan.rows_per_vjp != 1)} per call)")


def run_chunk(spec: Spec, plan: Plan, args: list, n: int, colours: torch.Tensor | None = None,
              calls: int | None = None):
    if is_empty(spec, plan):
        return empty(spec, plan, args, n, plan.dtype, spec.device)
    if plan.part.reverse_name == "directional":
        return _directional(spec, plan, args, n, colours, calls)
    t = spec.targets[0]
    i, dim = t.index, spec.in_dims[t.index]
    dims, part, create = t.numel, plan.part.name, spec.create_graph
    step = max(1, min(plan.rows_per_vjp, dims))
    with torch.enable_grad():
        x = args[i]
        if not (create and x.requires_grad):
            x = x.detach().requires_grad_(True)
        a = list(args)
        a[i] = x
        out = call(spec, a)
        y = selected(spec, plan, out, n)
        rows = y[0].numel() if n else 0
        yf = y.reshape(n, rows)
        zeros = torch.zeros((n, rows, dims, dims), dtype=y.dtype, device=y.device)
        hess, jac = zeros, zeros[..., 0]
        budget = [calls]

        def spend() -> bool:
            if budget[0] is None:
                return True
            budget[0] -= 1
            return budget[0] >= 0

        for mask in groups(colours, calls):
            w = torch.ones(n, dtype=y.dtype, device=y.device) if mask is None else mask.to(y.device, y.dtype)
            h_rows, j_rows = [], []
            for r in range(rows):
                if not y.requires_grad or not spend():
                    h_rows.append(zeros[:, 0])
                    j_rows.append(zeros[:, 0, :, 0])
                    continue
                (g,) = _autograd.grad(yf[:, r], x, w, retain_graph=True, create_graph=True, allow_unused=True)
                g = torch.zeros_like(x) if g is None else g
                gf = g.movedim(dim, 0).reshape(n, dims)  # (n, D): row r of every sample's Jacobian
                j_rows.append(gf)
                h_rows.append(_hessian_rows(gf, x, dim, w, step, create, spend) if g.requires_grad else zeros[:, 0])
            h, j = torch.stack(h_rows, 1), torch.stack(j_rows, 1)  # (n, rows, D, D), (n, rows, D)
            hess, jac = merge(None if mask is None else hess, h, mask), merge(None if mask is None else jac, j, mask)
    second = {"laplacian": lambda: hess.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True),
              "diagonal": lambda: hess.diagonal(dim1=-2, dim2=-1),
              "full": lambda: hess.reshape(n, rows, dims * dims)}[part]()
    res = plan.part.assemble(jac, second, n, plan.out_shape)
    if not create:
        res = [r.detach() for r in res]
    return res, (out if create else detach_all(out))


def _hessian_rows(gf: torch.Tensor, x: torch.Tensor, dim: int, w: torch.Tensor, step: int, create: bool,
                  spend) -> torch.Tensor:
    """(n, D, D): row k of every sample's Hessian is the gradient of sum_i w_i gf[i, k]."""
    n, dims = gf.shape
    out = []
    for k0 in range(0, dims, step):
        k1 = min(k0 + step, dims)
        if not spend():
            out.append(torch.zeros((n, k1 - k0, dims), dtype=gf.dtype, device=gf.device))
            continue
        if k1 - k0 == 1:
            cot = torch.zeros_like(gf)
            cot[:, k0] = w
            (h,) = _autograd.grad(gf, x, cot, retain_graph=True, create_graph=create, allow_unused=True)
            h = torch.zeros_like(x) if h is None else h
            out.append(h.movedim(dim, 0).reshape(n, 1, dims))
        else:
            cot = torch.zeros((k1 - k0, n, dims), dtype=gf.dtype, device=gf.device)
            cot[torch.arange(k1 - k0), :, torch.arange(k0, k1)] = w
            (h,) = _autograd.grad(gf, x, cot, retain_graph=True, create_graph=create, allow_unused=True,
                                       is_grads_batched=True)
            h = torch.zeros((k1 - k0, *x.shape), dtype=gf.dtype, device=gf.device) if h is None else h
            out.append(h.movedim(dim + 1, 1).reshape(k1 - k0, n, dims).transpose(0, 1))
    return torch.cat(out, 1)


def _directional(spec: Spec, plan: Plan, args: list, n: int, colours, calls):
    """An operator's terms by reverse mode along its directions (see _operators): per output element r
    and direction v_k, the chain D u_r[v_k], D^2 u_r[v_k, v_k], ... (each the gradient of the one before,
    summed over the samples of a colour group, dotted with v_k), and D^2 u_r[v_k, v_l] for the pairs
    of a mixed term. Cost: n_out * (1 + sum over directions of the orders they need) VJPs."""
    from .._taylor import by_definition
    from .taylor import directions
    op = plan.part
    t = spec.targets[0]
    i, dim = t.index, spec.in_dims[t.index]
    create = spec.create_graph
    k = op.num_directions
    with torch.enable_grad():
        x = args[i]
        if not (create and x.requires_grad):
            x = x.detach().requires_grad_(True)
        v, _ = directions(op, getattr(args, "start", 0), n, x, dim, t.shape)
        v = (v if v.dim() == 3 else v.unsqueeze(1).expand(k, n, v.shape[-1])).to(x.dtype)  # (K, n, D)
        a = list(args)
        a[i] = x
        with by_definition() if op.order > 2 else contextlib.nullcontext():
            out = call(spec, a)
        y = selected(spec, plan, out, n)
        rows = y[0].numel() if n else 0
        yf = y.reshape(n, rows)
        top_order = op.order
        # Which orders each direction needs: the top (and every lower one) for order >= 3; for order 2,
        # its Hessian-vector product where a pair names it.
        pairs = op.pairs if op.order <= 2 else ()
        need_hvp = sorted({p[0] for p in pairs})
        result = None
        for mask in groups(colours, calls):
            w = torch.ones(n, dtype=y.dtype, device=y.device) if mask is None else mask.to(y.device, y.dtype)
            firsts, terms_rows, orders = [], [], {m: [] for m in range(1, top_order + 1)}
            for r in range(rows):
                g = _grad(yf[:, r], x, w, dim, n)                                   # (n, D)
                first = torch.einsum("nd,knd->nk", g, v)                           # D u_r[v_k]
                firsts.append(first)
                if op.order <= 2:
                    hv = {kk: _grad(first[:, kk], x, w, dim, n) for kk in need_hvp}  # H v_k: (n, D)
                    t_r = torch.zeros((n, op.num_terms), dtype=y.dtype, device=y.device)
                    for kk, ll, tt, c in pairs:
                        t_r[:, tt] = t_r[:, tt] + c * (hv[kk] * v[ll]).sum(-1)
                    terms_rows.append(t_r)
                else:
                    # Each direction's chain on its own: a chain through a stack of all of them would
                    # send every backward pass down every direction's graph.
                    chains = []
                    for kk in range(k):
                        chain = [first[:, kk]]
                        for _ in range(2, top_order + 1):
                            chain.append((_grad(chain[-1], x, w, dim, n) * v[kk]).sum(-1))
                        chains.append(chain)
                    for m in range(1, top_order + 1):
                        orders[m].append(torch.stack([c[m - 1] for c in chains], 1) / math.factorial(m))
            first = torch.stack(firsts, 1) if rows else torch.zeros((n, 0, k), dtype=y.dtype, device=y.device)
            if op.order <= 2:
                terms = torch.stack(terms_rows, 1) if rows else first.new_zeros((n, 0, op.num_terms))
                by_order = None
            else:
                by_order = {m: torch.stack(orders[m], 1) for m in orders} if rows else \
                    {m: first.new_zeros((n, 0, k)) for m in orders}
                terms = torch.einsum("tk,nok->not", op.top.to(first.device, first.dtype), by_order[top_order])
            r_ = op.assemble(first, terms, n, plan.out_shape, by_order, v)
            result = r_ if mask is None else [merge(None if result is None else p_, q, mask)
                                              for p_, q in zip(result or [None] * len(r_), r_)]
    if not create:
        result = [r_.detach() for r_ in result]
    return result, (out if create else detach_all(out))


def _grad(s: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """(n, D): the gradient of sum_i w_i s_i w.r.t. x, per sample (zero where s does not depend on x),
    on the graph (the next order differentiates it)."""
    if not s.requires_grad:
        return torch.zeros_like(x).movedim(dim, 0).reshape(n, -1)
    (g,) = _autograd.grad(s, x, w, retain_graph=True, create_graph=True, allow_unused=True)
    g = torch.zeros_like(x) if g is None else g
    return g.movedim(dim, 0).reshape(n, -1)
