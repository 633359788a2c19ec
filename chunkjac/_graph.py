"""jacobian_of: per-sample Jacobians of a graph the caller already built (no fn to re-run).

The forward pass has run, so there is nothing to chunk by samples and nothing to probe: the work is
products over the existing graph (retained, so the caller can still backpropagate through outputs),
chunked over (colour, row) pairs. The coupling check is the derivative half of the one in _detect,
over the whole batch: 1 + ceil(log2 B) VJPs, one at a time (each costs one backward pass).
"""
from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from . import _autograd
from ._budget import format_bytes, parse_budget
from ._coupling import Coupling, coupled, from_argument, independent, log2_ceil
from ._detect import RTOL
from ._errors import BudgetError, CouplingWarning, TooLongError, describe, warn
from ._memory import free_bytes, measure_peak
from ._probe import best_seconds
from ._plan import _format_seconds
from ._planner import KMAX, VECTORISE_GAIN, margin
from ._spec import _FLOATS


def jacobian_of(outputs: torch.Tensor, inputs, *, coupling="auto", budget: int | str | None = None,
                create_graph: bool = False, max_seconds: float | None = 3600.0, progress: bool | None = None):
    """Per-sample Jacobians ``J[i] = d outputs[i] / d inputs[i]`` from an existing autograd graph.

    For users who ran the forward pass themselves and need its outputs afterwards::

        y = model(x)                          # x.requires_grad_() before, y: (B, *out)
        J = chunkjac.jacobian_of(y, x)        # (B, *out, *in); y's graph is kept
        loss = y.sum(); loss.backward()       # still works

    Args:
        outputs: a float tensor (B, *out) computed from ``inputs`` with autograd recording.
        inputs: a tensor (B, *in) with ``requires_grad``, or a tuple of such (then a tuple of
            Jacobians is returned); the batch is dim 0 of each.
        coupling: as in :func:`chunkjac.compute`: "auto" checks the graph for interacting samples
            (1 + ceil(log2 B) extra backward passes) and warns when it finds some; "independent",
            "coupled", group ids or a dependency structure say it instead.
        budget: memory the products may use (sizes how many (colour, row) pairs one batched VJP carries).
        create_graph: make the Jacobians differentiable.
        max_seconds: refuse a coupled extraction predicted to take longer (None: no limit).
        progress: a progress bar over the products (None: for runs predicted over 10 s on a terminal).

    Cost: colours x n_out backward passes over the graph (n_out: per-sample output elements; colours:
    1 for independent samples, B for fully coupled ones), vectorised by ``is_grads_batched``.
    """
    single = not isinstance(inputs, (tuple, list))
    xs = [inputs] if single else list(inputs)
    y = _check_args(outputs, xs)
    b = y.shape[0]
    c = from_argument(coupling, b)
    if c == "auto":
        c = _check_graph(y, xs)
    budget_bytes = parse_budget(budget, free_bytes(y.device))
    colours = c.colours
    rows = y[0].numel()
    pairs = (1 if colours is None else int(colours.max()) + 1) * rows
    step, seconds = _plan(y, xs, colours, pairs, budget_bytes, create_graph)
    if colours is not None and max_seconds is not None and seconds > max_seconds:
        raise TooLongError(
            f"chunkjac: jacobian_of would take about {_format_seconds(seconds)} ({pairs:,} products over the "
            f"graph of {b:,} coupled samples), over max_seconds={max_seconds:g}. Pass coupling=<group ids> or a "
            "dependency structure if only some samples interact, or max_seconds=None to run anyway.")
    show = bool(progress) if progress is not None else (seconds > 10 and sys.stderr.isatty())
    from ._strategies.coloured import extract_reverse
    with tqdm(total=pairs, unit="product", disable=not show, desc="chunkjac") as bar, torch.enable_grad():
        jacs = extract_reverse(y, xs, [0] * len(xs), colours, step, create_graph, retain=True,
                               on_call=bar.update)
    jacs = [j.reshape(b, *y.shape[1:], *x.shape[1:]) for j, x in zip(jacs, xs)]
    if not create_graph:
        jacs = [j.detach() for j in jacs]
    return jacs[0] if single else tuple(jacs)


def _check_args(y, xs) -> torch.Tensor:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"chunkjac: jacobian_of's outputs must be a tensor (B, *out), got {describe(y)}.")
    if y.dtype not in _FLOATS or y.dim() == 0:
        raise TypeError(f"chunkjac: outputs must be a float tensor (B, *out) with the batch in dim 0, got {describe(y)}.")
    if not y.requires_grad:
        raise ValueError(
            "chunkjac: outputs does not require grad, so it has no graph to differentiate: call "
            "x.requires_grad_() before the forward pass (outside torch.no_grad()), or use chunkjac.compute(fn, x).")
    if not xs:
        raise ValueError("chunkjac: inputs is empty; pass the tensor(s) outputs was computed from.")
    for k, x in enumerate(xs):
        if not isinstance(x, torch.Tensor) or not x.requires_grad or x.dim() == 0:
            raise ValueError(
                f"chunkjac: inputs[{k}] must be a tensor (B, *in) with requires_grad=True that outputs was computed "
                f"from, got {describe(x)}" + (" without requires_grad" if isinstance(x, torch.Tensor) else "") + ".")
        if x.shape[0] != y.shape[0]:
            raise ValueError(
                f"chunkjac: inputs[{k}] holds {x.shape[0]} samples in dim 0 but outputs holds {y.shape[0]}; "
                "both must carry the same batch in dim 0.")
    return y


def _check_graph(y: torch.Tensor, xs) -> Coupling:
    """The derivative check of _detect on the whole batch: a random cotangent u, and u restricted to
    the samples with bit b of their index set; their gradients must stay on their own samples."""

    b = y.shape[0]
    if b < 2:
        return independent(b)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, y.dtype)
    idx = torch.arange(b, device=y.device)
    with torch.enable_grad():
        full = _autograd.grad(y, xs, u, retain_graph=True, allow_unused=True)
        # One scale per input (as compute's check): a large input must not hide a small coupling.
        scales = [0.0 if g is None else g.abs().max().item() for g in full]
        if max(scales, default=0.0) == 0:
            return independent(b)
        tols = [RTOL.get(y.dtype, 1e-5) * sc for sc in scales]
        for bit in range(log2_ceil(b)):
            inside = ((idx >> bit) & 1).bool()
            mask = inside.reshape(b, *[1] * (y.dim() - 1)).to(y.dtype)
            part = _autograd.grad(y, xs, u * mask, retain_graph=True, allow_unused=True)
            for g, gp, tol, scale in zip(full, part, tols, scales):
                if g is None or scale == 0:
                    continue
                gp = torch.zeros_like(g) if gp is None else gp
                out_a = (gp.reshape(b, -1)[~inside]).abs()
                in_b = ((g - gp).reshape(b, -1)[inside]).abs()
                worst = max(out_a.max().item() if out_a.numel() else 0.0, in_b.max().item() if in_b.numel() else 0.0)
                if worst > tol:
                    reason = (f"the inputs of one sample change the outputs of another (relative size "
                              f"{worst / scale:.2g}, found by VJPs with random cotangents on the graph)")
                    warn(f"chunkjac: samples interact: {reason}. Computing exact per-sample blocks as coupled "
                         f"samples ({b:,} colours). Pass coupling=<group ids> or a dependency structure if only "
                         "some samples interact (faster); coupling='coupled' silences this.", CouplingWarning)
                    return coupled(b, reason)
    return independent(b)


def _plan(y, xs, colours, pairs: int, budget_bytes: int, create: bool) -> tuple[int, float]:
    """(pairs per batched VJP, predicted seconds): memory of 1 and 2 pairs fitted as a + b*k, then the
    faster per pair of 1 and the largest k that fits (see [Planning coupled chunks] in _plan)."""
    from ._strategies.coloured import extract_reverse
    dims = [0] * len(xs)

    def one(k):
        with torch.enable_grad():
            return extract_reverse(y, xs, dims, colours, k, create, calls=1, retain=True)

    def timed(k, repeats=1):
        return best_seconds(lambda: one(k), y.device, repeats)

    if pairs == 1:
        return 1, timed(1)
    m1, _ = measure_peak(lambda: one(1), y.device)
    m2, _ = measure_peak(lambda: one(2), y.device)
    per = max(m2 - m1, 1)
    share = margin(y.device) * budget_bytes
    if m1 > share:
        raise BudgetError(
            f"chunkjac: budget={format_bytes(budget_bytes)} cannot hold one backward pass over this graph "
            f"({format_bytes(m1)} measured); pass a larger budget.")
    k = int(max(1, min(pairs, KMAX, (share - m1) // per + 1)))
    t1 = timed(1, 2)
    best, per_pair = 1, t1
    if k > 1:
        tk = timed(k, 2)
        if tk / k < VECTORISE_GAIN * t1:
            best, per_pair = k, tk / k
    return best, per_pair * pairs
