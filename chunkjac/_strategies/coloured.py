"""Selective extraction by colours: per-sample Jacobians from batched VJPs or JVPs.

# NOTE: [The sum trick]
# When y_i depends on no x_j with j != i, d(sum_i y_i)/dx stacks every sample's own Jacobian:
# row r of the per-sample Jacobian for all B samples at once is the gradient of y[:, r].sum(), i.e.
# one VJP of the batch with the cotangent e_r broadcast over samples. Reverse mode therefore costs
# one forward and n_out VJPs per chunk, whatever B is; forward mode costs n_in JVPs whose tangent
# e_c is broadcast over samples. Several rows (columns) go through one call vectorised with
# ``is_grads_batched`` (``vmap``); the plan says how many.
#
# Coupled samples are the same mechanism with colours (see [Colouring] in _coupling): the cotangent
# of the pair (colour c, row r) is e_r on the samples of colour c only, and from its gradient each
# sample of colour c keeps its own slice. Independent samples are one colour, so a chunk costs
# (colours x n_out) VJP rows, or (colours x n_in) JVP columns in forward mode.

Cost per chunk of n samples and k colours: reverse: 1 forward + ceil(k * n_out / rows_per_vjp)
batched VJPs over the chunk, memory ~ activations of n samples + rows_per_vjp x n x n_in for the
gradients; forward: ceil(k * n_in / cols_per_jvp) batched JVPs, memory ~ cols_per_jvp x activations.
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
from torch.func import jvp, vmap

from .. import _autograd
from .._errors import RandomFunctionError, is_out_of_memory
from .._function import FnError, call, load_forward_decompositions, detach_all, own_buffers, reached_modules, select, shielded, split_tensors
from .._plan import Plan
from .._spec import Spec
from ._cost import BLOCK, JVP_COST, MAX_VECTORISED

if TYPE_CHECKING:
    from .._probe import Probe


def candidates(spec: Spec, p: Probe, device: torch.device) -> list:
    """(plan, cost) for independent samples: each mode the call allows, all rows (columns) in one
    vectorised call, one per call, and for wide outputs a block of BLOCK (see [Choosing the AD mode])."""
    if spec.part is not None or (spec.mode == "reverse" and any(not t.batched for t in spec.targets)):
        return []  # second order; shared tensors in reverse mode: the per-sample strategy
    n_out = p.out_numel
    max_in = max(t.numel for t in spec.targets)
    found, seen = [], set()
    for mode in {"auto": ("reverse", "forward"), "reverse": ("reverse",), "forward": ("forward",)}[spec.mode]:
        modes = tuple(mode if t.batched else "forward" for t in spec.targets)
        if modes in seen:
            continue
        seen.add(modes)
        reverse = "reverse" in modes
        cost = (n_out if reverse else 0) + JVP_COST * sum(t.numel for t, m in zip(spec.targets, modes) if m == "forward")
        width = n_out if reverse else max_in
        # (Not all at once beyond MAX_VECTORISED: a 256x784 weight's 200,704 one-hot tangents would
        # take 161 GB before any measurement could say so.)
        blocks = ([width] if width <= MAX_VECTORISED else []) + [1] + ([BLOCK] if width > 2 * BLOCK else [])
        for j, block in enumerate(dict.fromkeys(max(b, 1) for b in blocks)):
            plan = Plan(strategy="coloured", modes=modes, batch_size=spec.batch_size, chunk_size=spec.batch_size,
                        rows_per_vjp=block if reverse else max(n_out, 1), cols_per_jvp=max_in if reverse else block,
                        out_shape=p.out_shape, in_numels=tuple(t.numel for t in spec.targets), dtype=p.dtype,
                        device=device)
            found.append((plan, cost * (1 + 1e-3 * j)))  # equal counts: the vectorised call first
    return found


def memory(spec: Spec, p: Probe, plan: Plan) -> tuple[float, float]:
    """(activations, other work) bytes per sample of a chunk: the activations autograd keeps, and one
    more copy of them per row (column) a vectorised call carries with its cotangents and gradients."""
    item = plan.dtype.itemsize
    saved = p.saved_bytes_per_sample
    k_rev = plan.rows_per_vjp if "reverse" in plan.modes else 0
    k_fwd = plan.cols_per_jvp if "forward" in plan.modes else 0
    batched_in = sum(t.numel for t in spec.targets if t.batched) * item
    return saved, saved * (k_rev + k_fwd) + k_rev * (batched_in + p.out_numel * item)


def products(plan: Plan) -> tuple[int, int]:
    rows = plan.colours * math.prod(plan.out_shape)
    vjps = -(-rows // plan.rows_per_vjp) if "reverse" in plan.modes else 0
    jvps = sum(-(-n * plan.colours // plan.cols_per_jvp) for n, m in zip(plan.in_numels, plan.modes) if m == "forward")
    return vjps, jvps


def check(spec: Spec, plan: Plan):
    """A plan with forward-mode targets, cross-checked against reverse mode on its first samples (see
    [Why forward mode is cross-checked] in _check): None, or the ForwardModeMismatch found."""
    from .._check import forward_mode_verdict
    return forward_mode_verdict(spec, plan)


def describe(plan: Plan, per: str) -> str:
    vjps, jvps = products(plan)
    work = []
    if vjps:
        rows = plan.colours * math.prod(plan.out_shape)
        work.append(f"{rows:,} VJP{'s' * (rows != 1)} {per} in {vjps:,} call{'s' * (vjps != 1)}")
    if jvps:
        cols = sum(n * plan.colours for n, m in zip(plan.in_numels, plan.modes) if m == "forward")
        work.append(f"{cols:,} JVP{'s' * (cols != 1)} {per} in {jvps:,} call{'s' * (jvps != 1)}")
    return f"{plan.mode} mode, {' + '.join(work) or 'no products'}"


def run_chunk(spec: Spec, plan: Plan, args: list, n: int, colours: torch.Tensor | None = None,
              calls: int | None = None):
    """Jacobians of one chunk of n samples whose (n,) ``colours`` say which samples may share a product
    (None: all of them, the sum trick).

    Returns ``(jacs, outputs)``: ``jacs[k]`` has shape (n, *out, *target_k.shape); ``outputs`` is fn's
    full output for the chunk (detached unless ``create_graph``). ``calls`` stops after that many
    batched products (the planner's measurements; the Jacobians are then incomplete).
    """
    jacs: list = [None] * len(spec.targets)
    outputs = None
    reverse = [k for k, m in enumerate(plan.modes) if m == "reverse"]
    # Reverse mode needs autograd whatever the caller's grad mode (torch.no_grad() around compute);
    # forward mode records a graph only when the result must be differentiable.
    if reverse:
        with torch.enable_grad() if not torch.is_grad_enabled() else contextlib.nullcontext():
            for k, j in zip(reverse, _reverse(spec, plan, args, n, reverse, out_box := [], colours, calls)):
                jacs[k] = j
        outputs = out_box[0]
    for k, m in enumerate(plan.modes):
        if m == "forward":
            with torch.enable_grad() if spec.create_graph else torch.no_grad():
                jacs[k], out = _forward(spec, plan, args, n, k, colours, calls)
            outputs = out if outputs is None else outputs
    return jacs, outputs


def _check_shape(plan: Plan, y: torch.Tensor) -> None:
    if tuple(y.shape[1:]) != plan.out_shape:
        raise ValueError(
            f"chunkjac: fn's per-sample output shape changed from {plan.out_shape} (probe) to "
            f"{tuple(y.shape[1:])} in a chunk of {y.shape[0]} samples; each sample's output must not "
            "depend on how many samples are in the batch.")


def _reverse(spec: Spec, plan: Plan, args: list, n: int, ks: list[int], out_box: list, colours, calls) -> list:
    """Reverse mode for the targets ``ks``: batched inputs (sliced per sample), and shared tensors
    where every sample has a colour of its own (coupled samples: one product per (sample, row) gives
    that sample's derivative w.r.t. the shared tensor; see [Shared tensors in reverse mode])."""
    create = spec.create_graph
    args = list(args)
    prims, params, dims = [], {}, []
    for k in ks:
        t = spec.targets[k]
        x = spec.param(t.name) if t.kind == "param" else args[t.index]
        # Keep the user's graph when they want to differentiate J again; otherwise a fresh leaf.
        if not (create and x.requires_grad):
            x = x.detach().requires_grad_(True)
        if t.kind == "param":
            params[t.name] = x
            dims.append(None)
        else:
            args[t.index] = x
            dims.append(spec.in_dims[t.index])
        prims.append(x)
    out = call(spec, args, params or None)
    y = select(spec, out, n)
    _check_shape(plan, y)
    out_box.append(out if create else detach_all(out))
    jacs = extract_reverse(y, prims, dims, colours, plan.rows_per_vjp, create, calls=calls)
    shapes = [(n, *plan.out_shape, *spec.targets[k].shape) for k in ks]
    return [j if j.shape == s else j.reshape(s) for j, s in zip(jacs, shapes)]


def extract_reverse(y: torch.Tensor, prims: list, dims: list[int], colours: torch.Tensor | None, step: int,
                    create: bool, calls: int | None = None, retain: bool = False,
                    on_call=None) -> list[torch.Tensor]:
    """Per-sample Jacobians (n, n_out, *in) of y (n, *out) w.r.t. each of ``prims`` (batch at ``dims``),
    from batched VJPs of ``step`` (colour, row) pairs each. ``retain`` keeps y's graph afterwards."""
    n = y.shape[0]
    rows = math.prod(y.shape[1:])
    yf = y if y.dim() == 2 else y.reshape(n, rows)
    shapes = [tuple(x.shape) if d is None else tuple(s for k, s in enumerate(x.shape) if k != d)
              for x, d in zip(prims, dims)]
    if colours is not None:
        return _extract_coloured(y, yf, prims, dims, shapes, colours, step, create, calls, retain, on_call)
    blocks: list[list] = [[] for _ in prims]
    if y.requires_grad and rows == 1 and (calls is None or calls >= 1):
        # One output element per sample (a PINN's u, a per-sample loss): one VJP whose cotangent is
        # ones, its gradient (n, *in) reshaped, no block bookkeeping (a training loop's hot path: no
        # op that is not needed, each is a node of the graph a loss on the result goes back through).
        gs = _autograd.grad(yf, prims, torch.ones_like(yf), retain_graph=create or retain, create_graph=create,
                                 allow_unused=True)
        for b, g, x, d in zip(blocks, gs, prims, dims):
            g = torch.zeros_like(x) if g is None else g if d == 0 else g.movedim(d, 0)
            b.append((g if g.dtype == y.dtype else g.to(y.dtype)).unsqueeze(1))  # (n, 1, *in)
        if on_call is not None:
            on_call(1)
    elif y.requires_grad and rows:
        eye = torch.eye(rows, dtype=y.dtype, device=y.device)
        p0 = done = 0
        while p0 < rows and (calls is None or done < calls):
            p1 = min(p0 + step, rows)
            cot = eye[p0:p1].unsqueeze(1).expand(p1 - p0, n, rows)
            try:
                gs = _vjp_block(yf, prims, cot, create, last=p1 == rows and not retain)
            except RuntimeError:
                if p1 - p0 == 1:
                    raise
                # Some backward formulas (old-style autograd.Functions, ops without batching rules)
                # cannot run under is_grads_batched; the row-by-row loop is exact and always works.
                step = 1
                continue
            for b, g, x, d in zip(blocks, gs, prims, dims):
                g = torch.zeros((p1 - p0, *x.shape), dtype=y.dtype, device=y.device) if g is None else g
                b.append(g.movedim(1 + d, 1).to(y.dtype).transpose(0, 1))  # (n, rows of the block, *in)
            done += 1
            if on_call is not None:
                on_call(p1 - p0)
            p0 = p1
    jacs = []
    for b, shp in zip(blocks, shapes):
        if not b:  # fn's output does not depend on any wrt input (a constant): zero Jacobian
            j = torch.zeros((n, rows, *shp), dtype=y.dtype, device=y.device)
        else:
            j = b[0] if len(b) == 1 and b[0].shape[1] == rows else torch.cat(b, dim=1)
            if j.shape[1] < rows:  # stopped early (a measurement)
                j = torch.cat([j, j.new_zeros((n, rows - j.shape[1], *shp))], 1)
        jacs.append(j)
    return jacs


# NOTE: [Shared tensors in reverse mode]
# Reverse mode sums a shared tensor's contributions over the samples a product carries: the sum
# trick cannot give dy_i/dθ per sample. Where every sample has a colour of its own (coupled samples),
# each product carries one sample's one row, so its gradient w.r.t. θ is exactly that sample's row
# of dy_i/dθ: B x n_out VJPs of the whole-batch forward, by plain autograd, for models that forward
# mode and torch.func cannot run (an adjoint ODE solve's autograd.Function without setup_context).
# The planner offers it only there (see make_coupled_plan); shared tensors of independent samples
# use forward mode or the per-sample strategy.


def _extract_coloured(y, yf, prims, dims, shapes, colours, step, create, calls, retain, on_call):
    """extract_reverse with colours: the pair (c, r) puts e_r on the members of colour c, and each
    member keeps its own slice of the gradient (a shared prim, batch dim None, its whole gradient:
    one member per colour, see [Shared tensors in reverse mode]). Per call: one cotangent scatter,
    one VJP, one gather (the members of each colour are sorted out once: a fully coupled chunk runs
    B x rows calls)."""
    n, rows = yf.shape
    dev = y.device
    colours = colours.to(dev)
    k_col = int(colours.max()) + 1
    members = list(torch.split(torch.argsort(colours, stable=True), torch.bincount(colours, minlength=k_col).tolist()))
    pairs = k_col * rows
    # Without create_graph each gather lands in place; with it, pieces are joined once at the end.
    jacs = [torch.zeros((n, rows, *shp), dtype=y.dtype, device=dev) for shp in shapes]
    pieces: list[list] = [[] for _ in prims]
    p0 = done = 0
    while y.requires_grad and rows and p0 < pairs and (calls is None or done < calls):
        p1 = min(p0 + step, pairs)
        last = p1 == pairs and not retain
        if p1 - p0 == 1:  # the common case on CPUs (see [Planning coupled chunks]): kept lean
            c, r = divmod(p0, rows)
            ji, ri = members[c], r
            cot = y.new_zeros((n, rows))
            cot[ji, r] = 1
            gs = _autograd.grad(yf, prims, cot, retain_graph=create or not last, create_graph=create,
                                     allow_unused=True)
            gs = [None if g is None else g.unsqueeze(0).expand(len(ji), *g.shape) if d is None else g.movedim(d, 0)[ji]
                  for g, d in zip(gs, dims)]
        else:
            block = [divmod(q, rows) for q in range(p0, p1)]
            ji = torch.cat([members[c] for c, _ in block])
            pi = torch.cat([torch.full_like(members[c], j) for j, (c, _) in enumerate(block)])
            ri = torch.cat([torch.full_like(members[c], r) for c, r in block])
            cot = y.new_zeros((p1 - p0, n, rows)).index_put_((pi, ji, ri), y.new_ones(()))
            try:
                gs = _vjp_block(yf, prims, cot, create, last=last)
            except RuntimeError:
                step = 1  # no batching rule for some backward: the loop (see extract_reverse)
                continue
            gs = [None if g is None else g[pi] if d is None else g.movedim(1 + d, 1)[pi, ji] for g, d in zip(gs, dims)]
        for k, vals in enumerate(gs):  # vals: (members of the block, *in), each sample its own slice
            if vals is None:
                continue  # this input does not reach y: its rows stay zero
            if create:
                pieces[k].append((ji, torch.full_like(ji, ri) if isinstance(ri, int) else ri, vals))
            else:
                jacs[k][ji, ri] = vals  # (cast to the output dtype by the copy)
        done += 1
        if on_call is not None:
            on_call(p1 - p0)
        p0 = p1
    if create:
        for k, p in enumerate(pieces):
            if p:
                idx = (torch.cat([t[0] for t in p]), torch.cat([t[1] for t in p]))
                jacs[k] = jacs[k].index_put(idx, torch.cat([t[2] for t in p]).to(y.dtype))
    return jacs


def _vjp_block(yf, prims, cot, create, last):
    k = cot.shape[0]
    if k == 1:
        gs = _autograd.grad(yf, prims, cot[0], retain_graph=create or not last, create_graph=create,
                                 allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in gs]
    # retain_graph even on the last block: if the batched call fails we fall back to the loop.
    return _autograd.grad(yf, prims, cot, retain_graph=True, create_graph=create, allow_unused=True,
                               is_grads_batched=True)


def _forward(spec: Spec, plan: Plan, args: list, n: int, k: int, colours, calls):
    t = spec.targets[k]
    create = spec.create_graph
    load_forward_decompositions()
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
    modules = reached_modules(spec)
    keep = spec.return_outputs

    def g(v):
        a = list(args)
        params = own_buffers(spec)
        if t.kind == "input":
            a[t.index] = v
        else:
            params[t.name] = v
        with shielded(modules):  # stand-ins made inside the transform (see shielded)
            out = call(spec, a, params)
        y = select(spec, out, n)
        if not keep:
            return y, ()
        tensors, rebuild = split_tensors(out)
        if not rebuild_box:
            rebuild_box.append(rebuild)
        return y, tensors

    def one(tangent):
        if not keep:  # (fn's outputs are not asked for: no auxiliary outputs through the transform)
            y, tan = jvp(lambda v: g(v)[0], (x,), (tangent,))
            return tan, (y, ())
        y, tan, aux = jvp(g, (x,), (tangent,), has_aux=True)
        return tan, (y, aux)

    def single(tangent):
        try:
            return one(tangent)
        except RuntimeError as e:
            raise forward_refused(e, shared=d is None) from e

    m = t.numel
    if d is None:
        colours = None  # one JVP of a shared tensor gives every sample's column at once
    k_col = 1 if colours is None else int(colours.max()) + 1
    pairs = k_col * m
    cols = []
    y = aux = None
    # One-hot tangents are made per call: an eye(m) of a layer's weight (m = 200,704) would take 161 GB.
    if colours is not None:
        colours = colours.to(x.device)
    step = plan.cols_per_jvp
    c0 = done = 0
    while c0 < pairs and (calls is None or done < calls):
        c1 = min(c0 + step, pairs)
        pair = torch.arange(c0, c1, device=x.device)
        c, col = pair // m, pair % m
        if m == 1:  # (a scalar target, seed 000's C: no one-hot to scatter)
            tangents = torch.ones((c1 - c0, *t.shape), dtype=x.dtype, device=x.device)
        else:
            tangents = torch.zeros((c1 - c0, m), dtype=x.dtype, device=x.device)
            tangents[torch.arange(c1 - c0, device=x.device), col] = 1
            tangents = tangents.reshape(c1 - c0, *t.shape)
        if d is not None:  # e_col on the samples of colour c (all samples: broadcast)
            tangents = tangents.unsqueeze(1 + d)
            if colours is None:
                tangents = tangents.expand(c1 - c0, *x.shape)
            else:
                mask = (colours[None, :] == c[:, None]).to(x.dtype)  # (pairs, n)
                tangents = tangents * mask.reshape(c1 - c0, *[n if a == d else 1 for a in range(x.dim())])
        if c1 - c0 == 1:
            tan, (y, aux) = single(tangents[0])
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
        if colours is None:
            cols.append(tan)  # (pairs, n, *out)
        else:
            pi, ji = (colours[None, :] == c[:, None]).nonzero(as_tuple=True)
            cols.append((ji, col[pi], tan[pi, ji]))  # each sample keeps its own column
        done += 1
        c0 = c1
    if y is None:  # a target with no elements
        y, aux = g(x)
    _check_shape(plan, y)
    if colours is None:
        j = cols[0] if len(cols) == 1 else torch.cat(cols, 0) if cols else y.new_zeros((0, *y.shape))
        if j.shape[0] < m:  # stopped early (a measurement)
            j = torch.cat([j, j.new_zeros((m - j.shape[0], *j.shape[1:]))])
        j = j.movedim(0, -1)
    else:
        ji = torch.cat([t_[0] for t_ in cols])
        ci = torch.cat([t_[1] for t_ in cols])
        vals = torch.cat([t_[2] for t_ in cols]).reshape(len(ji), -1)  # (pairs kept, n_out)
        j = torch.zeros((n, m, vals.shape[1]), dtype=vals.dtype, device=vals.device).index_put((ji, ci), vals)
        j = j.movedim(1, -1)
    j = j.reshape(n, *plan.out_shape, *t.shape)
    return j, rebuild_box[0](aux) if keep else None


def forward_refused(e: RuntimeError, shared: bool = False) -> RuntimeError:
    """torch.func.jvp's failure, said in fn's terms; out-of-memory errors pass through for back-off.
    ``shared``: the target is a shared tensor, for which reverse mode is no way out."""
    if is_out_of_memory(e) or isinstance(e, RandomFunctionError):
        return e
    cause = e.__cause__ if isinstance(e, FnError) and e.__cause__ is not None else e
    text = str(cause).strip()
    why = text.splitlines()[0] if text else type(cause).__name__
    hint = ""
    if "mutate" in why or "in-place" in why or "inplace" in why:
        hint = (" fn updates a tensor in place during its forward pass (BatchNorm running statistics in "
                "training mode?), which torch.func.jvp cannot trace.")
    if shared:
        return RuntimeError(
            f"chunkjac: forward mode cannot run fn ({why}).{hint} Pass mode='reverse': per-sample derivatives "
            "w.r.t. a shared tensor by reverse mode, per sample (torch.func.vmap) or with a product per (sample, "
            "output element) of the whole batch where that cannot run.")
    return RuntimeError(f"chunkjac: forward mode cannot run fn ({why}).{hint} Pass mode='reverse'.")


