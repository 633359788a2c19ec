"""A declared coupling (group ids, a graph) checked before it is trusted.

# NOTE: [Checking a declared coupling]
# A coupling the user declares says which samples may interact; chunkjac then runs chunks of whole
# sets and extracts each sample's block with one product per (colour, row): samples of one colour
# share a product (see [Colouring] in _coupling). Both steps are exact only if the declaration is:
#  1. No two samples of one colour interact: a product on colour k carries e_r on every member of k,
#     and sample j keeps its slice, which holds the derivatives of every member's output w.r.t. x_j.
#  2. No sample interacts across a chunk boundary: a chunk runs fn on its samples alone.
# Users get this wrong in ordinary ways (group ids finer than the real groups; a graph's one-hop
# edge_index for a network of two message-passing layers, whose outputs depend on two-hop
# neighbours), and the answer would be silently wrong. So before a declared coupling runs:
#  1. On the chunks the plan will run (first, middle and last; one when the batch is one chunk), one
#     forward and, per colour, 1 + ceil(log2 members) VJPs with random cotangents: u on the members
#     of the colour, and u restricted to the members whose rank has bit b set. If members do not
#     interact, the second gradient vanishes on the members without bit b, and the difference on
#     those with it; any interacting pair differs in some bit (the coupling check's test, see
#     [What the coupling check checks] in _detect, restricted to the pairs the declaration says
#     cannot interact).
#  2. Around the plan's chunk boundaries (first, middle, last), a window of whole sets on both
#     sides: fn on each side alone gives the outputs fn gives on the window, and a random cotangent
#     on one side has no gradient on the other.
# In float64 where fn allows it (float copies of the modules' tensors, as the coupling check), so
# that rounding is not taken for interaction; tolerances as the coupling check's. A failure is a
# CouplingError naming the sample; for a graph, the k-hop structure (k = 2, 3, 4) is tried in
# its place and the error names the first k that passes. Cost: once per remembered decision, about
# one forward and (colours x (1 + log2 of the chunk)) VJP rows per chunk checked, plus 3 forwards
# and 2 VJPs per boundary. ``check_coupling=False`` skips it.
"""
from __future__ import annotations

import contextlib
import warnings

import numpy as np
import torch

from ._coupling import Coupling, graph, log2_ceil
from ._detect import RTOL, _float64, _tol, _vjps
from ._errors import CouplingError
from ._function import call, chunk_args, preserved_buffers, select, working_dtypes
from ._spec import Spec

BOUNDARY_SIDE = 64  # samples on each side of a chunk boundary, rounded out to whole sets
WINDOW = 4096       # samples of whole sets a chunk is checked on (see _windows)
ROWS_BYTES = 1 << 26  # gradients of one batched call of the check's VJPs at most
MAX_HOPS = 4


def check(spec: Spec, plan) -> None:
    """Raises CouplingError when the declared coupling (``plan.coupling``, of kind "groups" or
    "graph") misses interactions; see [Checking a declared coupling]."""
    c = plan.coupling
    wrt = [t for t in spec.targets if t.batched and t.numel]
    if c is None or c.kind not in ("groups", "graph") or not wrt:
        return
    floor = max(RTOL.get(d, 1e-5) for d in working_dtypes(spec, torch.float64))
    with preserved_buffers(spec.fn):
        found = _run(spec, plan, c, floor)
        if found is None:
            return
        what = "group ids" if c.kind == "groups" else "graph"
        if c.kind == "graph" and c.edges is not None:
            for k in range(2, MAX_HOPS + 1):
                wider = graph(hops(c.edges, k, num_nodes=spec.batch_size), spec.batch_size)
                if _run(spec, plan, wider, floor) is None:
                    raise CouplingError(
                        f"chunkjac: the declared coupling misses interactions: {found}. The outputs depend on "
                        f"{k}-hop neighbours (a network of {k} message-passing layers?), and the graph names only "
                        f"1-hop ones, so the answer would be wrong. Pass coupling=chunkjac.hops(edge_index, {k}), "
                        "or check_coupling=False if you know better.")
            raise CouplingError(
                f"chunkjac: the declared coupling misses interactions: {found}; no k-hop structure of the graph up "
                f"to k = {MAX_HOPS} covers them (samples interact that the graph does not connect). Pass the edges "
                "of every interaction, coupling='coupled' (exact for any interaction), or check_coupling=False if "
                "you know better.")
        raise CouplingError(
            f"chunkjac: the declared coupling misses interactions: {found}, which the {what} keep apart, so the "
            "answer would be wrong. Pass group ids of the groups that really interact (coarser ones), "
            "coupling='coupled' (exact for any interaction), or check_coupling=False if you know better.")


def hops(edge_index, k: int, *, num_nodes: int | None = None) -> torch.Tensor:
    """The (2, E') edge index of paths of 1 to ``k`` edges in ``edge_index`` (2, E): what a network of
    k message-passing layers over that graph may depend on. Pass it as ``coupling=``."""
    e = torch.as_tensor(edge_index).to("cpu", torch.long)
    if e.dim() != 2 or e.shape[0] != 2:
        raise ValueError(f"chunkjac: hops takes a (2, E) edge index, got shape {tuple(e.shape)}.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"chunkjac: hops takes k >= 1 (the number of hops), got {k!r}.")
    n = num_nodes if num_nodes is not None else (int(e.max()) + 1 if e.numel() else 0)
    if n == 0:
        return e
    # Reachability in at most k steps, by sparse products of boolean matrices (edge j -> i: y_i <- x_j).
    a = torch.sparse_coo_tensor(e, torch.ones(e.shape[1]), (n, n)).coalesce()
    a = torch.sparse_coo_tensor(a.indices(), torch.ones(a.indices().shape[1]), (n, n)).coalesce()
    eye = torch.sparse_coo_tensor(torch.arange(n).repeat(2, 1), torch.ones(n), (n, n))
    step = (a + eye).coalesce()
    reach = step
    for _ in range(k - 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta": used internally by mm
            reach = torch.sparse.mm(reach, step).coalesce()
        reach = torch.sparse_coo_tensor(reach.indices(), torch.ones(reach.indices().shape[1]), (n, n)).coalesce()
    idx = reach.indices()
    return idx[:, idx[0] != idx[1]]


def _run(spec: Spec, plan, c: Coupling, floor: float) -> str | None:
    """What the check finds with coupling ``c`` (the plan's chunks, ``c``'s colours), or None."""
    chunks = []
    start = 0
    while start < plan.batch_size:
        chunks.append(plan.chunk_at(start))
        start = chunks[-1][1]
    for a, b in _first_middle_last(chunks):
        for wa, wb in _windows(c, a, b):
            found = _within(spec, wa, wb, None if c.colours is None else c.colours[wa:wb], floor)
            if found:
                return found
    for s in _first_middle_last([b for _, b in chunks[:-1]]):
        found = _across(spec, c, s, floor)
        if found:
            return found
    return None


def _windows(c: Coupling, a: int, b: int) -> list[tuple[int, int]]:
    """The chunk [a, b), or where it holds many sets, windows of whole sets of about WINDOW samples at
    its start, middle and end (a chunk of 10^5 samples in groups of 32 is checked on 3 x 4,096)."""
    if b - a <= WINDOW or c.bounds is None:
        return [(a, b)] if b - a <= WINDOW or c.bounds is not None else \
            sorted({(s, s + WINDOW) for s in (a, (a + b - WINDOW) // 2, b - WINDOW)})
    out = set()
    for start in (a, (a + b - WINDOW) // 2, b - WINDOW):
        lo = int(c.bounds[np.searchsorted(c.bounds, start, side="right") - 1])
        lo = max(lo, a)
        out.add((lo, min(c.stop(lo, WINDOW), b)))
    return sorted(out)


def _first_middle_last(items: list) -> list:
    return [items[k] for k in sorted({0, len(items) // 2, len(items) - 1})] if items else []


def _wide(spec: Spec, floor: float):
    """float64 where fn allows (see the NOTE); (context, wide)."""
    return (_float64(spec), True) if floor > RTOL[torch.float64] else (contextlib.nullcontext(), False)


def _forward(spec: Spec, a: int, b: int, wide: bool, grad: bool = True):
    """fn on samples [a, b) (in float64 if ``wide``), the batched wrt inputs requiring grad:
    (output, [(input, its batch dim)])."""
    args = chunk_args(spec, a, b)
    if wide:
        args = [v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in args]
    prims = []
    for t in spec.targets:
        if t.batched and t.numel and grad:
            args[t.index] = args[t.index].detach().requires_grad_(True)
            prims.append((args[t.index], spec.in_dims[t.index]))
    with torch.enable_grad():
        y = select(spec, call(spec, args), b - a)
    if wide and y.dtype != torch.float64:
        raise TypeError("fn does not compute in float64")  # the check runs in fn's own precision instead
    return y, prims


def _within(spec: Spec, a: int, b: int, colours, floor: float) -> str:
    """Step 1 of the NOTE on samples [a, b): members of a colour must not interact."""
    n = b - a
    if n < 2:
        return ""
    colours = torch.zeros(n, dtype=torch.long) if colours is None else torch.unique(colours, return_inverse=True)[1]
    for attempt in (True, False) if floor > RTOL[torch.float64] else (False,):
        try:
            ctx, wide = _wide(spec, floor) if attempt else (contextlib.nullcontext(), False)
            with ctx:
                return _leaks(spec, a, b, colours, floor, wide)
        except CouplingError:
            raise
        except Exception:  # noqa: BLE001 - float64 impossible here: in fn's own precision
            if not attempt:
                raise
    return ""


def _leaks(spec: Spec, a: int, b: int, colours: torch.Tensor, floor: float, wide: bool) -> str:
    n = b - a
    y, prims = _forward(spec, a, b, wide)
    if not y.requires_grad or not prims:
        return ""
    dev = y.device
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dev, y.dtype)
    colours = colours.to(dev)
    k_col = int(colours.max()) + 1
    rank = torch.empty(n, dtype=torch.long, device=dev)
    sets = []  # (colour mask, subset mask or None for the whole colour)
    for k in range(k_col):
        members = (colours == k).nonzero().flatten()
        if len(members) < 2:
            continue
        rank[members] = torch.arange(len(members), device=dev)
        whole = colours == k
        sets.append((k, whole, None))
        for bit in range(log2_ceil(len(members))):
            sets.append((k, whole, whole & (((rank >> bit) & 1) == 1)))
    if not sets:
        return ""
    masks = [(m if s is None else s).reshape(n, *[1] * (y.dim() - 1)).to(y.dtype) for _, m, s in sets]
    per_row = max(1, sum(x.numel() for x, _ in prims) * y.element_size())
    block = max(1, min(len(sets), ROWS_BYTES // per_row))  # rows per call: bounded memory
    grads = None
    for r0 in range(0, len(sets), block):
        part = _vjps(y, [p for p, _ in prims], torch.stack([u * m for m in masks[r0:r0 + block]]))
        grads = part if grads is None else [h if g is None else g if h is None else torch.cat([g, h])
                                            for g, h in zip(grads, part)]
    tol = _tol(y.dtype, floor, wide)
    for (x, d), g in zip(prims, grads):
        if g is None:
            continue
        g = g.movedim(1 + d, 1).reshape(len(sets), n, -1).to(torch.float64)
        g = torch.where(g.isfinite(), g, torch.zeros((), dtype=g.dtype, device=g.device))
        scale = g.abs().max().item()
        if scale == 0:
            continue
        full = {}
        for row, (k, whole, sub) in enumerate(sets):
            if sub is None:
                full[k] = g[row]
                continue
            # u on the members with the bit: nothing on the members without it; the rest (u on the
            # members without the bit) nothing on those with it.
            out_a = (g[row] * (whole & ~sub)[:, None]).abs().amax(1)
            out_b = ((full[k] - g[row]) * sub[:, None]).abs().amax(1)
            off = torch.maximum(out_a, out_b)
            if off.max().item() > tol * scale:
                j = a + int(off.argmax())
                return (f"the output of sample {j} depends on the input of another sample of its colour among "
                        f"samples [{a}, {b}) (relative size {off.max().item() / scale:.2g}, found by VJPs with random "
                        "cotangents)")
    return ""


def _across(spec: Spec, c: Coupling, s: int, floor: float) -> str:
    """Step 2 of the NOTE at the chunk boundary s: whole sets on both sides."""
    bounds = c.bounds if c.bounds is not None else np.arange(spec.batch_size + 1)
    k = int(np.searchsorted(bounds, s))
    lo = int(bounds[max(0, int(np.searchsorted(bounds, s - BOUNDARY_SIDE, side="right")) - 1)])
    hi = int(bounds[min(len(bounds) - 1, int(np.searchsorted(bounds, s + BOUNDARY_SIDE, side="left")))])
    lo, hi = min(lo, int(bounds[max(k - 1, 0)])), max(hi, int(bounds[min(k + 1, len(bounds) - 1)]))
    if not lo < s < hi:
        return ""
    for attempt in (True, False) if floor > RTOL[torch.float64] else (False,):
        try:
            ctx, wide = _wide(spec, floor) if attempt else (contextlib.nullcontext(), False)
            with ctx:
                return _boundary(spec, lo, s, hi, floor, wide)
        except CouplingError:
            raise
        except Exception:  # noqa: BLE001 - float64 impossible: in fn's own precision
            if not attempt:
                raise
    return ""


def _boundary(spec: Spec, lo: int, s: int, hi: int, floor: float, wide: bool) -> str:
    y, prims = _forward(spec, lo, hi, wide)
    tol = _tol(y.dtype, floor, wide)
    whole = y.detach().to(torch.float64)
    scale = max(whole[whole.isfinite()].abs().max().item() if whole.numel() else 0.0, 1e-30)
    for a, b in ((lo, s), (s, hi)):
        try:
            part = _forward(spec, a, b, wide, grad=False)[0].detach().to(torch.float64)
        except Exception as e:  # noqa: BLE001 - fn cannot run on a part the plan will run as a chunk
            return f"fn fails on samples [{a}, {b}) alone, a chunk the plan runs ({type(e).__name__})"
        ref = whole[a - lo:b - lo]
        if part.shape != ref.shape:
            return f"fn's output on samples [{a}, {b}) alone has another shape than on a window around them"
        ok = part.isfinite() & ref.isfinite()
        if ok.any() and (part - ref)[ok].abs().max().item() > tol * scale:
            return (f"the outputs of samples [{a}, {b}) change when the samples on the other side of sample {s} "
                    "are left out")
    if not y.requires_grad or not prims:
        return ""
    n = hi - lo
    left = (torch.arange(n, device=y.device) < s - lo)
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, y.dtype)
    side = left.reshape(n, *[1] * (y.dim() - 1)).to(y.dtype)
    grads = _vjps(y, [p for p, _ in prims], torch.stack([u * side, u * (1 - side)]))
    for (x, d), g in zip(prims, grads):
        if g is None:
            continue
        g = g.movedim(1 + d, 1).reshape(2, n, -1).to(torch.float64).nan_to_num(0, 0, 0)
        big = g.abs().max().item()
        leak = max((g[0][~left]).abs().max().item() if (~left).any() else 0.0,
                   (g[1][left]).abs().max().item() if left.any() else 0.0)
        if big and leak > tol * big:
            return (f"samples on one side of sample {s} change the outputs of samples on the other (relative size "
                    f"{leak / big:.2g})")
    return ""
