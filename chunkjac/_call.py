"""The call: ``compute`` and ``plan`` run the pipeline spec → coupling → plan → check → executor → sink.

The public face (``chunkjac/__init__.py``) re-exports these; the work lives in the modules they call.
"""
from __future__ import annotations

from typing import Any, Callable

import dataclasses
import warnings

import torch

from ._budget import parse_budget
from ._check import check_forward_mode
from ._coupling import Coupling, coupled, independent, unsplittable
from ._detect import check as check_coupling, state_key
from ._dump import open_output
from ._errors import CouplingWarning, TooLongError
from ._executor import execute
from ._memory import free_bytes
from ._plan import Plan, make_coupled_plan, make_plan
from ._probe import ProbeCache
from ._spec import Spec, normalize

probe_cache = ProbeCache()
"""The probe results ``compute`` and ``plan`` reuse across calls; ``probe_cache.clear()`` empties it."""

MAX_SECONDS = 3600.0


def _resolve_coupling(spec: Spec) -> Coupling:
    """coupling="auto": run the check (see _detect), cached with the probe; warn when samples interact."""
    if spec.coupling != "auto":
        return spec.coupling
    # The check's answer depends on values, not only on shapes: re-run it when anything fn holds or
    # is given changes (see state_key).
    key = probe_cache.key(spec, str(spec.device), "coupling", spec.batch_size, state_key(spec))
    found = probe_cache.get(key, spec.fn, lambda: check_coupling(spec))
    b = spec.batch_size
    if found.derivatives:
        warnings.warn(CouplingWarning(
            f"chunkjac: samples interact: {found.reason}. The sum trick would be wrong, so chunkjac computes "
            f"the exact per-sample blocks as coupled samples: one forward over all {b:,} samples and a product "
            f"per (sample, row); chunkjac.plan(...) shows the cost. If only some samples interact, pass "
            "coupling=<group ids> or a dependency structure (much faster); coupling='coupled' silences this."),
            stacklevel=4)
        return coupled(b, found.reason)
    if not found.splittable:
        warnings.warn(CouplingWarning(
            f"chunkjac: the forward pass mixes samples: {found.reason}. The derivatives w.r.t. wrt are "
            f"per-sample, so the sum trick is exact, but only on the whole batch: chunkjac runs all {b:,} samples "
            "as one chunk. coupling='unsplittable' silences this."), stacklevel=4)
        return unsplittable(b, found.reason)
    return independent(b, found.reason)


def _versions(inputs) -> list:
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    # (Inference tensors have no version counter, and fn cannot write to them outside inference mode.)
    return [(k, a, a._version) for k, a in enumerate(args) if isinstance(a, torch.Tensor) and not a.is_inference()]


def _check_unmodified(inputs, versions) -> None:
    """chunkjac runs fn on views of the inputs (no copy): an in-place write there (under no_grad,
    where autograd does not stop it) changes the caller's tensor and every later chunk's input."""
    for k, a, v in versions:
        if a._version != v:
            raise RuntimeError(
                f"chunkjac: fn modified input {k} in place (its version counter moved from {v} to {a._version}), "
                "so the caller's tensor has changed and the Jacobians are not those of the inputs you passed. "
                "Write fn without in-place operations on its inputs (x = x / 2, not x /= 2), or clone inside fn.")


def _prepare(fn, inputs, wrt, output, in_dims, mode, coupling, create_graph, return_outputs, budget, device,
             chunk_size, max_seconds):
    spec = normalize(fn, inputs, wrt=wrt, output=output, in_dims=in_dims, mode=mode, coupling=coupling,
                     create_graph=create_graph, return_outputs=return_outputs, device=device)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunkjac: chunk_size must be a positive int or None, got {chunk_size!r}.")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ValueError(f"chunkjac: max_seconds must be a positive number or None, got {max_seconds!r}.")
    budget_bytes = parse_budget(budget, free_bytes(spec.device))
    spec = dataclasses.replace(spec, coupling=_resolve_coupling(spec))
    if spec.coupling.kind == "independent":
        p = make_plan(spec, spec.device, budget_bytes, chunk_size=chunk_size, cache=probe_cache)
    else:
        p = make_coupled_plan(spec, spec.coupling, spec.device, budget_bytes, chunk_size=chunk_size,
                              cache=probe_cache, max_seconds=max_seconds)
    if return_outputs and p.num_chunks > 1 and not p.batched_outputs:
        raise ValueError(
            f"chunkjac: return_outputs=True, but fn returns a tensor without the batch in its leading dim, "
            f"and the plan runs {p.num_chunks} chunks, each giving its own value for it. Return per-sample "
            "tensors only, or leave return_outputs=False and compute that output separately.")
    return spec, p


def compute(
    fn: Callable,
    inputs: Any,
    *,
    wrt: Any = 0,
    output: Any = None,
    in_dims: Any = 0,
    mode: str = "auto",
    coupling: Any = "auto",
    create_graph: bool = False,
    return_outputs: bool = False,
    budget: int | str | None = None,
    device: Any = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    max_seconds: float | None = MAX_SECONDS,
    out: Any = None,
    resume: bool = True,
):
    """Per-sample Jacobians ``J[i] = d fn(x)_i / d x_i`` for every sample i of a batch.

    Args:
        fn: a callable or ``nn.Module``; ``fn(*inputs)`` returns a tensor (B, *out) whose leading dim
            holds the samples, or a tuple/list/dict of outputs (then pick one with ``output``).
        inputs: one tensor (or numpy array), or a tuple of positional arguments. Numpy arrays are
            converted (memmaps and read-only arrays are read chunk by chunk); a map-style Dataset
            gives one positional input per position of its items; values that are not tensors are
            passed through unchanged.
        wrt: what to differentiate with respect to: an input index (int, default 0), a parameter or
            buffer of ``fn`` (its name, or the ``nn.Parameter`` itself), or a tuple of those (then a
            tuple of Jacobians is returned, in the same order).
        output: index or key of the output to differentiate when ``fn`` returns several.
        in_dims: the batch dim of each input, as in ``torch.vmap``: an int for every tensor input,
            or a tuple with one int or None per input. None marks an input shared by all samples.
        mode: ``"reverse"`` (one batched VJP per per-sample output element), ``"forward"`` (one
            batched JVP per per-sample input element) or ``"auto"``: the faster of the two, measured
            on small chunks. Shared tensors (parameters, unbatched inputs) always use forward mode.
        coupling: which samples interact. ``"auto"`` (default) checks on the first 64 samples and warns
            (CouplingWarning) when it leaves the sum trick; ``"independent"`` asserts no interaction;
            ``"coupled"``: all samples may interact; ``"unsplittable"``: per-sample derivatives, but
            the forward pass needs the whole batch; a (B,) tensor of group ids; a (2, E) edge index,
            sparse (B, B) adjacency or neighbour lists. Cost grows with the colours (see _coupling).
        create_graph: return Jacobians (and outputs) connected to the autograd graph, so a loss on
            them can be differentiated again (physics-informed training). Off, results are detached.
        return_outputs: also return fn's full outputs for the whole batch, computed in the same pass.
        budget: memory chunkjac may use on the compute device: ``"20GB"``, ``"512MiB"``, an int of
            bytes, ``"80%"`` of the free memory, or None for half of it. Larger budgets allow larger
            chunks (fewer Python round trips); beyond the cache-friendly chunk they do not help.
            On the CPU the result itself is not counted: it is the output you asked for.
        device: where to compute (``"cuda"``, ``"cuda:1"``, ``"cpu"``); default: where fn's
            parameters are, else where the inputs are. Inputs elsewhere stream there chunk by chunk;
            results come back to where the inputs live.
        chunk_size: samples per chunk, overriding the planner.
        progress: a progress bar on stderr: True, False, or None for "when the run is predicted to
            take over 10 s and stderr is a terminal".
        max_seconds: refuse (TooLongError) a coupled plan predicted to take longer; None: no limit.
        out: where the result goes: None (new memory; refused, with advice, when it would not fit),
            a preallocated tensor of the result's shape and dtype (a tuple of them for a tuple wrt),
            or a path to a ``.npy`` file, created at its final shape and filled chunk by chunk, with a
            manifest next to it (``path + ".chunkjac.json"``) that makes the dump resumable. The call
            returns ``out`` (for a path: a CPU tensor sharing memory with the file).
        resume: with a path ``out`` whose manifest matches this call, skip the chunks already on disk
            (a complete dump is a no-op); False starts the file over. A manifest of a different call
            is refused either way.

    Returns:
        For a batched input x of shape (B, *in) and output y of shape (B, *out): a tensor of shape
        (B, *out, *in). For a shared tensor θ: (B, *out, *θ.shape). With a tuple ``wrt``, a tuple of
        those; with ``return_outputs=True``, ``(J, outputs)``. J has the output's dtype.

    Raises:
        BudgetError: the budget cannot hold even one sample (the message says what would).
        TooLongError: a coupled plan is predicted to take longer than ``max_seconds``.

    Cost: reverse mode runs one forward and n_out VJPs over the batch; forward mode n_in JVPs, where
    n_out and n_in are per-sample element counts; ``chunkjac.plan`` shows the choice and estimates.

    Example:
        >>> f = torch.nn.Sequential(torch.nn.Linear(5, 2), torch.nn.Sigmoid(), torch.nn.Linear(2, 10))
        >>> chunkjac.compute(f, torch.randn(3, 5)).shape
        torch.Size([3, 10, 5])
    """
    versions = _versions(inputs)
    spec, p = _prepare(fn, inputs, wrt, output, in_dims, mode, coupling, create_graph, return_outputs, budget,
                       device, chunk_size, max_seconds)
    _check_unmodified(inputs, versions)
    if p.too_long:
        raise TooLongError(f"chunkjac: refusing a run predicted to take too long.\nplan: {p}")
    o = open_output(spec, p, out, resume)
    try:
        if not o.complete:
            check_forward_mode(spec, o.plan)
        result = execute(spec, o.plan, progress=progress, sink=o.sink, units=o.units, skip=o.skip)
    finally:
        o.sink.close()  # a failed dump must not keep its lock for as long as its traceback lives
    _check_unmodified(inputs, versions)
    return result


def plan(
    fn: Callable,
    inputs: Any,
    *,
    wrt: Any = 0,
    output: Any = None,
    in_dims: Any = 0,
    mode: str = "auto",
    coupling: Any = "auto",
    create_graph: bool = False,
    return_outputs: bool = False,
    budget: int | str | None = None,
    device: Any = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    max_seconds: float | None = MAX_SECONDS,
) -> Plan:
    """The :class:`Plan` ``compute`` would carry out with the same arguments, without computing any
    Jacobian (it probes fn on a few small chunks). ``print(plan)`` gives a one-line report."""
    versions = _versions(inputs)
    p = _prepare(fn, inputs, wrt, output, in_dims, mode, coupling, create_graph, return_outputs, budget,
                 device, chunk_size, max_seconds)[1]
    _check_unmodified(inputs, versions)
    return p
