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

import math
from typing import TYPE_CHECKING

import torch

from .. import _autograd
from .._function import call, detach_all, select
from .._plan import Plan
from .._spec import Spec
from ._cost import SECOND_VJP_COST
from ._second import empty, groups, is_empty, merge, shaped

if TYPE_CHECKING:
    from .._probe import Probe


def candidates(spec: Spec, p: Probe, device: torch.device) -> list:
    """Reverse over reverse for second derivatives where reverse mode is allowed: all D Hessian rows
    in one call, or one per call; 1 + D VJPs per output element (see [Choosing a second-order strategy])."""
    if spec.part is None or spec.mode == "forward":
        return []
    dims = spec.targets[0].numel
    cost = p.out_numel * (1 + SECOND_VJP_COST * dims)
    return [(Plan(strategy="double_backward", modes=("reverse",), rows_per_vjp=k, cols_per_jvp=1,
                  batch_size=spec.batch_size, chunk_size=spec.batch_size, out_shape=p.out_shape, in_numels=(dims,),
                  dtype=p.dtype, device=device, part=spec.part), cost * (1 + 1e-3 * j))
            for j, k in enumerate(dict.fromkeys((dims, 1)))]


def memory(spec: Spec, p: Probe, plan: Plan) -> tuple[float, float]:
    """(activations, other work) bytes per sample: the forward's activations; the first VJP's graph
    and the rows in flight."""
    return p.saved_bytes_per_sample, p.saved_bytes_per_sample * (1 + plan.rows_per_vjp)


def products(plan: Plan) -> tuple[int, int]:
    dims = plan.in_numels[0]
    return plan.colours * math.prod(plan.out_shape) * (1 + -(-dims // max(plan.rows_per_vjp, 1))), 0


def check(spec: Spec, plan: Plan):
    """Nothing to cross-check: plain reverse mode, whose formulas the others are checked against."""
    return None


def describe(plan: Plan, per: str) -> str:
    vjps = products(plan)[0]
    return (f"{plan.part}: reverse over reverse, {vjps:,} VJP call{'s' * (vjps != 1)} {per} "
            f"({plan.rows_per_vjp:,} Hessian row{'s' * (plan.rows_per_vjp != 1)} per call)")


def run_chunk(spec: Spec, plan: Plan, args: list, n: int, colours: torch.Tensor | None = None,
              calls: int | None = None):
    if is_empty(spec, plan):
        return empty(spec, plan, args, n, plan.dtype, spec.device)
    t = spec.targets[0]
    i, dim = t.index, spec.in_dims[t.index]
    dims, part, create = t.numel, plan.part, spec.create_graph
    step = max(1, min(plan.rows_per_vjp, dims))
    with torch.enable_grad():
        x = args[i]
        if not (create and x.requires_grad):
            x = x.detach().requires_grad_(True)
        a = list(args)
        a[i] = x
        out = call(spec, a)
        y = select(spec, out, n)
        if tuple(y.shape[1:]) != plan.out_shape:
            raise ValueError(
                f"chunkjac: fn's per-sample output shape changed from {plan.out_shape} (probe) to "
                f"{tuple(y.shape[1:])} in a chunk of {n} samples; each sample's output must not depend on "
                "how many samples are in the batch.")
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
    second = {"laplacian": lambda: hess.diagonal(dim1=-2, dim2=-1).sum(-1),
              "diagonal": lambda: hess.diagonal(dim1=-2, dim2=-1), "full": lambda: hess}[part]()
    res = shaped(spec, plan.out_shape, second, jac)
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
