"""Cross-check of forward-mode derivatives against reverse mode on the probe samples.

# NOTE: [Why forward mode is cross-checked]
# PyTorch's forward-mode formulas drop tangents silently where reverse mode refuses: e.g. eval-mode
# BatchNorm w.r.t. its running_mean gives a zero JVP, while autograd.grad raises "not differentiable
# with respect to argument 'running_mean'". Before a forward-mode plan runs over the batch, the plan's
# own strategy computes the Jacobians of the first few samples and each is compared, projected on a
# random cotangent, with a reverse-mode VJP of the same samples. A disagreement, or a reverse mode
# that refuses, stops the call with an error instead of returning a wrong answer. Cost: one strategy
# call and at most two VJPs on two samples.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import _autograd
from ._errors import ForwardModeMismatch
from ._function import call, chunk_args, own_buffers, preserved_buffers, reached_modules, select, shielded, working_dtypes
from ._plan import Plan
from ._probe import PROBE_SIZES
from ._spec import Spec
from ._strategies import STRATEGIES
from ._function import load_forward_decompositions
from ._strategies.coloured import forward_refused

_RTOL = {torch.float64: 1e-7, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def forward_mode_verdict(spec: Spec, plan: Plan) -> ForwardModeMismatch | None:
    """The cross-check of a plan's forward-mode targets (first derivatives): None, or the disagreement."""
    if "forward" not in plan.modes or plan.part is not None:
        return None
    try:
        check_forward_mode(spec, plan)
    except ForwardModeMismatch as e:
        return e
    return None


def check_forward_mode(spec: Spec, plan: Plan) -> None:
    ks = [k for k, m in enumerate(plan.modes) if m == "forward"]
    if not ks:
        return
    if plan.coupling is not None:
        _check_coupled(spec, plan, ks)
        return
    n = min(spec.batch_size, PROBE_SIZES[0])
    quiet = dataclasses.replace(spec, create_graph=False, return_outputs=False)
    probe_plan = dataclasses.replace(plan, batch_size=n, chunk_size=n)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn((n, *plan.out_shape), generator=gen, dtype=torch.float64).to(plan.device, plan.dtype)
    found = []
    with preserved_buffers(spec.fn):
        jacs, _ = STRATEGIES[plan.strategy](quiet, probe_plan, chunk_args(spec, 0, n), n)
        for k in ks:
            t = spec.targets[k]
            j = jacs[k].reshape(n, u[0].numel(), t.numel)
            ours = (u.reshape(n, -1, 1) * j).sum(1)
            ref = _reverse_projection(spec, t, u, n).reshape(n, t.numel).to(ours.dtype)
            finite = ours.isfinite() & ref.isfinite()
            same_nonfinite = torch.equal(ours[~finite].nan_to_num(), ref[~finite].nan_to_num()) and \
                torch.equal(finite, ours.isfinite())
            err = (ours - ref)[finite].abs().max().item() if finite.any() else 0.0
            scale = max(ours[finite].abs().max().item() if finite.any() else 0.0,
                        ref[finite].abs().max().item() if finite.any() else 0.0, 1e-30)
            found.append((t, same_nonfinite, err, scale))
    # Held to the largest scale among the targets too (see _check_coupled).
    floor = max((f[3] for f in found), default=0.0)
    for t, same_nonfinite, err, scale in found:
        if not same_nonfinite or err > _tolerance(spec, plan) * max(scale, floor):
            raise ForwardModeMismatch(
                f"chunkjac: forward-mode and reverse-mode derivatives of fn w.r.t. {t.label} disagree on "
                f"the first {n} samples (max difference {err:.3g}, scale {max(scale, floor):.3g}): an operator in fn "
                "has a missing or wrong forward-mode formula, or fn is not deterministic. "
                "Pass mode='reverse'" + ("." if t.batched else " (per-sample reverse mode)."), batched=t.batched)


def _tolerance(spec: Spec, plan: Plan) -> float:
    """The loosest of the dtypes in play: a float32 model with a float64 output computes in float32."""
    return max(_RTOL.get(d, 1e-4) for d in working_dtypes(spec, plan.dtype))


def _reverse_projection(spec: Spec, t, u: torch.Tensor, n: int) -> torch.Tensor:
    """Rows u_i^T J_i for the first n samples, by reverse mode: (n, *t.shape)."""
    args = chunk_args(spec, 0, n)
    params = None
    if t.kind == "input":
        v = args[t.index] = args[t.index].detach().requires_grad_(True)
    else:
        v = spec.param(t.name).detach().requires_grad_(True)
        params = {t.name: v}
    try:
        with torch.enable_grad():
            y = select(spec, call(spec, args, params), n)
            if not y.requires_grad:
                return torch.zeros((n, *t.shape), dtype=u.dtype, device=u.device)
            if t.batched:  # independent samples: one VJP gives every sample's row (the sum trick)
                (g,) = _autograd.grad(y, v, u, allow_unused=True)
                g = torch.zeros_like(v) if g is None else g
                return g.movedim(spec.in_dims[t.index], 0)
            rows = []
            for i in range(n):
                (g,) = _autograd.grad(y[i], v, u[i], retain_graph=i < n - 1, allow_unused=True)
                rows.append(torch.zeros_like(v) if g is None else g)
            return torch.stack(rows)
    except RuntimeError as e:
        raise ValueError(
            f"chunkjac: fn is not differentiable w.r.t. {t.label}: reverse mode refuses it ({e}), and "
            "forward mode would return zeros without saying so. Differentiate another input or "
            "parameter.") from None


def _check_coupled(spec: Spec, plan: Plan, ks: list[int]) -> None:
    """Coupled samples: u . (J v) against (J^T u) . v on the first coupled chunk, for random u and v
    (one JVP and one VJP over the chunk), since per-sample rows cannot be compared independently."""
    n = plan.chunk_at(0)[1]
    gen = torch.Generator().manual_seed(0)
    args = chunk_args(spec, 0, n)
    modules = reached_modules(spec)
    found = []
    with preserved_buffers(spec.fn):
        for k in ks:
            t = spec.targets[k]
            if t.kind == "input":
                x = args[t.index].detach()
            else:
                x = spec.param(t.name).detach()
            v = torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.device, x.dtype)

            def g(z, t=t):
                a, params = list(args), own_buffers(spec)
                if t.kind == "input":
                    a[t.index] = z
                else:
                    params[t.name] = z
                with shielded(modules):
                    return select(spec, call(spec, a, params), n)

            try:
                load_forward_decompositions()
                with torch.no_grad():
                    _, jv = torch.func.jvp(g, (x,), (v,))
            except RuntimeError as e:
                raise forward_refused(e, shared=not t.batched) from e
            u = torch.randn(jv.shape, generator=gen, dtype=torch.float64).to(jv.device, jv.dtype)
            try:
                z = x.clone().requires_grad_(True)
                with torch.enable_grad():
                    y = g(z)
                    (gu,) = _autograd.grad(y, z, u, allow_unused=True) if y.requires_grad else (None,)
            except RuntimeError as e:
                raise ValueError(
                    f"chunkjac: fn is not differentiable w.r.t. {t.label}: reverse mode refuses it ({e}), and "
                    "forward mode would return zeros without saying so.") from None
            gu = torch.zeros_like(x) if gu is None else gu
            a = (u.double() * jv.double()).sum().item()
            b = (gu.double() * v.double()).sum().item()
            scale = max((u.double() * jv.double()).abs().sum().item(), (gu.double() * v.double()).abs().sum().item(),
                        1e-30)
            found.append((t, a, b, scale))
    # Held to the largest scale among the targets too: a target whose derivative is zero (a bias that
    # BatchNorm removes) gives two rounding residues of 1e-16 that no relative test should compare;
    # a target whose derivative is below tol x the largest one is therefore not checked.
    floor = max((f[3] for f in found), default=0.0)
    for t, a, b, scale in found:
        if abs(a - b) > _tolerance(spec, plan) * max(scale, floor) or a != a or b != b:
            raise ForwardModeMismatch(
                f"chunkjac: forward-mode and reverse-mode derivatives of fn w.r.t. {t.label} disagree on the "
                f"first coupled chunk ({n} samples; u.Jv = {a:.6g}, J^T u.v = {b:.6g}, scale {max(scale, floor):.3g}): "
                "an operator in fn has a missing or wrong forward-mode formula. Pass mode='reverse'"
                + ("." if t.batched else " (a product per (sample, output element) of the whole batch)."),
                batched=t.batched)


# NOTE: [Why Taylor mode is cross-checked]
# Taylor mode's exact rules are checked by the tests, but its generic rule runs PyTorch's forward-
# over-forward derivatives of whatever op it meets, and some are wrong: native layer_norm's (which
# chunkjac therefore takes through its definition), linalg.solve's and det's second derivatives
# (measured against finite differences and vmap(hessian)). And fn may hide a path from
# __torch_function__ (TorchScript, a custom autograd.Function whose backward is not its forward's
# derivative). So before a Taylor plan runs over the batch, its results on the first few samples
# (one colour group of the first chunk, when coupled) are compared with reverse over reverse, the
# seed's grad-of-grad, on the same samples. A disagreement, or a refusal, sends the call to reverse
# over reverse (or, with mode="forward", stops it). Cost: both strategies on two samples.

def check_second_order(spec: Spec, plan: Plan) -> str | None:
    """None when Taylor mode agrees with reverse over reverse on the check's samples; else why not.
    Independent samples: windows of two at the start, middle and end of the batch (as the coupling
    check, see _detect: a data-dependent branch taken only by later samples may still show)."""
    from ._strategies import double_backward, taylor
    from ._taylor import TaylorRefused
    if plan.strategy != "taylor":
        return None
    if plan.coupling is None:
        n = min(spec.batch_size, PROBE_SIZES[0])
        b = spec.batch_size
        windows = sorted({(s0, min(s0 + n, b)) for s0 in (0, max(0, b // 2 - n // 2), max(0, b - n))})
    else:
        windows = [(0, plan.chunk_at(0)[1])]
    quiet = dataclasses.replace(spec, create_graph=False, return_outputs=False)
    with preserved_buffers(spec.fn):
        for start, stop in windows:
            n = stop - start
            colours = None if plan.coupling is None else _some_groups(plan.colours_at(start, stop))
            small = dataclasses.replace(plan, batch_size=n, chunk_size=n, rows_per_vjp=spec.targets[0].numel)
            try:
                ours, _ = taylor.run_strict(quiet, small, chunk_args(spec, start, stop), n, colours, None)
            except TaylorRefused as e:
                return str(e)
            rows, dims = math.prod(plan.out_shape), spec.targets[0].numel
            compared = rows
            try:
                if plan.part.reverse_name == "directional" or rows * (1 + dims) <= FULL_CHECK_VJPS:
                    ref, _ = double_backward.run_chunk(quiet, small, chunk_args(spec, start, stop), n, colours, None)
                else:  # many outputs and inputs (a 3-d convolution): the Hessians projected on random outputs
                    u = torch.randn((PROJECTIONS, n, rows), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.float64).to(plan.device, plan.dtype)
                    ref = _projected_reverse(quiet, chunk_args(spec, start, stop), n, u, colours, plan.part.name)
                    ours = _projected(ours, u, n, rows, plan.part.name)
                    compared = PROJECTIONS
            except Exception:  # noqa: BLE001 - no double backward here: nothing to check against
                return None
            if colours is not None:  # the groups both computed
                kept = colours >= 0
                ours = [o[kept] for o in ours]
                ref = [r[kept] for r in ref]
            why = _second_order_difference(spec, plan, ours, ref, compared)
            if why is not None:
                return f"{why} on samples {start}..{stop - 1}"
    return None


FULL_CHECK_VJPS = 512  # above: projections (a 3-d convolution's 128 x 129 VJPs took minutes)
PROJECTIONS = 3


def _projected(results: list, u: torch.Tensor, n: int, rows: int, part: str) -> list:
    """Taylor mode's part and Jacobian, projected: sum_o u[p, i, o] R[i, o, ...] for each projection p,
    as (n, PROJECTIONS, ...) (the sample first, as the comparison expects)."""
    out = []
    for r in results:
        r = r.reshape(n, rows, -1).to(u.dtype)
        out.append(torch.einsum("pno,nok->npk", u, r))
    return out


def _projected_reverse(spec: Spec, args: list, n: int, u: torch.Tensor, colours, part: str) -> list:
    """Reverse over reverse for sum_o u[p, i, o] y[i, o]: 1 + D VJPs per projection, whatever the
    number of outputs. Returns the part (and Jacobian) as _projected lays them out."""
    t = spec.targets[0]
    i, dim, dims = t.index, spec.in_dims[t.index], t.numel
    mask = None if colours is None else (colours >= 0).to(u.device, u.dtype)
    parts, jacs = [], []
    with torch.enable_grad():
        x = args[i].detach().requires_grad_(True)
        a = list(args)
        a[i] = x
        y = select(spec, call(spec, a), n).reshape(n, -1)
        for p in range(u.shape[0]):
            w = u[p] if mask is None else u[p] * mask[:, None]
            (g,) = _autograd.grad((y * w).sum(), x, create_graph=True, allow_unused=True)
            g = torch.zeros_like(x) if g is None else g
            gf = g.movedim(dim, 0).reshape(n, dims)
            h = torch.zeros((n, dims, dims), dtype=gf.dtype, device=gf.device)
            if gf.requires_grad:
                for k in range(dims):
                    cot = torch.zeros_like(gf)
                    cot[:, k] = 1 if mask is None else mask
                    (row,) = _autograd.grad(gf, x, cot, retain_graph=True, allow_unused=True)
                    if row is not None:
                        h[:, k] = row.movedim(dim, 0).reshape(n, dims)
            second = {"laplacian": lambda: h.diagonal(dim1=1, dim2=2).sum(-1, keepdim=True),
                      "diagonal": lambda: h.diagonal(dim1=1, dim2=2), "full": lambda: h.reshape(n, -1)}[part]()
            parts.append(second.detach())
            jacs.append(gf.detach())
    res = [torch.stack(parts, 1)]
    if spec.return_jacobian:
        res.append(torch.stack(jacs, 1))
    return res


def _some_groups(colours: torch.Tensor | None, k: int = 3) -> torch.Tensor | None:
    """Colours with all but k groups (the first, a middle and the last colour) set to -1 (left out): each
    group costs a pass over the whole coupled chunk."""
    if colours is None:
        return None
    ids = torch.unique(colours).tolist()
    keep = {ids[0], ids[len(ids) // 2], ids[-1]} if len(ids) > k else set(ids)
    return torch.where(torch.isin(colours, torch.tensor(sorted(keep), dtype=colours.dtype)), colours,
                       torch.full_like(colours, -1))


def _second_order_difference(spec: Spec, plan: Plan, ours: list, ref: list, rows: int) -> str | None:
    """Compared per output element (over the samples and derivative entries): one output a million
    times smaller than another is held to its own scale, not drowned in the other's."""
    tol = 10 * _tolerance(spec, plan)  # two routes to a second derivative round differently
    for a, b in zip(ours, ref):
        if a.numel() == 0:
            continue
        a, b = a.double(), b.to(a.device).double()
        if not torch.equal(a.isfinite(), b.isfinite()):
            return "Taylor mode and reverse over reverse disagree on which entries are finite"
        n = a.shape[0]
        per = rows if (a.numel() // max(n, 1)) % max(rows, 1) == 0 else 1  # a divergence: one number per sample
        a, b = a.reshape(n, per, -1).nan_to_num(0, 0, 0), b.reshape(n, per, -1).nan_to_num(0, 0, 0)
        err = (a - b).abs().amax(dim=(0, 2))
        scale = torch.maximum(a.abs().amax(dim=(0, 2)), b.abs().amax(dim=(0, 2))).clamp_min(1e-30)
        bad = err > tol * scale
        if bad.any():
            r = int(bad.nonzero()[0])
            return (f"Taylor mode and reverse over reverse differ by {err[r].item():.3g} (scale {scale[r].item():.3g}) "
                    f"at output element {r}")
    return None


# NOTE: [Why create_graph is checked one order higher]
# With create_graph=True the second derivatives are differentiated again (a PINN's loss on u_xx is
# differentiated w.r.t. the parameters), so the route that computed them must also be right one
# order higher. Reverse over reverse then runs PyTorch's third derivatives, and some are wrong:
# native layer_norm's (measured: the gradient of a Laplacian of Linear -> LayerNorm -> Linear off by
# 13-115%), while Taylor mode, one order lower (first-order reverse over its forward pass, with
# layer_norm by its definition), is exact; the second-order cross-check, which compares values,
# cannot see this. So a create_graph plan is checked on its first samples: the derivative of a random
# projection of its results along a random direction of the input and of every parameter, by
# autograd through the route, against central finite differences of the route's values, in float64
# (fn's tensors swapped for float64 copies, as the coupling check does) where fn allows. A route
# that fails is replaced by the other one where that passes; if neither does, the call is refused.
# Cost: one create_graph pass and its backward, and two passes, on two samples.
HIGHER_RTOL = {torch.float64: 1e-5, torch.float32: 2e-2, torch.float16: 2e-1, torch.bfloat16: 2e-1}


def check_higher_order(spec: Spec, plan: Plan) -> str | None:
    """None when differentiating ``plan``'s second derivatives again is right on the first samples
    (see [Why create_graph is checked one order higher]); else what was found."""
    from ._detect import _float64
    if plan.part is None or not spec.create_graph or not spec.targets[0].numel:
        return None
    n = min(spec.batch_size, PROBE_SIZES[0]) if plan.coupling is None else plan.chunk_at(0)[1]
    colours = None if plan.coupling is None else _some_groups(plan.colours_at(0, n))
    with preserved_buffers(spec.fn):
        if plan.dtype != torch.float64:
            try:
                with _float64(spec):
                    return _higher_difference(spec, plan, n, colours, True)
            except Exception:  # noqa: BLE001 - fn does not run in float64: in its own precision
                pass
        return _higher_difference(spec, plan, n, colours, False)


def _higher_difference(spec: Spec, plan: Plan, n: int, colours, wide: bool) -> str | None:
    t = spec.targets[0]
    i = t.index
    args = chunk_args(spec, 0, n)
    if wide:
        args = [v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in args]
    x0 = args[i].detach()
    seen, params = set(), []
    for m in reached_modules(spec):
        for p in m._parameters.values():
            if p is not None and p.requires_grad and p.is_floating_point() and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    small = dataclasses.replace(plan, batch_size=n, chunk_size=n, dtype=x0.dtype)
    run = STRATEGIES[plan.strategy]
    gen = torch.Generator().manual_seed(0)

    def randn(like):
        return torch.randn(like.shape, generator=gen, dtype=torch.float64).to(like.device, like.dtype)

    def project(result, w) -> torch.Tensor:
        kept = result if colours is None else result[colours >= 0]
        return (kept * (w if colours is None else w[colours >= 0])).sum()

    graph = dataclasses.replace(spec, create_graph=True, return_outputs=False, return_jacobian=False)
    x = x0.clone().requires_grad_(True)
    a = list(args)
    a[i] = x
    with torch.enable_grad():
        res = run(graph, small, a, n, colours)[0][0]
        w = randn(res)
        s = project(res, w)
        if not s.requires_grad:
            return None
        grads = _autograd.grad(s, [x, *params], allow_unused=True)
    v = [randn(x0)] + [randn(p) * (p.detach().abs().mean() + 1e-3) for p in params]
    analytic = sum(float((g.double() * d.double()).sum()) for g, d in zip(grads, v) if g is not None)
    magnitude = sum(float((g.double() * d.double()).abs().sum()) for g, d in zip(grads, v) if g is not None)
    h = 1e-4 if x0.dtype == torch.float64 else 1e-2
    quiet = dataclasses.replace(graph, create_graph=False)
    saved = [p.detach().clone() for p in params]

    def at(step: float) -> float:
        with torch.no_grad():
            for p, p0, d in zip(params, saved, v[1:]):
                p.copy_(p0 + step * d)
            b = list(args)
            b[i] = x0 + step * v[0]
        try:
            return float(project(run(quiet, small, b, n, colours)[0][0], w))
        finally:
            with torch.no_grad():
                for p, p0 in zip(params, saved):
                    p.copy_(p0)

    numeric = (at(h) - at(-h)) / (2 * h)
    scale = max(abs(analytic), abs(numeric), magnitude, 1e-30)
    if abs(analytic - numeric) > HIGHER_RTOL.get(x0.dtype, 2e-2) * scale:
        return (f"the derivative of its second derivatives (create_graph=True) is {analytic:.6g} along a random "
                f"direction of the input and the parameters, where finite differences give {numeric:.6g}")
    return None
