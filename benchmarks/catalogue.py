"""Catalogue sweep: chunkjac.compute on every operator and module of PyTorch's own test catalogues.

What it checks. Every sample input of PyTorch's OpInfo database (``op_db``, float64, CPU, ops that
support autograd) and ModuleInfo database (``module_db``, training and eval) is read as a batch:
the sample's first tensor x is the batched input (batch dim 0, B = x.shape[0]); everything else is
shared. For op samples whose positional args hold tensors, a second variant passes those args to
chunkjac as extra inputs with ``in_dims=None``; for modules, the forward's other args always travel
that way. The reference is the diagonal of the full Jacobian from
``torch.autograd.functional.jacobian`` (shape (B, *out, B, *in)): J_ref[i] = full[i, ..., i, ...].
chunkjac must return exactly that (rtol 1e-6, atol 1e-8 times the largest |J_ref|, non-finite
entries at the same positions with the same values), warning CouplingWarning when samples interact,
or raise an error whose message starts with "chunkjac:". Each case is classified:

    exact      matches the reference
    refused    raised an exception whose message starts with "chunkjac:", or fn's own exception with
               chunkjac's note naming the chunk it failed on (a clear error)
    raw_error  any other exception escaped chunkjac (a defect)
    wrong      returned a result that differs from the reference (the worst defect)
    crash      the worker process died (segfault, abort, out-of-memory kill)
    hang       the case ran past --timeout seconds
    skipped    not applicable (the reason says why; "not a batch: ..." when the output's leading
               dim does not hold the samples, or the output is not a single float tensor)

Every case also records whether chunkjac warned CouplingWarning (``warned``), whether the reference
has nonzero off-diagonal blocks (``coupled_ref``) and whether the function is random (two calls on
the same input differ: then no single exact answer exists).

One process (``--one-process``): by default chunkjac's remembered decisions (``probe_cache``) are cleared
after every case, so each case is decided as in a fresh process. With --one-process they are kept, as a
long-running service calling chunkjac with many functions keeps them: a decision reused for a function
that only looks like an earlier one (the same code, other captured values) shows there as a wrong
answer or a false refusal. CI runs both.

Crash safety: cases run in worker processes (``--worker``, reading one op or module at a time from
stdin and streaming one JSON line per case). The parent survives segfaults and timeouts: it marks the
case that was running as ``crash`` or ``hang``, starts a fresh worker and resumes after that case.
(To see it work: CATALOGUE_CRASH_ON=<case key substring> or CATALOGUE_HANG_ON=... make a worker
segfault or sleep on the matching cases; with --second, CATALOGUE_REF_HANG_ON=... makes the reference
sleep.)

Second derivatives (``--second``): the same cases run through ``chunkjac.laplacian``,
``chunkjac.hessian(part="diagonal")``, ``chunkjac.hessian(part="full")`` and the PDE operators the
Hessian reference verifies: ``dims`` (the Laplacian over the first half of the coordinates),
``weighted`` (``laplacian(weights=C)``, C a fixed indefinite symmetric matrix) and ``mixed``
(``chunkjac.derivatives`` of the partials (0, D-1) and (D-1, D-1)) (``--parts`` picks a subset),
one record per part (key "<case>+<part>", field ``part``). The reference, computed once per case after
chunkjac answered (it has its own time limit, --ref-timeout; past it, or if it crashes the worker, the
case is skipped, not counted as hang or crash, and the case's other parts go without it), is
reverse over reverse on the whole batch: the first derivative's diagonal blocks J[i, o, a] with their
graph (create_graph), then the gradient of each w.r.t. the whole batch, whose sample-i block is row a of
the Hessian of y_{i,o} (other samples held fixed, so coupled samples get their exact blocks too; the
off-diagonal blocks of both derivatives give ``coupled_ref``). Cases too large for it (see
MAX_REF2_*) are skipped with the sizes, before chunkjac runs. Where reverse over reverse fails (no
double backward), the same under the math attention kernel (fused attention has none), else forward
over reverse per sample (torch.func.jacfwd(jacrev)), else forward over forward (jacfwd(jacfwd)),
stands in (field ``reference``); where all fail, the case is skipped: "reference failed: ..." when
chunkjac refused or failed as well, and "unverified: chunkjac returned a result, ..." when chunkjac
returned one (never counted as exact). Tolerances are 10x looser (rtol 1e-5, atol 1e-7 times the
largest |H_ref|); NaN/inf differences are forgiven where chunkjac matches a forward-over-reverse or
forward-over-forward reference (per sample) exactly. The summary adds counts per part and the
refusals on cases whose reference computed the second derivative. The default --timeout is 120 s.

Run it from the repository root (torch's test catalogues need the ``expecttest`` package):

    python benchmarks/catalogue.py                     # everything, 2 workers (about an hour on 2 cores)
    python benchmarks/catalogue.py --quick             # a representative subset, under 3 minutes (CI)
    python benchmarks/catalogue.py --ops --filter conv # only ops whose name contains "conv"
    python benchmarks/catalogue.py --modules --limit 10 --out /tmp/mods.jsonl
    python benchmarks/catalogue.py --summary /tmp/mods.jsonl   # re-print the summary of a past run
    python benchmarks/catalogue.py --quick --second    # second derivatives, the representative subset
    python benchmarks/catalogue.py --one-process --jobs 1   # every case in one interpreter, decisions kept
    python benchmarks/catalogue.py --ops --second --parts laplacian,diagonal --filter linalg

Output: a JSON-lines file (``--out``, default $TMPDIR/chunkjac_catalogue.jsonl), one object per case (kind, name,
variant, sample, shapes, class, message, warned, coupled_ref, random, seconds, ...), and a summary
on stdout: counts per class, the crash/hang/wrong/raw_error cases grouped by message, refusals on
independent samples, refusal messages by frequency and the most common skip reasons. The exit status
is 1 when any case is a crash, hang, wrong or raw_error, else 0.
"""
from __future__ import annotations

import argparse
import collections
import copy
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings

MAGIC = "@@catalogue@@ "          # worker protocol lines on stdout start with this
KEEP_DECISIONS = False             # --one-process: chunkjac's remembered decisions kept across cases
DEFECTS = ("crash", "hang", "wrong", "raw_error")
CLASSES = ("exact", "refused", "skipped") + DEFECTS
RTOL, ATOL = 1e-6, 1e-8
MAX_REF_ELEMENTS = 20_000_000      # full Jacobian entries (B*out x B*in) the reference may build
VECTORIZE_ROWS = 2_000             # above this many output entries, the reference uses vmap'd VJPs
# --second: tolerances 10x looser. The reference runs 2 backward passes per output entry (B*out), the
# second one vmap'd over the sample's D = in entries: at most MAX_REF2_ROWS of them, and at most
# MAX_REF2_WORK = (B*out*D) x (B*D) entries of the outer Jacobian they stand for. It keeps the Hessian
# blocks (B*out*D*D entries, as chunkjac's part="full") where at most MAX_REF2_ELEMENTS, else only
# their diagonals (B*out*D, same cap), and then the full part is skipped.
RTOL2, ATOL2 = 1e-5, 1e-7
MAX_REF2_ELEMENTS = 20_000_000
MAX_REF2_ROWS = 10_000
MAX_REF2_WORK = 1_000_000_000
PARTS = ("laplacian", "diagonal", "full", "dims", "weighted", "mixed")
# The operators of PDE residuals that the Hessian reference verifies: "dims" the Laplacian over the
# first half of the coordinates (chunkjac.laplacian(dims=...)), "weighted" sum_jk C_jk H_jk for a fixed
# indefinite symmetric C (laplacian(weights=C)), "mixed" the partials (0, D-1) and (D-1, D-1)
# (chunkjac.derivatives, stacked on a last dim). The third- and fourth-order operators are checked
# against nested autograd in tests/test_operators.py.
NEEDS_FULL = ("full", "weighted", "mixed")  # parts read off-diagonal Hessian entries

# --quick: elementwise, reductions, matrix products, scans and sorts along dims, indexing, broadcasting,
# convolutions, normalizations, random ops, linear algebra; modules with and without batch coupling.
QUICK_OPS = {"sin", "abs", "sqrt", "add", "mul", "pow", "clamp", "matmul", "bmm", "einsum", "sum", "mean", "amax",
             "cumsum", "cumprod", "sort", "topk", "flip", "roll", "where", "index_select", "gather", "masked_fill",
             "expand", "reshape", "transpose", "linalg.det", "linalg.solve", "cdist", "fft.fft",
             "nn.functional.softmax", "nn.functional.linear", "nn.functional.conv2d", "nn.functional.pad",
             "nn.functional.layer_norm", "nn.functional.batch_norm", "nn.functional.dropout",
             "nn.functional.normalize", "nn.functional.embedding", "nn.functional.interpolate",
             # cases chunkjac refuses or that need care: shared args that broadcast over the batch, a wrong
             # forward-mode formula, a non-differentiable op, NaN from 0 * NaN in reverse mode, sparse outputs
             "addmm", "squeeze", "trapezoid", "nn.functional.max_unpool2d", "scatter", "__rpow__", "to_sparse"}
QUICK_MODULES = {"nn.Linear", "nn.Conv2d", "nn.ConvTranspose1d", "nn.BatchNorm1d", "nn.LayerNorm", "nn.GroupNorm",
                 "nn.InstanceNorm1d", "nn.Softmax", "nn.MaxPool2d", "nn.LSTM", "nn.GRUCell", "nn.MultiheadAttention",
                 "nn.TransformerEncoderLayer", "nn.Embedding", "nn.PReLU", "nn.MSELoss"}


# ----------------------------------------------------------------------------------------------------
# The catalogues (imported by the parent to list units, and by each worker to run them)
# ----------------------------------------------------------------------------------------------------

def catalogues():
    """(op_db, module_db), importing torch's test helpers only when needed (about 7 s)."""
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import module_db
    return op_db, module_db


def op_name(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def list_units(args) -> list:
    """The ops and modules to run, as (kind, index in its database, name)."""
    import torch
    op_db, module_db = catalogues()
    both = not (args.ops or args.modules)
    units = []
    if args.ops or both:
        for i, op in enumerate(op_db):
            if not op.supports_autograd or torch.float64 not in op.supported_dtypes("cpu"):
                continue
            if args.quick and op.name not in QUICK_OPS:
                continue
            units.append(("op", i, op_name(op)))
    if args.modules or both:
        for i, mi in enumerate(module_db):
            if args.quick and mi.name not in QUICK_MODULES:
                continue
            units.append(("module", i, mi.name))
    if args.filter:
        units = [u for u in units if args.filter in u[2]]
    return units[: args.limit] if args.limit else units


# ----------------------------------------------------------------------------------------------------
# One case (in a worker)
# ----------------------------------------------------------------------------------------------------

def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def where(e: BaseException) -> str:
    """The innermost chunkjac frame of the traceback (file:line function), else the innermost frame."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if os.sep + "chunkjac" + os.sep in f.filename]
    f = (ours or frames or [None])[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" if f else ""


def shape_of(v):
    import torch
    if isinstance(v, torch.Tensor):
        return list(v.shape)
    if isinstance(v, (tuple, list)):
        return [shape_of(a) for a in v]
    return type(v).__name__


def reference(f, x, forward=False):
    """(diagonal blocks J_ref of shape (B, *out, *in), whether off-diagonal blocks hold finite nonzeros,
    whether they hold non-finite values). Reverse mode (one VJP per output entry) unless ``forward``."""
    import torch
    y = f(x)
    if y.numel() == 0 or x.numel() == 0:  # (functional.jacobian cannot stack zero rows or columns)
        return torch.zeros(*y.shape, *x.shape[1:], dtype=y.dtype), False, False
    if forward:
        full = torch.autograd.functional.jacobian(f, x, vectorize=True, strategy="forward-mode")
    else:
        full = torch.autograd.functional.jacobian(f, x, vectorize=y.numel() > VECTORIZE_ROWS)
    b, n_out, n_in = x.shape[0], y[0].numel(), x[0].numel()
    blocks = full.reshape(b, n_out, b, n_in)
    i = torch.arange(b)
    diag = blocks[i, :, i].reshape(*y.shape, *x.shape[1:])
    off = blocks.clone()
    off[i, :, i] = 0
    # Non-finite off-diagonal entries alone do not make samples interact: a reverse-mode reduction over
    # a broadcast dim multiplies the zero cotangents of other samples by NaN/inf (0 * NaN = NaN).
    finite = torch.isfinite(off)
    return diag, bool((off[finite] != 0).any()), bool((~finite).any())


def compare(j, ref, rtol=RTOL, atol=ATOL) -> str:
    """'' when j matches ref, else what differs (prefixed 'non-finite:' or 'values:' or 'shape:')."""
    import torch
    if tuple(j.shape) != tuple(ref.shape):
        return f"shape: got {tuple(j.shape)}, reference {tuple(ref.shape)}"
    j = j.detach().to(torch.float64)
    fin_j, fin_r = torch.isfinite(j), torch.isfinite(ref)
    nonfin = ~fin_r
    same_nonfinite = torch.equal(fin_j, fin_r) and bool(
        ((j[nonfin] == ref[nonfin]) | (j[nonfin].isnan() & ref[nonfin].isnan())).all())
    if not same_nonfinite:
        bad = (fin_j != fin_r) | (nonfin & ~((j == ref) | (j.isnan() & ref.isnan())))
        flat_j, flat_r = j.flatten(), ref.flatten()
        pos = int(bad.flatten().nonzero()[0])
        return (f"non-finite: {int(bad.sum())} of {ref.numel()} entries differ in finiteness "
                f"(e.g. got {flat_j[pos].item()}, reference {flat_r[pos].item()})")
    if not fin_r.any():
        return ""
    rj, rr = j[fin_r], ref[fin_r]
    scale = max(1.0, float(rr.abs().max()))
    err = (rj - rr).abs()
    bad = err > atol * scale + rtol * rr.abs()
    if bad.any():
        pos = int(err.argmax())
        return (f"values: {int(bad.sum())} of {ref.numel()} entries differ, max abs error {float(err.max()):.3g} "
                f"(got {rj[pos].item():.6g}, reference {rr[pos].item():.6g}, scale {scale:.3g})")
    return ""


def run_case(rec: dict, call, f, x, part=None, cache=None) -> dict:
    """Fill rec: call() runs chunkjac.compute (with ``part``: chunkjac.hessian(part=part), see
    run_second); f(x) is the same function of the batched input alone."""
    import torch
    if not isinstance(x, torch.Tensor):
        return dict(rec, cls="skipped", message=f"input is {type(x).__name__}, not a tensor")
    rec["in_shape"] = list(x.shape)
    if x.dim() == 0 or not x.is_floating_point() or x.shape[0] == 0:
        return dict(rec, cls="skipped", message=f"input is a {x.dtype} tensor of shape {tuple(x.shape)}, "
                                                "not a batch of float samples")
    try:
        y2 = f(x)           # a random fn gives another draw here; the seeded calls below share one
        torch.manual_seed(1)
        y = f(x)
    except Exception as e:
        return dict(rec, cls="skipped", message=f"fn fails on the sample itself: {first_line(e)}")
    rec["out_shape"] = shape_of(y)
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        what = f"a {y.dtype} tensor" if isinstance(y, torch.Tensor) else type(y).__name__
        return dict(rec, cls="skipped", message=f"not a batch: the output is {what}, not a single float tensor")
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        return dict(rec, cls="skipped", message=f"not a batch: output shape {tuple(y.shape)} does not lead "
                                                f"with B={x.shape[0]}")
    d1, d2 = (v.to_dense() if v.layout != torch.strided else v for v in (y, y2))
    rec["random"] = not (d1.shape == d2.shape and torch.equal(d1.isnan(), d2.isnan())
                         and bool((d1.nan_to_num() == d2.nan_to_num()).all()))
    if x.layout != torch.strided or y.layout != torch.strided:
        rec["sparse"] = True
    if part is not None:
        return run_second(rec, call, f, x, y, part, cache if cache is not None else {})
    if y.numel() * x.numel() > MAX_REF_ELEMENTS:
        return dict(rec, cls="skipped", message=f"too large for the reference ({y.numel()} x {x.numel()})")

    # chunkjac
    j = run_chunkjac(rec, call)

    # the reference
    try:
        torch.manual_seed(1)
        ref, rec["coupled_ref"], nonfinite_off = reference(f, x)
        if nonfinite_off:
            rec["offdiag_nonfinite"] = True
    except Exception as e:
        if rec.get("cls") in ("refused", "raw_error"):
            rec["note"] = f"the reference fails too: {first_line(e)}"
            return rec
        return dict(rec, cls="skipped", message=f"reference failed: {first_line(e)}",
                    chunkjac="returned" if j is not None else rec.get("cls"))
    if "cls" in rec:
        return rec
    diff = compare(j, ref)
    if diff.startswith("non-finite:"):
        # NaN/inf where the two AD modes legitimately differ (0 * NaN in a reverse-mode reduction over a
        # broadcast dim, an inf times a zero tangent): an answer that matches the forward-mode
        # reference exactly counts, with a note.
        try:
            torch.manual_seed(1)
            if not compare(j, reference(f, x, forward=True)[0]):
                rec["note"] = f"matches the forward-mode reference; the reverse-mode one differs: {diff}"
                diff = ""
        except Exception:
            pass
    rec.update(cls="wrong" if diff else "exact", message=diff)
    return rec


# ----------------------------------------------------------------------------------------------------
# --second: one case through chunkjac.laplacian / hessian(part="diagonal") / hessian(part="full")
# ----------------------------------------------------------------------------------------------------

def _outer_rows(t, x):
    """(t.numel(), *x.shape): the gradient of every entry of t w.r.t. x (zeros where unused), in one
    vmap'd backward (is_grads_batched), or one backward per entry where vmap fails."""
    import torch
    n = t.numel()
    if n > 1:
        try:
            (g,) = torch.autograd.grad(t, x, torch.eye(n, dtype=t.dtype).reshape(n, *t.shape),
                                       retain_graph=True, allow_unused=True, is_grads_batched=True)
            return torch.zeros((n, *x.shape), dtype=x.dtype) if g is None else g
        except Exception:
            pass
    rows = []
    flat = t.reshape(-1)
    for k in range(n):
        (g,) = torch.autograd.grad(flat[k], x, retain_graph=True, allow_unused=True)
        rows.append(torch.zeros_like(x) if g is None else g)
    return torch.stack(rows)


def reference2(f, x, full=True):
    """Reverse over reverse on the whole batch, other samples held fixed by construction: for each
    output entry y_{i,o}, its gradient w.r.t. the whole batch with its graph (create_graph), whose sample-i
    block is row o of the first derivative J_i; then the gradient of each of those n_in entries w.r.t.
    the whole batch, whose sample-i block is row a of the Hessian of y_{i,o}. Returns (H of shape
    (B, *out, *in, *in), or with full=False only its diagonals (B, *out, *in); whether off-diagonal
    blocks of the first or second derivative hold finite nonzeros; whether they hold non-finite values)."""
    import torch
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = f(xg)
        b, n_in = x.shape[0], x[0].numel()
        n_out = y[0].numel() if y.dim() else 1
        h = torch.zeros((b, n_out, n_in, n_in) if full else (b, n_out, n_in), dtype=torch.float64)
        shape = (*y.shape, *x.shape[1:], *x.shape[1:]) if full else (*y.shape, *x.shape[1:])
        if y.numel() == 0 or x.numel() == 0 or not y.requires_grad:
            return h.reshape(shape), False, False
        yf = y.reshape(-1)
        coupled = nonfinite = False
        for r in range(b * n_out):
            i, o = divmod(r, n_out)
            (g,) = torch.autograd.grad(yf[r], xg, retain_graph=True, create_graph=True, allow_unused=True)
            if g is None:
                continue
            g = g.reshape(b, n_in)
            off = g.detach().clone()
            off[i] = 0
            fin = torch.isfinite(off)
            coupled |= bool((off[fin] != 0).any())
            nonfinite |= bool((~fin).any())
            t = g[i]
            if not t.requires_grad:
                continue
            g2 = _outer_rows(t, xg).reshape(n_in, b, n_in)
            h[i, o] = (g2[:, i] if full else g2[:, i].diagonal()).to(torch.float64)
            off2 = g2.clone()
            off2[:, i] = 0
            fin = torch.isfinite(off2)
            coupled |= bool((off2[fin] != 0).any())
            nonfinite |= bool((~fin).any())
    return h.reshape(shape), coupled, nonfinite


def per_sample_reference(f, x, how: str):
    """(B, *out, *in, *in) by torch.func per sample (z = x with sample i replaced by v; the Hessian of
    f(z)[i] w.r.t. v): how = "fwd-over-rev" (jacfwd(jacrev)) or "fwd-over-fwd" (jacfwd(jacfwd))."""
    import torch
    from torch.func import jacfwd, jacrev
    x = x.detach()
    hs = []
    for i in range(x.shape[0]):
        def yi(v, i=i):
            return f(torch.cat([x[:i], v.unsqueeze(0), x[i + 1:]]))[i]
        inner = jacrev(yi) if how == "fwd-over-rev" else jacfwd(yi, randomness="same")
        torch.manual_seed(1)
        hs.append(jacfwd(inner, randomness="same")(x[i]).to(torch.float64))
    return torch.stack(hs)


def half(x) -> tuple:
    return tuple(range(max(1, x[0].numel() // 2)))


def weights(x):
    import torch
    d = x[0].numel()
    c = torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return c + c.T


def operator_api(part: str, x):
    """The chunkjac call of an operator part on batched input x: (fn, inputs, **kw) -> a tensor."""
    import torch
    import chunkjac
    d = x[0].numel()
    if part == "dims":
        return lambda *a, **k: chunkjac.laplacian(*a, dims=half(x), **k)
    if part == "weighted":
        return lambda *a, **k: chunkjac.laplacian(*a, weights=weights(x), **k)
    terms = {"xy": (0, d - 1), "yy": (d - 1, d - 1)}
    return lambda *a, **k: torch.stack(list(chunkjac.derivatives(*a, terms, **k).values()), -1)


def second_part(h, x, part: str, full=True):
    """The part of per-sample Hessians h (B, *out, *in, *in), or of their diagonals (B, *out, *in)
    where not ``full``."""
    if part == "full":
        return h
    if part in ("weighted", "mixed"):
        n = x[0].numel()
        flat = h.reshape(*h.shape[: h.dim() - 2 * x[0].dim()], n, n)
        if part == "mixed":
            return torch_stack([flat[..., 0, n - 1], flat[..., n - 1, n - 1]])
        return (flat * weights(x).to(flat.dtype)).sum((-2, -1))
    if part == "dims":
        d = second_part(h, x, "diagonal", full)
        return d.reshape(*d.shape[: d.dim() - x[0].dim()], -1)[..., list(half(x))].sum(-1)
    k = x[0].dim()
    if full:
        flat = h.reshape(*h.shape[: h.dim() - 2 * k], x[0].numel(), x[0].numel())
        d = flat.diagonal(dim1=-2, dim2=-1)
    else:
        d = h.reshape(*h.shape[: h.dim() - k], x[0].numel())
    return d.reshape(*d.shape[:-1], *x.shape[1:]) if part == "diagonal" else d.sum(-1)


def torch_stack(ts):
    import torch
    return torch.stack(ts, -1)


def run_chunkjac(rec: dict, call):
    """Run chunkjac's call once (seeded), recording its time and warnings in ``rec``, and classify an
    escape (a chunkjac error: refused; anything else: raw_error) or a non-tensor result (wrong).
    Returns the result, or None."""
    import torch
    import chunkjac
    t0 = time.perf_counter()
    j, error = None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.manual_seed(1)
            j = call()
        except Exception as e:  # noqa: BLE001 - every escape is classified
            error = e
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    rec["warned"] = any(issubclass(w.category, chunkjac.CouplingWarning) for w in caught)
    rec["warnings"] = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}" for w in caught
                              if str(w.message).startswith("chunkjac")})
    if not KEEP_DECISIONS:  # (--one-process keeps them: see main)
        chunkjac.probe_cache.clear()
    if error is not None:
        msg = str(error).strip()
        # fn's own exception, its class kept, with chunkjac's context in a note: a clear error too
        noted = any(str(n).startswith("chunkjac: fn raised") for n in getattr(error, "__notes__", ()))
        rec.update(cls="refused" if msg.startswith("chunkjac:") or noted else "raw_error",
                   message=first_line(error), where=where(error))
    elif not isinstance(j, torch.Tensor):
        rec.update(cls="wrong", message=f"returned {type(j).__name__}, not a tensor")
    return j


def run_second(rec: dict, call, f, x, y, part: str, cache: dict) -> dict:
    """rec for one part: chunkjac first, then the reference (computed once per case, in ``cache``).
    The reference is reverse over reverse (reference2); where it fails, the same under the math
    attention kernel, else forward over reverse or forward over forward per sample (rec["reference"]
    says which); where all fail the case is skipped ("reference failed", or "unverified" when chunkjac
    returned a result). NaN/inf differences are forgiven where chunkjac matches a forward-over-reverse
    or forward-over-forward reference exactly, with a note."""
    import torch
    rec["part"] = part
    b, n_out, n_in = x.shape[0], y[0].numel(), x[0].numel()
    full = b * n_out * n_in * n_in <= MAX_REF2_ELEMENTS  # the reference keeps whole Hessian blocks
    if (b * n_out > MAX_REF2_ROWS or b * n_out * n_in * b * n_in > MAX_REF2_WORK
            or b * n_out * n_in > MAX_REF2_ELEMENTS):
        return dict(rec, cls="skipped", message=f"too large for the second-order reference "
                                                f"(B*out = {b * n_out}, D = {n_in}, B = {b})")
    if part in ("dims", "mixed") and n_in == 0:
        return dict(rec, cls="skipped", message="no input coordinate to name (D = 0)")
    if part in NEEDS_FULL and not full:
        return dict(rec, cls="skipped", message=f"too large for the second-order reference's full Hessians "
                                                f"(B*out = {b * n_out}, D = {n_in})")
    j = run_chunkjac(rec, call)

    if "ref" not in cache:
        if cache.get("say"):
            cache["say"]({"reference": rec.get("key"), "rec": rec})  # (what chunkjac did, should it not return)
        if os.environ.get("CATALOGUE_REF_HANG_ON") and os.environ["CATALOGUE_REF_HANG_ON"] in rec.get("key", ""):
            time.sleep(3600)  # to test the parent's handling of a slow reference
        t1 = time.perf_counter()
        try:
            torch.manual_seed(1)
            cache["ref"] = ("rev-over-rev",) + reference2(f, x, full)
        except Exception as e:
            first = first_line(e)
            cache["ref"] = e
            notes = [f"reverse over reverse failed: {first}"]
            try:  # fused attention kernels have no double backward; the math one computes the same
                from torch.nn.attention import SDPBackend, sdpa_kernel
                with sdpa_kernel([SDPBackend.MATH]):
                    torch.manual_seed(1)
                    cache["ref"] = ("rev-over-rev (sdpa math)",) + reference2(f, x, full)
            except Exception as e2:
                notes.append(f"with the math attention kernel: {first_line(e2)}")
            # per sample, whole Hessians: only where they fit
            for alt in ("fwd-over-rev", "fwd-over-fwd") if full and isinstance(cache["ref"], Exception) else ():
                try:
                    torch.manual_seed(1)
                    cache["ref"] = (f"{alt} per sample", per_sample_reference(f, x, alt), None, None)
                    break
                except Exception as e2:
                    notes.append(f"{alt} failed: {first_line(e2)}")
            cache["ref_note"] = "; ".join(notes)[:600]
        cache["ref_seconds"] = round(time.perf_counter() - t1, 3)
    rec["ref_seconds"] = cache["ref_seconds"]
    if cache.get("ref_note"):
        rec["ref_note"] = cache["ref_note"]
    if isinstance(cache["ref"], Exception):
        e = cache["ref"]
        rec["ref_ok"] = False
        if rec.get("cls") in ("refused", "raw_error"):
            rec["note"] = f"the reference fails too: {first_line(e)}"
            return rec
        if j is not None:
            return dict(rec, cls="skipped", message=f"unverified: chunkjac returned a result, the reference "
                        f"failed: {first_line(e)}", chunkjac="returned")
        return dict(rec, cls="skipped", message=f"reference failed: {first_line(e)}", chunkjac=rec.get("cls"))
    how, h, coupled, nonfinite_off = cache["ref"]
    rec["ref_ok"] = True
    rec["reference"] = how
    if coupled is not None:
        rec["coupled_ref"] = coupled
    if nonfinite_off:
        rec["offdiag_nonfinite"] = True
    if "cls" in rec:
        return rec
    ref = second_part(h, x, part, full)
    diff = compare(j, ref, RTOL2, ATOL2)
    if diff and not diff.startswith("shape:") and full:
        for alt in ("fwd-over-rev", "fwd-over-fwd"):
            if alt in how:
                continue
            key = "alt:" + alt
            if key in cache and cache[key] is None:
                continue
            try:
                if key not in cache:
                    cache[key] = per_sample_reference(f, x, alt)
                if not compare(j, second_part(cache[key], x, part), RTOL2, ATOL2):
                    if diff.startswith("non-finite:"):
                        rec["note"] = (f"matches the forward-mode reference ({alt}, per sample); the {how} one "
                                       f"differs: {diff}")
                        diff = ""
                    else:
                        rec["note"] = f"matches the {alt} reference (per sample); the {how} one differs"
                    break
            except Exception as e:
                cache[key] = None
                rec.setdefault("alt_failed", []).append(f"{alt}: {first_line(e)}"[:200])
    rec.update(cls="wrong" if diff else "exact", message=diff)
    return rec


# ----------------------------------------------------------------------------------------------------
# The cases of one op / module (in a worker)
# ----------------------------------------------------------------------------------------------------

def op_cases(op, n_samples):
    """(key, record, call, f, x) for the first n samples of an OpInfo, lazily."""
    import torch
    import chunkjac
    name = op_name(op)
    torch.manual_seed(0)
    # The first n samples whose input can be a batch (a non-empty float tensor of dim >= 1): many ops
    # list 0-d samples first. Only when none of the first 10 n is, the first sample runs (and is skipped).
    samples = list(itertools.islice(op.sample_inputs("cpu", torch.float64, requires_grad=False), 10 * n_samples))
    usable = [(k, s) for k, s in enumerate(samples) if isinstance(s.input, torch.Tensor) and s.input.dim() >= 1
              and s.input.is_floating_point() and s.input.shape[0] > 0]
    for k, s in (usable[:n_samples] or list(enumerate(samples))[:1]):
        x, args, kwargs = s.input, tuple(s.args), dict(s.kwargs)

        def f(z, args=args, kwargs=kwargs):
            return op(z, *args, **kwargs)

        base = dict(kind="op", name=name, sample=k, args=shape_of(args), kwargs=sorted(kwargs))
        yield (f"op:{name}#{k}:batched", dict(base, variant="batched"),
               lambda f=f, x=x, api=chunkjac.compute: api(f, x), f, x)
        if any(isinstance(a, torch.Tensor) for a in args):
            def g(z, *a, kwargs=kwargs):
                return op(z, *a, **kwargs)
            yield (f"op:{name}#{k}:shared_args", dict(base, variant="shared_args"),
                   lambda g=g, x=x, args=args, api=chunkjac.compute: api(g, (x, *args),
                                                                         in_dims=(0,) + (None,) * len(args)),
                   f, x)


def module_cases(mi, n_samples):
    """(key, record, call, f, x) for the first n inputs of a ModuleInfo, in training and in eval mode."""
    import torch
    import chunkjac
    for training in (True, False):
        variant = "train" if training else "eval"
        torch.manual_seed(0)
        inputs = mi.module_inputs_func(mi, device="cpu", dtype=torch.float64, requires_grad=False,
                                       training=training)[:n_samples]
        for k, mod_in in enumerate(inputs):
            key = f"module:{mi.name}#{k}:{variant}"
            rec = dict(kind="module", name=mi.name, variant=variant, sample=k, desc=mod_in.desc)
            fwd = mod_in.forward_input
            if fwd is None or not (fwd.args or fwd.kwargs):
                yield key, dict(rec, cls="skipped", message="no forward input"), None, None, None
                continue
            if fwd.args:
                x, rest, kwargs = fwd.args[0], tuple(fwd.args[1:]), dict(fwd.kwargs)
                m_call = lambda m, z, r, kw: m(z, *r, **kw)  # noqa: E731
            else:  # the input given by keyword (nn.Linear's forward_input is input=...)
                kwargs = dict(fwd.kwargs)
                x = kwargs.pop(next(iter(kwargs)))
                rest = ()
                m_call = lambda m, z, r, kw, name=next(iter(fwd.kwargs)): m(*r, **{name: z}, **kw)  # noqa: E731
            rec.update(args=shape_of(rest), kwargs=sorted(kwargs))
            try:
                torch.manual_seed(0)
                c = mod_in.constructor_input
                m = mi.module_cls(*c.args, **c.kwargs).to(dtype=torch.float64).train(training)
                # One forward first: lazy modules materialize their parameters; and is the output a tuple?
                with torch.no_grad():
                    pick = 0 if isinstance(m_call(m, x, rest, kwargs), (tuple, list)) else None
            except Exception as e:
                yield key, dict(rec, cls="skipped", message=f"the module fails on the sample itself: {first_line(e)}"), \
                    None, None, None
                continue
            m_ref = copy.deepcopy(m)  # chunkjac's calls must not change what the reference sees

            def f_ref(z, m=m_ref, rest=rest, kwargs=kwargs, m_call=m_call):
                out = m_call(m, z, rest, kwargs)
                return out[0] if isinstance(out, (tuple, list)) else out

            if rest or kwargs or not fwd.args:
                def call(m=m, x=x, rest=rest, kwargs=kwargs, pick=pick, m_call=m_call, api=chunkjac.compute):
                    return api(lambda z, *r: m_call(m, z, r, kwargs), (x, *rest),
                               in_dims=(0,) + (None,) * len(rest), output=pick)
            else:
                def call(m=m, x=x, pick=pick, api=chunkjac.compute):
                    return api(m, x, output=pick)
            yield key, rec, call, f_ref, x


def second_cases(cases, parts, no_ref=frozenset(), say=None):
    """--second: each case once per part, key "<key>+<part>", call() through chunkjac.laplacian or
    chunkjac.hessian(part=...); the parts of one case share one reference (the cache, the 6th item).
    Cases in ``no_ref`` (their reference ran out of time before) get none; ``say`` tells the parent
    when a reference starts (its own time limit)."""
    import chunkjac
    apis = {"laplacian": chunkjac.laplacian,
            "diagonal": lambda *a, **k: chunkjac.hessian(*a, part="diagonal", **k),
            "full": lambda *a, **k: chunkjac.hessian(*a, part="full", **k)}
    for key, rec, call, f, x in cases:
        if call is None:
            yield key, rec, None, None, None, None, None
            continue
        cache = {"say": say}
        if key in no_ref:
            cache.update(ref=TimeoutError("the reference ran out of time on another part of this case"),
                         ref_seconds=None)
        for part in parts:
            api = apis[part] if part in apis else operator_api(part, x)
            yield f"{key}+{part}", dict(rec), (lambda call=call, api=api: call(api=api)), f, x, part, cache


def worker() -> None:
    """Read units (JSON lines) from stdin; stream MAGIC-prefixed JSON lines: ready, start, case, done."""
    import torch
    torch.set_num_threads(1)
    op_db, module_db = catalogues()
    warnings.filterwarnings("ignore")  # the catalogues are noisy; run_case records chunkjac's own warnings

    def say(obj):
        sys.stdout.write(MAGIC + json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ready": True})
    global KEEP_DECISIONS
    for line in sys.stdin:
        task = json.loads(line)
        KEEP_DECISIONS = bool(task.get("keep"))
        kind, index = task["unit"]
        skip = set(task["skip"])
        try:
            if kind == "op":
                cases = op_cases(op_db[index], task["samples"])
            else:
                cases = module_cases(module_db[index], task["samples"])
            if task.get("parts"):
                cases = second_cases(cases, task["parts"], set(task.get("no_ref", ())), say)
            else:
                cases = ((*c, None, None) for c in cases)
            for key, rec, call, f, x, part, cache in cases:
                if key in skip:
                    continue
                say({"start": key})
                if os.environ.get("CATALOGUE_CRASH_ON") and os.environ["CATALOGUE_CRASH_ON"] in key:
                    os.kill(os.getpid(), signal.SIGSEGV)  # to test the parent's crash handling
                if os.environ.get("CATALOGUE_HANG_ON") and os.environ["CATALOGUE_HANG_ON"] in key:
                    time.sleep(3600)                      # to test the parent's timeout handling
                rec["key"] = key
                if call is not None:  # (None: rec already says why it is skipped)
                    try:
                        rec = run_case(rec, call, f, x, part, cache)
                    except Exception as e:  # a bug of this script, or an op that fails strangely
                        rec.update(cls="skipped", message=f"harness error: {first_line(e)}", where=where(e))
                say({"case": rec})
        except Exception as e:  # sample generation failed: one record for the unit
            say({"case": {"key": f"{kind}:{index}:samples", "kind": kind, "name": task["name"], "variant": "-",
                          "sample": -1, "cls": "skipped", "message": f"sample inputs failed: {first_line(e)}"}})
        say({"done": True})


# ----------------------------------------------------------------------------------------------------
# The parent: workers, crash and hang handling, the JSON-lines file
# ----------------------------------------------------------------------------------------------------

class Worker:
    """A ``--worker`` subprocess; messages arrive on a queue (None at end of output)."""

    def __init__(self, slot: int):
        self.stderr = tempfile.TemporaryFile("w+")  # read back when the worker dies
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1, cwd=os.getcwd())
        self.messages = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(MAGIC):
                self.messages.put(json.loads(line[len(MAGIC):]))
        self.messages.put(None)

    def send(self, task: dict):
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()

    def death(self) -> str:
        """Why the process ended: its signal or exit status and the last line of its stderr."""
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rc = None
        self.stderr.flush()
        self.stderr.seek(0)
        lines = [l.strip() for l in self.stderr.read().splitlines() if l.strip()]
        fatal = next((l for l in lines if "Fatal Python error" in l or "Error" in l or "Abort" in l), "")
        how = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}"
        return f"worker died ({how}){': ' + fatal if fatal else ''}"

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.stderr.close()


class Driver:
    def __init__(self, units, args):
        self.pending = collections.deque(
            {"unit": [kind, index], "name": name, "skip": [], "samples": args.samples, "parts": args.second,
             "keep": args.one_process}
            for kind, index, name in units)
        self.total = len(units)
        self.args = args
        self.lock = threading.Lock()
        self.records = []
        self.units_done = 0
        self.out = open(args.out, "w")
        self.t0 = time.time()

    def record(self, rec: dict):
        with self.lock:
            self.records.append(rec)
            self.out.write(json.dumps(rec) + "\n")
            self.out.flush()

    def next_task(self):
        with self.lock:
            return self.pending.popleft() if self.pending else None

    def slot(self, n: int):
        w = None
        while (task := self.next_task()) is not None:
            if w is None:
                w = Worker(n)
                if w.messages.get(timeout=300) is None:
                    raise SystemExit(f"a worker failed to start: {w.death()}")
            w.send(task)
            current, done_keys, in_ref = None, [], None
            deadline = time.time() + max(self.args.timeout, 120)  # generating the samples
            while True:
                try:
                    msg = w.messages.get(timeout=max(0.1, deadline - time.time()))
                except queue.Empty:
                    msg = "timeout"
                if msg is None or msg == "timeout":
                    reason = w.death() if msg is None else f"no answer after {self.args.timeout:g} s"
                    if in_ref is not None:  # --second: chunkjac had answered; the reference did not finish
                        reason = (f"reference crashed: {reason}" if msg is None else
                                  f"reference took longer than {self.args.ref_timeout:g} s")
                    if msg == "timeout":
                        w.proc.kill()
                    w.kill()
                    w = None
                    key = current or f"{task['unit'][0]}:{task['unit'][1]}:samples"
                    kind, name = task["unit"][0], task["name"]
                    variant, sample = (key.split(":")[-1], int(key.split("#")[-1].split(":")[0])) if current else ("-", -1)
                    rec = {"key": key, "kind": kind, "name": name, "variant": variant, "sample": sample,
                           "cls": "crash" if msg is None else "hang", "message": reason}
                    if "+" in variant:  # --second: "<variant>+<part>"
                        rec["variant"], rec["part"] = variant.split("+", 1)
                    no_ref = list(task.get("no_ref", []))
                    if in_ref is not None:  # not chunkjac's doing; the case's other parts skip the reference
                        no_ref.append(key.rsplit("+", 1)[0])
                        if in_ref.get("cls"):  # chunkjac refused or failed: that stands
                            rec = dict(in_ref, note=reason)
                        else:
                            rec = dict(in_ref, cls="skipped", message=f"unverified: chunkjac returned a result, "
                                       f"the {reason}", chunkjac="returned")
                    self.record(rec)
                    if current:  # resume after the case that killed the worker
                        with self.lock:
                            self.pending.appendleft(dict(task, skip=task["skip"] + done_keys + [current],
                                                         no_ref=no_ref))
                    else:
                        self._progress(task)
                    break
                if "start" in msg:
                    current, deadline, in_ref = msg["start"], time.time() + self.args.timeout, None
                elif "reference" in msg:  # --second: chunkjac answered; the reference gets its own time
                    in_ref, deadline = msg["rec"], time.time() + self.args.ref_timeout
                elif "case" in msg:
                    done_keys.append(msg["case"]["key"])
                    current, in_ref = None, None
                    self.record(msg["case"])
                elif "done" in msg:
                    self._progress(task)
                    break
        if w is not None:
            w.proc.stdin.close()
            w.kill()

    def _progress(self, task):
        with self.lock:
            self.units_done += 1
            counts = collections.Counter(r["cls"] for r in self.records)
        print(f"[{self.units_done}/{self.total} {time.time() - self.t0:6.0f}s] {task['name']:<40} "
              + " ".join(f"{c}={counts[c]}" for c in CLASSES if counts[c]), file=sys.stderr, flush=True)

    def run(self):
        threads = [threading.Thread(target=self.slot, args=(n,)) for n in range(self.args.jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.out.close()
        return self.records


# ----------------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------------

def normalized(msg: str) -> str:
    """A message with its numbers and shapes blanked, to group cases that fail the same way."""
    msg = re.sub(r"\(([\d, ]*)\)|\[([\d, ]*)\]", "(..)", msg or "")
    return re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "N", msg)[:150]


def summarize(records: list, out=sys.stdout) -> None:
    counts = collections.Counter(r["cls"] for r in records)
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"\n{len(records)} cases: " + ", ".join(f"{c} {counts[c]}" for c in CLASSES))
    for kind in ("op", "module"):
        c = collections.Counter(r["cls"] for r in records if r["kind"] == kind)
        if c:
            p(f"  {kind + 's':<8} " + ", ".join(f"{k} {c[k]}" for k in CLASSES))
    for part in PARTS:  # --second
        c = collections.Counter(r["cls"] for r in records if r.get("part") == part)
        if c:
            p(f"  {part:<9} " + ", ".join(f"{k} {c[k]}" for k in CLASSES))
    unverified = [r for r in records if r["cls"] == "skipped" and r.get("message", "").startswith("unverified:")]
    if unverified:
        p(f"  unverified (chunkjac returned a result, no reference; counted as skipped): {len(unverified)}")
    others = collections.Counter(r["reference"] for r in records
                                 if r.get("reference", "rev-over-rev") != "rev-over-rev")
    if others:
        p("  graded against a fallback reference (reverse over reverse failed): "
          + ", ".join(f"{k} {n}" for k, n in others.items()))
    ran = [r for r in records if "coupled_ref" in r]
    if ran:
        interact = lambda r: any("samples interact" in w for w in r.get("warnings", []))  # noqa: E731
        mixes = lambda r: any("mixes samples" in w for w in r.get("warnings", []))  # noqa: E731
        p(f"coupling: reference coupled in {sum(r['coupled_ref'] for r in ran)} of {len(ran)} graded cases; "
          f"'samples interact' warnings {sum(map(interact, ran))} (on independent samples: "
          f"{sum(interact(r) and not r['coupled_ref'] for r in ran)}); 'mixes samples' warnings "
          f"{sum(map(mixes, ran))}; coupled without a warning: {sum(r['coupled_ref'] and not r['warned'] for r in ran)} "
          f"(exact {sum(r['coupled_ref'] and not r['warned'] and r['cls'] == 'exact' for r in ran)}); "
          f"random functions {sum(r.get('random', False) for r in ran)}")
        fwd = [r for r in records if r["cls"] == "exact" and "forward-mode reference" in r.get("note", "")]
        if fwd:
            p("exact only against the forward-mode reference (NaN/inf from the reverse-mode one): "
              + ", ".join(r["key"] for r in fwd))
    for cls in DEFECTS:
        cases = [r for r in records if r["cls"] == cls]
        if not cases:
            continue
        p(f"\n== {cls} ({len(cases)}) ==")
        groups = collections.defaultdict(list)
        for r in cases:
            groups[normalized(r.get("message", "")) + " @ " + re.sub(r":\d+", "", r.get("where", ""))].append(r)
        for _, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            p(f"  [{len(rs)}] {rs[0].get('message', '')[:200]}" + (f"  ({rs[0]['where']})" if rs[0].get("where") else ""))
            for r in rs:
                flags = "".join([" coupled" if r.get("coupled_ref") else "", " warned" if r.get("warned") else "",
                                 " random" if r.get("random") else "", " sparse" if r.get("sparse") else "",
                                 " (reference fails too)" if r.get("note", "").startswith("the reference fails too")
                                 else f" [{r['note'][:100]}]" if r.get("note") else ""])
                p(f"      {r['key']}  in={r.get('in_shape')} out={r.get('out_shape')}{flags}")
    maybe = [r for r in records if r["cls"] == "refused" and r.get("coupled_ref") is False and not r.get("random")]
    if maybe:
        p(f"\n== refused although the reference shows independent samples ({len(maybe)}) ==")
        groups = collections.defaultdict(list)
        for r in maybe:
            groups[normalized(r["message"])[:110]].append(r)
        for msg, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            p(f"  [{len(rs)}] {rs[0]['message'][:200]}")
            p("      " + ", ".join(f"{r['name']}#{r['sample']}:{r['variant']} in={r.get('in_shape')}" for r in rs))
    exists = [r for r in records if r["cls"] == "refused" and r.get("ref_ok")]
    if exists:
        p(f"\n== refused although the reference computed the second derivative ({len(exists)}) ==")
        groups = collections.defaultdict(list)
        for r in exists:
            groups[normalized(r["message"])[:110]].append(r)
        for msg, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            p(f"  [{len(rs)}] {rs[0]['message'][:200]}")
            p("      " + ", ".join(f"{r['name']}#{r['sample']}:{r['variant']}+{r['part']} in={r.get('in_shape')}"
                                   for r in rs))
    for cls, top in (("refused", 40), ("skipped", 15)):
        groups = collections.Counter(normalized(r.get("message", "")) for r in records if r["cls"] == cls)
        if groups:
            p(f"\n== {cls}: most common messages ==")
            for msg, n in groups.most_common(top):
                p(f"  {n:5d}  {msg}")


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", action="store_true", help="only op_db (default: op_db and module_db)")
    ap.add_argument("--modules", action="store_true", help="only module_db")
    ap.add_argument("--filter", help="only ops/modules whose name contains this substring")
    ap.add_argument("--limit", type=int, help="at most this many ops/modules")
    ap.add_argument("--samples", type=int, default=3, help="sample inputs per op (per module and mode); default 3")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "chunkjac_catalogue.jsonl"),
                    help="the JSON-lines file of every case (default: chunkjac_catalogue.jsonl in the temp dir)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--timeout", type=float, help="seconds per case before it counts as a hang (default 60, "
                    "with --second 120)")
    ap.add_argument("--second", action="store_true", help="second derivatives: chunkjac.laplacian and "
                    "chunkjac.hessian(part='diagonal' / 'full') against reverse over reverse")
    ap.add_argument("--ref-timeout", type=float, default=300.0, help="with --second: seconds the reference "
                    "may take per case after chunkjac answered; past it the case is skipped (default 300)")
    ap.add_argument("--parts", default=",".join(PARTS), help="with --second: the parts to run, comma-separated "
                    f"(default {','.join(PARTS)})")
    ap.add_argument("--quick", action="store_true", help="a representative subset, under 3 minutes")
    ap.add_argument("--one-process", action="store_true", help="keep chunkjac's remembered decisions across cases "
                    "(each worker runs every case it gets in one interpreter without probe_cache.clear()): where a "
                    "decision wrongly remembered for a look-alike function shows. With --jobs 1, one process")
    ap.add_argument("--summary", metavar="JSONL", help="only print the summary of an earlier run's file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker()
    if args.timeout is None:
        args.timeout = 120.0 if args.second else 60.0
    if args.second:
        args.second = [p.strip() for p in args.parts.split(",") if p.strip()]
        if not args.second or set(args.second) - set(PARTS):
            ap.error(f"--parts: choose from {', '.join(PARTS)}")
    else:
        args.second = None
    if args.summary:
        with open(args.summary) as fh:
            return summarize([json.loads(l) for l in fh if l.strip()])
    units = list_units(args)
    print(f"{len(units)} ops/modules, up to {args.samples} samples each, {args.jobs} workers"
          + (", decisions kept across cases (one process per worker)" if args.one_process else "")
          + (f", second derivatives ({', '.join(args.second)})" if args.second else "") + f" -> {args.out}",
          file=sys.stderr)
    t0 = time.time()
    records = Driver(units, args).run()
    summarize(records)
    print(f"\n{time.time() - t0:.0f} s; every case in {args.out}")
    return 1 if any(r["cls"] in DEFECTS for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
