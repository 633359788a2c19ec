"""Kronecker-projected per-sample gradients from the layers' inputs and output gradients (LoGra), never
forming a per-sample weight gradient.

# NOTE: [Projecting from a layer's inputs and output gradients]
# A Linear layer z_t = W a_t + b (t over positions: a sequence, pixels) gives sample i's weight
# gradient G_i = sum_t delta_it a_it^T, delta the gradient w.r.t. z. Its Kronecker projection (see
# [Projected per-sample gradients] in _projection) is P_out^T G_i P_in = sum_t (P_out^T delta_it)
# (P_in^T a_it)^T: two small products per position and one outer product per sample, d_out x d_in
# numbers, where G_i has out x in. The bias's gradient is sum_t delta_it. With independent samples
# one backward pass of sum_i y_i[o] gives every sample's delta for output element o (the sum trick),
# so a chunk costs one forward, n_out backward passes to the layers' outputs, and per layer
# n x T x (in d_in + out d_out) multiply-adds, against n x out x in to form the gradients and
# n x out x in x d_in to project them.
#
# It applies where every target is a Linear layer's weight or bias, each layer runs once per forward
# and its output is not written in place; elsewhere the per-sample strategy forms the gradients and
# the executor projects them.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import _autograd
from .._function import call, select
from .._plan import Plan
from .._spec import Spec

if TYPE_CHECKING:
    from .._probe import Probe


class NotApplicable(Exception):
    """fn's structure is outside what this strategy follows (see the NOTE); the general route serves it."""


def _layers(spec: Spec) -> dict:
    """{module: {"weight": target name, "bias": target name}} for the targets' Linear layers; raises
    NotApplicable where a target is not a Linear's weight or bias."""
    fn = spec.fn
    if not isinstance(fn, nn.Module):
        raise NotApplicable("fn is not a module")
    found: dict = {}
    for t in spec.targets:
        if t.kind != "param" or t.batched:
            raise NotApplicable("a target is not a parameter")
        owner, _, attr = t.name.rpartition(".")
        mod = fn.get_submodule(owner) if owner else fn
        if type(mod) is not nn.Linear or attr not in ("weight", "bias"):
            raise NotApplicable(f"{t.name} is not a Linear layer's weight or bias")
        found.setdefault(mod, {})[attr] = t.name
    return found


def candidates(spec: Spec, p: Probe, device: torch.device) -> list:
    """One plan where the call projects with kind "kronecker" and every target is a Linear layer's."""
    if spec.project is None or spec.project.projection.kind != "kronecker" or spec.part is not None \
            or spec.create_graph or spec.mode == "forward":
        return []
    try:
        _layers(spec)
    except NotApplicable:
        return []
    n_out = p.out_numel
    plan = Plan(strategy="kronecker", modes=("reverse",) * len(spec.targets), batch_size=spec.batch_size,
                chunk_size=spec.batch_size, rows_per_vjp=1, cols_per_jvp=1, out_shape=p.out_shape,
                in_numels=tuple(t.numel for t in spec.targets), dtype=p.dtype, device=device)
    return [(plan, 1.0 + n_out)]


def memory(spec: Spec, p: Probe, plan: Plan) -> tuple[float, float]:
    """(activations, other work) bytes per sample: the forward's activations; the layers' output
    gradients of one backward pass."""
    return p.saved_bytes_per_sample, p.saved_bytes_per_sample


def products(plan: Plan) -> tuple[int, int]:
    return math.prod(plan.out_shape), 0


def check(spec: Spec, plan: Plan):
    return None


def describe(plan: Plan, per: str) -> str:
    rows = math.prod(plan.out_shape)
    return (f"Kronecker projection from the layers' inputs and output gradients, {rows:,} backward "
            f"pass{'es' * (rows != 1)} {per}")


def run_chunk(spec: Spec, plan: Plan, args: list, n: int, colours: torch.Tensor | None = None,
              calls: int | None = None):
    """The chunk's projected rows (n, *out, dim) and fn's outputs."""
    from .per_sample import run_chunk as general
    bound = spec.project
    layers = _layers(spec)
    seen: dict = {}

    def hook(mod, inputs, output):
        seen.setdefault(mod, []).append((inputs[0].detach(), output, output._version))

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.enable_grad():
            out = call(spec, list(args))
    finally:
        for h in handles:
            h.remove()
    if any(len(v) != 1 for v in seen.values()) or set(seen) != set(layers) or \
            any(o._version != ver or not o.requires_grad for v in seen.values() for (_, o, ver) in v[:1]):
        # a layer run twice or not at all, an output written in place: the per-sample route, projected
        jacs, outputs = general(spec, plan, args, n, colours, calls)
        return [bound.project(jacs, 1 + len(plan.out_shape))], outputs
    y = select(spec, out, n)
    rows = math.prod(y.shape[1:]) if n else 0
    yf = y.reshape(n, rows)
    mods = list(layers)
    outs = [seen[m][0][1] for m in mods]
    dtype, device = yf.dtype, yf.device
    # Per layer: the inputs projected once, (n, T, d_in); per output row, the output gradients.
    groups = {g.names[0]: g for g in bound.groups if g.factors is not None}
    small = next((g for g in bound.groups if g.factors is None), None)
    a_proj = {}
    for m in mods:
        name = layers[m].get("weight")
        if name is not None:
            g = groups[name]
            a = seen[m][0][0]
            a = a.reshape(n, -1, a.shape[-1]).to(dtype)
            a_proj[m] = a @ bound._whole(2 * g.tag + 1, g.factors[1], g.factors[3], device, dtype)
    result = torch.empty((n, rows, bound.projection.dim), dtype=dtype, device=device)
    for r in range(rows):
        col = yf[:, r]
        deltas = _autograd.grad(col, outs, torch.ones_like(col), retain_graph=r + 1 < rows, allow_unused=True)
        biases = {}
        for m, delta in zip(mods, deltas):
            delta = torch.zeros_like(outs[mods.index(m)]) if delta is None else delta
            delta = delta.reshape(n, -1, delta.shape[-1]).to(dtype)
            name = layers[m].get("weight")
            if name is not None:
                g = groups[name]
                d = delta @ bound._whole(2 * g.tag, g.factors[0], g.factors[2], device, dtype)  # (n, T, d_out)
                z = torch.einsum("ntd,nte->nde", d, a_proj[m]) if d.shape[1] != 1 else \
                    d[:, 0, :, None] * a_proj[m][:, 0, None, :]
                result[:, r, g.offset:g.offset + g.dim] = z.reshape(n, g.dim)
            if "bias" in layers[m]:
                biases[layers[m]["bias"]] = delta.sum(1)
        if small is not None:
            flat = torch.cat([biases[name] for name in small.names], 1)
            result[:, r, small.offset:small.offset + small.dim] = \
                flat @ bound._whole(2 * small.tag, small.numel, small.dim, device, dtype)
    result = result.reshape(n, *plan.out_shape, bound.projection.dim)
    if bound.projection.dtype is not None:
        result = result.to(bound.projection.dtype)
    outputs = out if spec.return_outputs else None
    if outputs is not None:
        from .._function import detach_all
        outputs = detach_all(outputs)
    return [result], outputs
