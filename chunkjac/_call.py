"""The call: ``compute`` and ``plan`` run the pipeline spec → coupling → plan → check → executor → sink.

The public face (``chunkjac/__init__.py``) re-exports these; the work lives in the modules they call.
"""
from __future__ import annotations

from typing import Any, Callable

import dataclasses
import functools
import logging
import warnings

import numpy as np
import torch

from . import _distributed, _manifest
from ._budget import parse_budget
from ._check import check_forward_mode, check_second_order
from ._coupling import Coupling, coupled, independent, unsplittable
from ._function import FnError
from ._detect import check as check_coupling, state_key, structure_key
from ._dump import open_output
from ._errors import CouplingWarning, ForwardModeMismatch, TooLongError, first_line, passes_through
from ._executor import execute
from ._memory import free_bytes
from ._plan import Plan, make_coupled_plan, make_plan
from ._probe import ProbeCache, _identity
from ._spec import Spec, normalize

log = logging.getLogger("chunkjac")
probe_cache = ProbeCache()
"""The probe results ``compute`` and ``plan`` reuse across calls; ``probe_cache.clear()`` empties it."""

MAX_SECONDS = 3600.0


def _resolve_coupling(spec: Spec) -> tuple[Coupling, str | None]:
    """coupling="auto": run the check (see _detect); the coupling, and the CouplingWarning's text when
    the check leaves the sum trick."""
    if spec.coupling != "auto":
        return spec.coupling, None
    if not any(t.numel for t in spec.targets):  # an empty Jacobian: no entry to be coupled
        return independent(spec.batch_size, "the Jacobian is empty"), None
    found = check_coupling(spec)
    b = spec.batch_size
    if found.derivatives:
        return coupled(b, found.reason), (
            f"chunkjac: samples interact: {found.reason}. The sum trick would be wrong, so chunkjac computes "
            f"the exact per-sample blocks as coupled samples: one forward over all {b:,} samples and a product "
            f"per (sample, row); chunkjac.plan(...) shows the cost. If only some samples interact, pass "
            "coupling=<group ids> or a dependency structure (much faster); coupling='coupled' silences this.")
    if not found.splittable:
        return unsplittable(b, found.reason), (
            f"chunkjac: the forward pass mixes samples: {found.reason}. The derivatives w.r.t. wrt are "
            f"per-sample, so the sum trick is exact, but only on the whole batch: chunkjac runs all {b:,} samples "
            "as one chunk. coupling='unsplittable' silences this.")
    return independent(b, found.reason), None


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
             chunk_size, max_seconds, given: Plan | None = None, part: str | None = None,
             return_jacobian: bool = False, flat: bool = False, to_memory: bool = True):
    spec = normalize(fn, inputs, wrt=wrt, output=output, in_dims=in_dims, mode=mode, coupling=coupling,
                     create_graph=create_graph, return_outputs=return_outputs, device=device, part=part,
                     return_jacobian=return_jacobian, flat=flat)
    spec = dataclasses.replace(spec, to_memory=to_memory)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunkjac: chunk_size must be a positive int or None, got {chunk_size!r}.")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise ValueError(f"chunkjac: max_seconds must be a positive number or None, got {max_seconds!r}.")
    if given is not None:
        spec, p = _pinned(spec, given)
        _check_outputs(p, return_outputs)
        return spec, p
    # NOTE: [When the verdict is checked again]
    # What a call decides (the coupling verdict, the forward-mode cross-check, the plan) is kept while
    # fn's structure stays (its code, module classes, training flags, hooks, tensor names/shapes/
    # dtypes/devices and the inputs' shapes: see structure_key), not its values: an optimizer step
    # changes every parameter in place, and deciding again then would tax every training step (2.5x
    # a hand-written step, measured). Values could only change the verdict through data-dependent
    # paths (a gate initialised at zero decouples the samples until the first step moves it); against
    # those everything is decided again after 1, 2, 4, 8, ... calls with the same structure and new
    # values (state_key: the tensors' in-place versions; calls on unchanged values cannot change the
    # answer and do not count), the gap doubling up to probe_cache.recheck_every (default 100) and
    # staying there: about 7 checks in a run's first 100 steps, then 1% of the steps.
    # probe_cache.recheck_every = 1 decides at every call with new values.
    # With budget=None (half the free memory) the chunk size is likewise decided at those calls.
    # structure_key holds fn's modules, the inputs' layout and in_dims: the rest is the call's options.
    key = (_identity(spec.fn), "call", str(spec.device), structure_key(spec), spec.batch_size, spec.mode,
           tuple((t.kind, t.index, t.name) for t in spec.targets), repr(spec.output), spec.create_graph,
           _argument_key(coupling), repr(budget), chunk_size, max_seconds, spec.part, spec.return_jacobian, to_memory)
    coupling, mode, p, warning = probe_cache.get(
        key, spec.fn, lambda: _decide(spec, budget, chunk_size, max_seconds), every=probe_cache.recheck_every,
        state=state_key(spec))
    if warning is not None:
        warnings.warn(CouplingWarning(warning), stacklevel=4)
    spec = dataclasses.replace(spec, coupling=coupling, mode=mode)
    _check_outputs(p, return_outputs)
    return spec, p


def _check_outputs(p: Plan, return_outputs: bool) -> None:
    if return_outputs and p.num_chunks > 1 and not p.batched_outputs:
        raise ValueError(
            f"chunkjac: return_outputs=True, but fn returns a tensor without the batch in its leading dim, "
            f"and the plan runs {p.num_chunks} chunks, each giving its own value for it. Return per-sample "
            "tensors only, or leave return_outputs=False and compute that output separately.")


def _argument_key(v) -> tuple:
    """A coupling argument as a cache key: a string as itself, a tensor or array by identity and
    in-place version (a new edge_index, or one edited in place, decides again)."""
    # By content, never by id: a structure edited in place, or a new one at a freed one's address,
    # must not reuse the old decision.
    if isinstance(v, str):
        return (v,)
    if isinstance(v, torch.Tensor) and v.layout != torch.strided:
        v = v.coalesce().indices() if v.layout == torch.sparse_coo else v.to_sparse_coo().coalesce().indices()
    if isinstance(v, (torch.Tensor, np.ndarray)):
        a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
        return (type(v).__name__, a.shape, str(a.dtype), hash(np.ascontiguousarray(a).tobytes()))
    if isinstance(v, (list, tuple)):  # neighbour lists
        return ("lists", tuple(tuple(int(j) for j in row) if isinstance(row, (list, tuple))
                               else int(row) if isinstance(row, int) else _argument_key(row) for row in v))
    return (type(v).__name__, id(v))


def _decide(spec: Spec, budget, chunk_size, max_seconds) -> tuple[Coupling, str, Plan, str | None]:
    """(coupling, mode, plan, warning text): the coupling check, the plan, the forward-mode check."""
    budget_bytes = parse_budget(budget, free_bytes(spec.device))
    coupling, warning = _resolve_coupling(spec)
    spec = dataclasses.replace(spec, coupling=coupling)
    try:
        p = _make_plan(spec, budget_bytes, chunk_size, max_seconds)
    except FnError as e:
        whole = _whole_batch(spec, e)
        if whole is None:
            raise
        spec = dataclasses.replace(spec, coupling=whole)
        p = _make_plan(spec, budget_bytes, chunk_size, max_seconds)
    if spec.part is not None:
        why = check_second_order(spec, p)
        if why is not None:
            if spec.mode == "forward":
                raise ValueError(f"chunkjac: Taylor mode (mode='forward') cannot give fn's exact second derivatives: "
                                 f"{why}. Pass mode='auto' or mode='reverse' (reverse over reverse).")
            # See [Why Taylor mode is cross-checked]: reverse over reverse gives them exactly.
            spec = dataclasses.replace(spec, mode="reverse")
            p = _make_plan(spec, budget_bytes, chunk_size, max_seconds)
        return spec.coupling, spec.mode, p, warning
    mismatch = _forward_verdict(spec, p)
    if mismatch is not None:
        if spec.mode != "auto" or not mismatch.batched:
            raise mismatch
        # auto: an op's forward-mode formula is wrong here (max_unpool with repeated indices), and
        # reverse mode gives these derivatives exactly: plan that instead.
        spec = dataclasses.replace(spec, mode="reverse")
        p = _make_plan(spec, budget_bytes, chunk_size, max_seconds)
    return spec.coupling, spec.mode, p, warning


def _guarded(api):
    """The last line of "exact or a clear error": an exception that is neither chunkjac's own nor an
    out-of-memory error (fn's own failures are FnError already, see _function.call) comes from PyTorch
    while chunkjac differentiates; it is said as such, with the cause chained."""

    @functools.wraps(api)
    def run(*args, **kwargs):
        try:
            return api(*args, **kwargs)
        except Exception as e:
            if passes_through(e):
                raise
            why = (str(e).strip().splitlines() or [""])[0] or type(e).__name__
            if "derivative for" in why and "not implemented" in why:
                hint = ("fn uses an operation that PyTorch cannot differentiate, so no AD mode can give its "
                        "Jacobian: replace it with a differentiable one (or differentiate another input).")
            elif "donated buffers" in why:
                hint = ("fn is torch.compile'd, and its compiled backward frees its buffers after one use while "
                        "chunkjac needs several backward passes per forward: set torch._functorch.config."
                        "donated_buffer = False before compiling, or compile with backend='aot_eager'.")
            elif any(tb.tb_frame.f_code.co_filename.endswith(("grad_sample_module.py", "hooks.py"))
                     for tb in _frames(e.__traceback__)):
                hint = ("A backward hook of fn's module failed: hooks that expect one backward pass per forward "
                        "(Opacus's GradSampleModule: call .disable_hooks() first) cannot serve the several "
                        "backward passes a Jacobian takes.")
            else:
                hint = ("This is unexpected: please report it to chunkjac with the traceback (PyTorch's error is "
                        "chained below); mode='reverse' or coupling='independent' may avoid the failing path.")
            raise RuntimeError(f"chunkjac: PyTorch failed while chunkjac differentiated fn "
                               f"({type(e).__name__}: {why}). {hint}") from e

    return run


def _whole_batch(spec: Spec, e: FnError) -> Coupling | None:
    """fn failed on a part of the batch that the coupling allows as a chunk: the same structure (the
    colours) with one chunk, the whole batch. Graph layers are called so: x (N, F) nodes with a shared
    edge_index that names all N of them cannot run on a slice of the nodes, while the colours of that
    edge_index still say which nodes may share a product."""
    c = spec.coupling
    if c.bounds is not None and c.unit >= spec.batch_size:
        return None  # fn failed on the whole batch: its own error stands
    why = f"fn runs only on the whole batch (on a part: {first_line(e.__cause__ or e)})"
    if c.colours is None:
        return unsplittable(spec.batch_size, why)
    return dataclasses.replace(c, bounds=np.array([0, spec.batch_size]), reason=f"{c.reason}; {why}")


def _frames(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _make_plan(spec: Spec, budget_bytes: int, chunk_size, max_seconds) -> Plan:
    if spec.coupling.kind == "independent":
        return make_plan(spec, spec.device, budget_bytes, chunk_size=chunk_size, cache=probe_cache)
    return make_coupled_plan(spec, spec.coupling, spec.device, budget_bytes, chunk_size=chunk_size,
                             cache=probe_cache, max_seconds=max_seconds)


def _forward_verdict(spec: Spec, p: Plan) -> ForwardModeMismatch | None:
    """The cross-check of a forward-mode plan (see _check): None, or the disagreement."""
    if "forward" not in p.modes or p.part is not None:
        return None
    try:
        check_forward_mode(spec, p)
    except ForwardModeMismatch as e:
        return e
    return None


def _pinned(spec: Spec, given) -> tuple[Spec, Plan]:
    """A recorded plan (``plan=``): no check, probe or timing; the plan's coupling stands."""
    if not isinstance(given, Plan):
        raise TypeError(f"chunkjac: plan must be a chunkjac.Plan (from chunkjac.plan(...)) or None, got "
                        f"{type(given).__name__}.")
    mine = (spec.batch_size, tuple(t.numel for t in spec.targets), spec.device)
    theirs = (given.batch_size, given.in_numels, given.device)
    if given.part != spec.part:
        raise ValueError(f"chunkjac: plan= was made for {given.part or 'Jacobians'}, this call asks for "
                         f"{spec.part or 'Jacobians'}; make the plan with the same arguments (part=...).")
    if mine != theirs or len(given.modes) != len(spec.targets):
        raise ValueError(
            f"chunkjac: plan= was made for another call: {given.batch_size:,} samples, wrt element counts "
            f"{given.in_numels} on {given.device}; this call has {spec.batch_size:,} samples, "
            f"{mine[1]} on {spec.device}. Make the plan with chunkjac.plan(...) and the same arguments.")
    if given.result_bytes and not spec.to_memory:
        raise ValueError("chunkjac: plan= was made for a result in new memory (its one chunk is the result, "
                         f"{given.result_bytes:,} bytes beyond the budget), but this call writes to out=, where a "
                         "chunk must fit the budget. Make the plan with chunkjac.plan(..., out=<the same out>).")
    coupling = given.coupling if given.coupling is not None else independent(spec.batch_size, "plan=")
    return dataclasses.replace(spec, coupling=coupling), given


@_guarded
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
    plan: Plan | None = None,
    flat: bool = False,
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
            buffer of ``fn`` (its name, or the ``nn.Parameter`` itself), a tuple of those (then a
            tuple of Jacobians is returned, in the same order), a list of those (a dict keyed by the
            items, a Parameter by its name), or ``"params"``: every trainable parameter of the module,
            a dict name -> (B, *out, *param.shape) in ``named_parameters()`` order (a tied parameter
            once, under its first name, with its total derivative over every use).
        flat: with a dict result, one (B, *out, P) tensor instead: the Jacobians flattened and
            concatenated along the last dim in the dict's order.
        output: index or key of the output to differentiate when ``fn`` returns several.
        in_dims: the batch dim of each input, as in ``torch.vmap``: an int for every tensor input,
            or a tuple with one int or None per input. None marks an input shared by all samples.
        mode: ``"reverse"`` (one batched VJP per per-sample output element), ``"forward"`` (one
            batched JVP per per-sample input element) or ``"auto"``: the faster of the two, measured
            on small chunks. Shared tensors (parameters, unbatched inputs) always use forward mode.
        coupling: which samples interact. ``"auto"`` (default) checks three windows of 64 samples
            (first, middle, last; see [When the verdict is checked again] for when it re-checks) and
            warns (CouplingWarning) when it leaves the sum trick; ``"independent"`` asserts no interaction;
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
        plan: a :class:`Plan` recorded from ``chunkjac.plan(...)`` with the same arguments: run it as
            it is, without the coupling check, probes or timings (a training loop pays nothing per
            step for planning, and a dump gets the same plan in every process). Under
            ``torch.use_deterministic_algorithms(True)`` the planner itself chooses without timing.

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
    return _run(fn, inputs, wrt, output, in_dims, mode, coupling, create_graph, return_outputs, budget, device,
                chunk_size, progress, max_seconds, out, resume, plan, flat=flat)


def _run(fn, inputs, wrt, output, in_dims, mode, coupling, create_graph, return_outputs, budget, device, chunk_size,
         progress, max_seconds, out, resume, plan, part=None, return_jacobian=False, flat=False):
    job = _distributed.join(out)
    if job is not None:
        return _run_sharded(job, fn, inputs, wrt, output, in_dims, mode, coupling, create_graph, return_outputs,
                            budget, device, chunk_size, progress, max_seconds, out, resume, plan, part,
                            return_jacobian, flat)
    versions = _versions(inputs)
    spec, p = _prepare(fn, inputs, wrt, output, in_dims, mode, coupling, create_graph, return_outputs, budget,
                       device, chunk_size, max_seconds, given=plan, part=part, return_jacobian=return_jacobian,
                       flat=flat, to_memory=out is None)
    _check_unmodified(inputs, versions)
    _refuse_too_long(p)
    o = open_output(spec, p, out, resume)
    try:
        _check_resumed_plan(spec, o, p)
        result = execute(spec, o.plan, progress=progress, sink=o.sink, units=o.units, skip=o.skip)
    finally:
        o.sink.close()  # a failed dump must not keep its lock for as long as its traceback lives
    _check_unmodified(inputs, versions)
    return result


def _refuse_too_long(p: Plan) -> None:
    if p.too_long:
        raise TooLongError(f"chunkjac: refusing a run predicted to take too long.\nplan: {p}")


def _check_resumed_plan(spec: Spec, o, p: Plan) -> None:
    """A resumed dump runs its own recorded plan: cross-check its forward mode as a new plan is."""
    if not o.complete and o.plan is not p:
        mismatch = _forward_verdict(spec, o.plan)
        if mismatch is not None:
            raise mismatch


def _run_sharded(job: _distributed.Job, fn, inputs, wrt, output, in_dims, mode, coupling, create_graph,
                 return_outputs, budget, device, chunk_size, progress, max_seconds, out, resume, plan, part,
                 return_jacobian, flat):
    """A dump shared by the processes of a torch.distributed job: steps 2-5 of [Sharded dumps]."""
    device = _distributed.device_for(job, device)
    o = None
    try:
        versions = _versions(inputs)
        given = plan
        if job.rank != 0:
            given = job.receive("plan")  # rank 0's plan (even where each rank was given one), on this rank's device
            if device is not None:
                given = dataclasses.replace(given, device=torch.device(device))
        spec, p = _prepare(fn, inputs, wrt, output, in_dims, mode, coupling, create_graph, return_outputs, budget,
                           device, chunk_size, max_seconds, given=given, part=part,
                           return_jacobian=return_jacobian, flat=flat, to_memory=False)
        if job.rank == 0:
            job.publish("plan", p)
            log.info("chunkjac: plan, shared by %d processes: %s", job.world, p)
        _refuse_too_long(p)
        if job.rank == 0:
            o = open_output(spec, p, out, resume, job)
            units = o.units or []
            job.publish("open", (units, sorted(o.skip), o.complete))
        else:
            units, done, complete = job.receive("open")
            o = open_output(spec, p, out, True, job)
            o = dataclasses.replace(o, units=units, skip=frozenset(done), complete=complete)
        job.todo = [i for i in range(len(units)) if i not in o.skip]
        mine = set(job.share(job.todo))
        _check_resumed_plan(spec, o, p)
        # (The executor's last act, sink.jacobians(), lists this rank's last chunks in its record.)
        execute(spec, o.plan, progress=progress, sink=o.sink, units=units,
                skip=frozenset(i for i in range(len(units)) if i not in mine), job=job)
        _check_unmodified(inputs, versions)
        job.finish(lambda: _fold(o))
        o.sink.close()
    except Exception as e:
        if o is not None:
            o.sink.close()
        job.fail(e)
        if isinstance(e, _distributed.DistributedError):
            raise
        raise job.own_error(e) from e
    except BaseException as e:  # KeyboardInterrupt: the others stop too
        job.fail(e)
        raise
    return _reopen(o, spec)


def _fold(o) -> None:
    """Rank 0, every rank done: the ranks' records into the manifest, marked complete."""
    m = _manifest.load(o.sink.path)
    m["complete"] = len(m["done"]) == len(m["chunks"])
    _manifest.save(o.sink.path, m)


def _reopen(o, spec: Spec):
    """What compute returns for the dump: the finished files, opened again (on a network filesystem
    this process's pages of the other ranks' rows may be stale until the file is opened anew)."""
    arrays = [torch.from_numpy(np.lib.format.open_memmap(a.filename, mode="r+")) for a in o.sink.arrays]
    return arrays[0] if spec.keys is None else dict(zip(spec.keys, arrays))


@_guarded
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
    part: str | None = None,
    return_jacobian: bool = False,
    out: Any = None,
) -> Plan:
    """The :class:`Plan` ``compute`` would carry out with the same arguments, without computing any
    Jacobian (it probes fn on a few small chunks). ``print(plan)`` gives a one-line report. With
    ``part`` (and ``return_jacobian``): the plan of ``hessian(..., part=part)``. ``out``: where the
    result will go, as in ``compute`` (only whether it is new memory matters to the plan: a result in
    memory may be one chunk larger than the budget, see ``Plan.result_bytes``)."""
    versions = _versions(inputs)
    p = _prepare(fn, inputs, wrt, output, in_dims, mode, coupling, create_graph, return_outputs, budget,
                 device, chunk_size, max_seconds, part=part, return_jacobian=return_jacobian,
                 to_memory=out is None)[1]
    _check_unmodified(inputs, versions)
    return p


@_guarded
def hessian(
    fn: Callable,
    inputs: Any,
    *,
    part: str = "full",
    wrt: Any = 0,
    output: Any = None,
    in_dims: Any = 0,
    mode: str = "auto",
    coupling: Any = "auto",
    create_graph: bool = False,
    return_outputs: bool = False,
    return_jacobian: bool = False,
    budget: int | str | None = None,
    device: Any = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    max_seconds: float | None = MAX_SECONDS,
    out: Any = None,
    resume: bool = True,
    plan: Plan | None = None,
):
    """Per-sample second derivatives ``d^2 fn(x)_i / d x_i^2`` for every sample i of a batch.

    Args:
        part: ``"full"``: the Hessians, (B, *out, *in, *in); ``"diagonal"``: the pure second
            derivatives d^2 y / d x_k^2, (B, *out, *in); ``"laplacian"``: their sum over the input's
            elements, (B, *out).
        wrt: the batched input to differentiate twice (an index; one input).
        return_jacobian: also return the first derivatives (B, *out, *in), from the same pass.
        return_outputs: also return fn's outputs, from the same pass.
        mode: ``"auto"`` (measure both, see [Choosing a second-order strategy]), ``"forward"``
            (Taylor mode: one forward pass carries the value, the D first-order directions and the
            second-order terms) or ``"reverse"`` (reverse over reverse: 1 + D VJPs per output element).
        The others as in :func:`compute`: ``output``, ``in_dims``, ``coupling`` (coupled samples get exact
        per-sample blocks by colour groups, never the sum trick), ``create_graph`` (differentiate a
        loss on the results again: physics-informed training), ``budget``, ``device``,
        ``chunk_size``, ``progress``, ``max_seconds``, ``out`` (tensors, or a ``.npy`` path for one
        result, resumable), ``resume``, ``plan`` (from ``chunkjac.plan(..., part=part)``).

    Returns:
        The part; with ``return_jacobian`` ``(part, J)``; with ``return_outputs`` the outputs last:
        ``(part, outputs)`` or ``(part, J, outputs)``.

    Cost: Taylor mode runs fn once per chunk on stacks of 1 + D + s vectors (s = 1 for a Laplacian,
    D for the diagonal, D^2 for the full Hessian): about D + 2 forward passes' worth of matrix
    products for a Laplacian, and no backward pass; ``chunkjac.plan(..., part=...)`` shows the choice.

    Example:
        >>> u = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> chunkjac.hessian(u, torch.randn(5, 2)).shape
        torch.Size([5, 1, 2, 2])
    """
    return _run(fn, inputs, wrt, output, in_dims, mode, coupling, create_graph, return_outputs, budget, device,
                chunk_size, progress, max_seconds, out, resume, plan, part=part, return_jacobian=return_jacobian)


def laplacian(fn: Callable, inputs: Any, **kwargs):
    """Per-sample Laplacians ``sum_k d^2 fn(x)_i / d x_{i,k}^2``, shape (B, *out): ``hessian(fn, inputs,
    part="laplacian", **kwargs)``, by Taylor mode's forward Laplacian where fn allows.

    Example (a PINN's residual of the Poisson equation):
        >>> lap_u, u = chunkjac.laplacian(model, x, return_outputs=True, create_graph=True)
        >>> loss = ((lap_u - f(x)) ** 2).mean()
    """
    if "part" in kwargs:
        raise TypeError("chunkjac: laplacian() takes no part=; use chunkjac.hessian(..., part=...).")
    return hessian(fn, inputs, part="laplacian", **kwargs)
