"""The sum trick: per-sample Jacobians of independent samples from batched VJPs or JVPs.

# NOTE: [The sum trick]
# When y_i depends on no x_j with j != i, d(sum_i y_i)/dx stacks every sample's own Jacobian:
# row r of the per-sample Jacobian for all B samples at once is the gradient of y[:, r].sum(), i.e.
# one VJP of the batch with the cotangent e_r broadcast over samples. Reverse mode therefore costs
# one forward and n_out VJPs per chunk, whatever B is; forward mode costs n_in JVPs whose tangent
# e_c is broadcast over samples. Several rows (columns) go through one call vectorised with
# ``is_grads_batched`` (``vmap``); the plan says how many. If samples interact the answer is silently
# wrong, which is why ``coupling`` exists.

Cost per chunk of n samples: reverse: 1 forward + ceil(n_out / rows_per_vjp) batched VJPs, memory
~ activations of n samples + rows_per_vjp x n x n_in for the gradients; forward: ceil(n_in /
cols_per_jvp) batched JVPs, memory ~ cols_per_jvp x activations.
"""
from __future__ import annotations

import torch
from torch.func import jvp, vmap

from .._errors import RandomFunctionError
from .._function import call, detach_all, select, split_tensors
from .._plan import Plan
from .._spec import Spec


def run_chunk(spec: Spec, plan: Plan, args: list, n: int):
    """Jacobians of one chunk of n samples.

    Returns ``(jacs, outputs)``: ``jacs[k]`` has shape (n, *out, *target_k.shape); ``outputs`` is fn's
    full output for the chunk (detached unless ``create_graph``).
    """
    jacs: list = [None] * len(spec.targets)
    outputs = None
    reverse = [k for k, m in enumerate(plan.modes) if m == "reverse"]
    # Reverse mode needs autograd whatever the caller's grad mode (torch.no_grad() around compute);
    # forward mode records a graph only when the result must be differentiable.
    if reverse:
        with torch.enable_grad():
            for k, j in zip(reverse, _reverse(spec, plan, args, n, reverse, out_box := [])):
                jacs[k] = j
        outputs = out_box[0]
    for k, m in enumerate(plan.modes):
        if m == "forward":
            with torch.enable_grad() if spec.create_graph else torch.no_grad():
                jacs[k], out = _forward(spec, plan, args, n, k)
            outputs = out if outputs is None else outputs
    return jacs, outputs



def _check_shape(plan: Plan, y: torch.Tensor) -> None:
    if tuple(y.shape[1:]) != plan.out_shape:
        raise ValueError(
            f"chunkjac: fn's per-sample output shape changed from {plan.out_shape} (probe) to "
            f"{tuple(y.shape[1:])} in a chunk of {y.shape[0]} samples; each sample's output must not "
            "depend on how many samples are in the batch.")


def _reverse(spec: Spec, plan: Plan, args: list, n: int, ks: list[int], out_box: list) -> list:
    create = spec.create_graph
    args = list(args)
    prims = []
    for k in ks:
        i = spec.targets[k].index
        x = args[i]
        # Keep the user's graph when they want to differentiate J again; otherwise a fresh leaf.
        if not (create and x.requires_grad):
            x = x.detach().requires_grad_(True)
        args[i] = x
        prims.append(x)
    out = call(spec, args)
    y = select(spec, out, n)
    _check_shape(plan, y)
    out_box.append(out if create else detach_all(out))
    rows = y[0].numel()
    yf = y.reshape(n, rows)
    dims = [spec.in_dims[spec.targets[k].index] for k in ks]
    shapes = [spec.targets[k].shape for k in ks]
    blocks: list[list[torch.Tensor]] = [[] for _ in ks]
    if y.requires_grad and rows:
        eye = torch.eye(rows, dtype=y.dtype, device=y.device)
        step = plan.rows_per_vjp
        r0 = 0
        while r0 < rows:
            r1 = min(r0 + step, rows)
            try:
                gs = _vjp_block(yf, prims, eye[r0:r1], n, create, last=r1 == rows)
            except RuntimeError:
                if r1 - r0 == 1:
                    raise
                # Some backward formulas (old-style autograd.Functions, ops without batching rules)
                # cannot run under is_grads_batched; the row-by-row loop is exact and always works.
                step = 1
                continue
            for b, g, x, d in zip(blocks, gs, prims, dims):
                g = torch.zeros((r1 - r0, *x.shape), dtype=y.dtype, device=y.device) if g is None else g
                b.append(g.movedim(1 + d, 0).to(y.dtype))  # (n, k, *in)
            r0 = r1
    jacs = []
    for b, shp in zip(blocks, shapes):
        if not b:  # fn's output does not depend on any wrt input (a constant): zero Jacobian
            j = torch.zeros((n, rows, *shp), dtype=y.dtype, device=y.device)
        else:
            j = b[0] if len(b) == 1 else torch.cat(b, dim=1)
        jacs.append(j.reshape(n, *plan.out_shape, *shp))
    return jacs


def _vjp_block(yf, prims, cot_rows, n, create, last):
    k = cot_rows.shape[0]
    if k == 1:
        cot = cot_rows[0].expand(n, -1)
        gs = torch.autograd.grad(yf, prims, cot, retain_graph=create or not last, create_graph=create,
                                 allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in gs]
    cot = cot_rows.unsqueeze(1).expand(k, n, -1)
    # retain_graph even on the last block: if the batched call fails we fall back to the loop.
    return torch.autograd.grad(yf, prims, cot, retain_graph=True, create_graph=create, allow_unused=True,
                               is_grads_batched=True)


def _forward(spec: Spec, plan: Plan, args: list, n: int, k: int):
    t = spec.targets[k]
    create = spec.create_graph
    if t.kind == "input":
        x = args[t.index]
        d = spec.in_dims[t.index]
    else:
        x = spec.param(t.name)
        d = None
    if not create:
        x = x.detach()
    if d is not None:
        # A chunk is a view into the whole batch, and forward AD gives each tangent the layout of the
        # primal's whole storage: clone so that a JVP allocates a chunk, not a batch, per column.
        x = x.clone()
    rebuild_box: list = []

    def g(v):
        a = list(args)
        params = None
        if t.kind == "input":
            a[t.index] = v
        else:
            params = {t.name: v}
        out = call(spec, a, params)
        y = select(spec, out, n)
        tensors, rebuild = split_tensors(out)
        if not rebuild_box:
            rebuild_box.append(rebuild)
        return y, tensors

    def one(tangent):
        y, tan, aux = jvp(g, (x,), (tangent,), has_aux=True)
        return tan, (y, aux)

    m = t.numel
    cols = []
    y = aux = None
    eye = torch.eye(m, dtype=x.dtype, device=x.device)
    step = plan.cols_per_jvp
    c0 = 0
    while c0 < m:
        c1 = min(c0 + step, m)
        tangents = eye[c0:c1].reshape(c1 - c0, *t.shape)
        if d is not None:  # e_c broadcast over the batch dim of x
            tangents = tangents.unsqueeze(1 + d).expand(c1 - c0, *x.shape)
        if c1 - c0 == 1:
            tan, (y, aux) = one(tangents[0])
            tan = tan.unsqueeze(0)
        else:
            try:
                tan, (y, aux) = vmap(one, out_dims=(0, None))(tangents)
            except RuntimeError as e:
                if "randomness" in str(e):
                    # A column loop would draw anew for each column: a Jacobian of no single draw.
                    raise RandomFunctionError(
                        "chunkjac: fn draws random numbers (dropout in training mode?), so forward mode "
                        "would differentiate a different draw for each input column. Call model.eval(), "
                        "or use mode='reverse', whose one forward pass shares a single draw.") from None
                step = 1  # no batching rule for some op: the column loop is exact and always works
                continue
        cols.append(tan)  # (k, n, *out)
        c0 = c1
    if y is None:  # a target with no elements
        y, aux = g(x)
    _check_shape(plan, y)
    j = cols[0] if len(cols) == 1 else torch.cat(cols, 0) if cols else y.new_zeros((0, *y.shape))
    j = j.movedim(0, -1).reshape(n, *plan.out_shape, *t.shape)
    return j, rebuild_box[0](aux)
