"""The pipeline of one validated call (a :class:`~chunkjac._request.Request`): coupling → plan →
checks → executor → sink. The public functions (``_api``) build the request; this runs it.
"""
from __future__ import annotations

import dataclasses
import logging
import types
from typing import Callable, NamedTuple

import numpy as np
import torch

from . import _distributed, _manifest
from ._budget import parse_budget
from ._check import check_higher_order, forward_mode_verdict
from ._coupling import Coupling, coupled, independent, unsplittable
from ._declared import check as check_declared
from ._detect import check as check_coupling
from ._dump import finished, open_output, preflight
from ._probe import probe
from ._errors import CouplingWarning, TooLongError, first_line, is_out_of_memory, warn
from ._executor import _result as result_of, execute
from ._function import FnError, as_it_was, missing_batch_dim, preserved_buffers
from ._memo import ProbeCache, Watch, argument_key, identity, watch
from ._memory import free_bytes
from ._plan import Plan
from ._plancache import PlanCache
from ._planner import estimate, make_coupled_plan, make_plan
from ._request import Request
from ._spec import Spec, evolve
from ._strategies import STRATEGIES
from ._writes import written_inputs

log = logging.getLogger("chunkjac")
probe_cache = ProbeCache()
"""The decisions and probe results calls reuse (see [What a remembered decision is keyed on] in
_memo): ``probe_cache.clear()`` empties it, ``probe_cache.enabled = False`` decides at every call."""
plan_cache = PlanCache()
"""Plans runs settled on, kept on disk for the next process (see [A plan that survives the process]
in _plancache): ``plan_cache.clear()`` empties it, ``plan_cache.enabled = False`` (or the environment's
CHUNKJAC_PLAN_CACHE=0) neither reads nor writes it."""


def run(req: Request):
    """compute / hessian / laplacian: the result (or ``out``, filled). fn's modules are left as they
    were, whatever happens (see _function.as_it_was)."""
    job = _distributed.join(req.out) if req.dump else None
    seen = watch(req.spec)
    with as_it_was(seen.modules) as also:
        written = _written(req, seen)
        also(written)
        if job is not None:
            return _run_sharded(job, req, seen, written)
        versions = _versions(req.spec.args, written)
        _preflight(req)
        done = _finished_dump(req)
        if done is not None:
            return done
        spec, p, settle = prepare(req, seen)
        _check_unmodified(spec.args, versions)
        _refuse_too_long(p)
        o = open_output(spec, p, req.out, req.resume)
        try:
            _check_resumed_plan(spec, o, p)
            result = execute(spec, o.plan, progress=req.progress, sink=o.sink, units=o.units, skip=o.skip,
                             decided=settle)
        except KeyboardInterrupt:
            if o.units is None:
                raise
            done = o.sink.saved()
            raise KeyboardInterrupt(
                f"chunkjac: interrupted: {done} of {len(o.units)} chunks are saved in {req.out}; run the same call "
                "again to resume.") from None
        finally:
            if o.sink is not None:
                o.sink.close()  # a failed dump must not keep its lock for as long as its traceback lives
        _check_unmodified(spec.args, versions)
        return result


def plan_only(req: Request) -> Plan:
    """chunkjac.plan: what ``run`` would carry out."""
    seen = watch(req.spec)
    with as_it_was(seen.modules) as also:
        written = _written(req, seen)
        also(written)
        versions = _versions(req.spec.args, written)
        _preflight(req)
        spec, p, _ = prepare(req, seen)
        with preserved_buffers(spec.fn):
            p = estimate(spec, p, probe_cache)  # a plan asked for shows what the run will take
        _check_unmodified(req.spec.args, versions)
    return p


def _preflight(req: Request) -> None:
    """A dump the disk cannot hold is refused after the first probe (fn's output shape), before the
    coupling check and the plan (see _dump.preflight); a probe that fails is left to the planning."""
    if not req.dump or req.plan is not None:
        return
    spec = req.spec
    key = probe_cache.key(spec, str(spec.device))
    try:
        found = probe_cache.get(None if key is None else key + ("probe",), spec.fn, lambda: probe(spec))
    except Exception:  # noqa: BLE001 - fn needs the whole batch, say: the planning finds out
        return
    preflight(spec, found.out_shape, found.dtype, req.out)


def _finished_dump(req: Request):
    """A dump already complete: its files, before any planning (what compute returns), or None."""
    if not req.dump or req.plan is not None or not req.resume:
        return None
    spec = req.spec
    key = probe_cache.key(spec, str(spec.device))
    try:
        found = probe_cache.get(None if key is None else key + ("probe",), spec.fn, lambda: probe(spec))
    except Exception:  # noqa: BLE001 - fn needs the whole batch, say: the planning finds out
        return None
    arrays = finished(spec, found.out_shape, found.dtype, req.out, not isinstance(req.coupling, str) or
                      req.coupling != "auto")
    if arrays is None:
        return None
    shape = types.SimpleNamespace(batch_size=spec.batch_size, out_shape=found.out_shape)  # what _result reads
    return result_of(spec, shape, arrays, None)


def _written(req: Request, seen: Watch) -> list:
    """The shared inputs fn writes in place, to be put back after the call; a refusal when it writes
    into a batched one (see [Writes into the inputs] in _writes). Found once per remembered decision."""
    spec = req.spec
    key = None if seen.key is None else (identity(spec.fn), "writes", str(spec.device), seen.key)
    return [spec.args[i] for i in probe_cache.get(key, spec.fn, lambda: written_inputs(spec))]


def _versions(args, written=()) -> list:
    """The inputs' in-place versions, but those of shared inputs fn is known to write (put back
    after the call, see _writes). (Inference tensors have no version counter, and fn cannot write to
    them outside inference mode.)"""
    return [(k, a, a._version) for k, a in enumerate(args) if isinstance(a, torch.Tensor) and not a.is_inference()
            and not any(a is w for w in written)]


def _check_unmodified(args, versions) -> None:
    """chunkjac runs fn on views of the inputs (no copy): an in-place write there (under no_grad,
    where autograd does not stop it) changes the caller's tensor and every later chunk's input."""
    for k, a, v in versions:
        if a._version != v:
            raise RuntimeError(
                f"chunkjac: fn modified input {k} in place (its version counter moved from {v} to {a._version}), "
                "so the caller's tensor has changed and the Jacobians are not those of the inputs you passed. "
                "Write fn without in-place operations on its inputs (x = x / 2, not x /= 2), or clone inside fn.")


class Decision(NamedTuple):
    """What ``prepare`` decided: the spec (coupling and mode resolved), the plan, and ``settle(plan)``
    for the plan a run settles on after timing the plan's trials (remembered in place of it)."""

    spec: Spec
    plan: Plan
    settle: Callable[[Plan], None]


def prepare(req: Request, seen: Watch) -> Decision:
    """The spec with its coupling and mode decided, and the plan: a recorded one (``plan=``), one
    remembered from an earlier call with the same guard (see [What a remembered decision is keyed on]
    in _memo), or a new one (from a plan an earlier process settled on, see _plancache, where there
    is one). ``seen``: the walk of fn and the inputs (``watch``)."""
    spec = req.spec
    if req.plan is not None:
        spec, p = _pinned(req)
        _check_outputs(p, spec.return_outputs)
        return Decision(spec, own_operator(p, spec), lambda q: None)
    key = _decision_key(req, seen.key)
    coupling, mode, p, warning, on_disk = probe_cache.get(key, spec.fn, lambda: _decide(req, seen.key),
                                                          every=probe_cache.recheck_every, state=seen.state)
    if warning is not None:
        warn(warning, CouplingWarning)
    spec = evolve(spec, coupling=coupling, mode=mode)
    _check_outputs(p, spec.return_outputs)
    p = own_operator(p, spec)

    def settle(q: Plan) -> None:
        probe_cache.update(key, lambda v: (*v[:2], q, *v[3:]))
        plan_cache.store(on_disk, q)

    return Decision(spec, p, settle)


def own_operator(p: Plan, spec: Spec) -> Plan:
    """``p`` computing this call's operator: a plan remembered (or given) for an operator of the same
    structure holds that call's, whose seed or per-sample weights may differ (see Operator)."""
    if spec.part is None or (p.part is spec.part and all(q.part is spec.part for q in p.trials)):
        return p
    return dataclasses.replace(p, part=spec.part, trials=tuple(dataclasses.replace(q, part=spec.part)
                                                               for q in p.trials))


def _decision_key(req: Request, guard: tuple | None) -> tuple | None:
    """Everything a call's decision depends on: fn, its inputs and the torch state (``guard``, from
    ``watch``) and the options; None when fn cannot be guarded (decided anew)."""
    if guard is None:
        return None
    spec = req.spec
    return (identity(spec.fn), "call", str(spec.device), guard, spec.batch_size, spec.mode,
            tuple((t.kind, t.index, t.name) for t in spec.targets), repr(spec.output), spec.create_graph,
            argument_key(req.coupling), repr(req.budget), req.chunk_size, req.max_seconds, spec.part,
            spec.return_jacobian, spec.to_memory, req.check_coupling, _projection_key(spec))


def _check_outputs(p: Plan, return_outputs: bool) -> None:
    if return_outputs and p.num_chunks > 1 and not p.batched_outputs:
        raise ValueError(
            f"chunkjac: return_outputs=True, but fn returns a tensor without the batch in its leading dim, "
            f"and the plan runs {p.num_chunks} chunks, each giving its own value for it. Return per-sample "
            "tensors only, or leave return_outputs=False and compute that output separately.")


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
            "coupling=<group ids> or a dependency structure (much faster); coupling='coupled' silences this."
            + missing_batch_dim(spec))
    if not found.splittable:
        return unsplittable(b, found.reason), (
            f"chunkjac: the forward pass mixes samples: {found.reason}. The derivatives w.r.t. wrt are "
            f"per-sample, so the sum trick is exact, but only on the whole batch: chunkjac runs all {b:,} samples "
            "as one chunk. coupling='unsplittable' silences this." + missing_batch_dim(spec))
    return independent(b, found.reason), None


def _decide(req: Request, guard: tuple | None = None) -> tuple[Coupling, str, Plan, str | None, str | None]:
    """(coupling, mode, plan, warning text, plan cache key): the coupling check, the plan (from the
    plan cache's entry where ``guard`` finds one), the strategy's checks."""
    spec = req.spec
    free = free_bytes(spec.device)
    budget_bytes = parse_budget(req.budget, free)
    on_disk = plan_cache.key(guard, _options(req), spec.device, budget_bytes, free)
    coupling, warning = _resolve_coupling(spec)
    spec = dataclasses.replace(spec, coupling=coupling)
    try:
        p = _make_plan(spec, req, budget_bytes, plan_cache.load(on_disk))
    except FnError as e:
        whole = _whole_batch(spec, e)
        if whole is None:
            spec, p = _per_sample_products(spec, req, budget_bytes, e)
        else:
            spec = dataclasses.replace(spec, coupling=whole)
            p = _make_plan(spec, req, budget_bytes)
    except RuntimeError as e:
        spec, p = _per_sample_products(spec, req, budget_bytes, e)
    if req.check_coupling:
        check_declared(spec, p)  # group ids or a graph: see [Checking a declared coupling]
    failed = STRATEGIES[p.strategy].check(spec, p)
    if failed is not None:
        if spec.mode != "auto":
            raise failed
        # auto: an op's forward-mode (or Taylor-mode) formula is wrong here (max_unpool with repeated
        # indices, linalg.solve's second derivatives), and reverse mode gives these derivatives exactly
        # (see [Why forward mode is cross-checked] and [Why Taylor mode is cross-checked] in _check).
        spec = dataclasses.replace(spec, mode="reverse")
        p = _make_plan(spec, req, budget_bytes)
    if p.trials:  # a candidate the run may switch to is checked as the plan is
        p = dataclasses.replace(p, trials=tuple(q for q in p.trials if STRATEGIES[q.strategy].check(spec, q) is None))
    if spec.create_graph and spec.part is not None:
        spec, p = _right_one_order_higher(spec, req, p, budget_bytes)
    if not p.trials:  # (with trials: the run's choice, see Decision.settle)
        plan_cache.store(on_disk, p)
    return spec.coupling, spec.mode, p, warning, on_disk


def _options(req: Request) -> tuple:
    """The call's options that shape a plan, as the plan cache keys them (see _plancache)."""
    spec = req.spec
    return (spec.batch_size, spec.mode, tuple((t.kind, t.index, t.name) for t in spec.targets), repr(spec.output),
            spec.create_graph, req.coupling if isinstance(req.coupling, str) else "declared", repr(req.budget),
            req.chunk_size, req.max_seconds, spec.part, spec.return_jacobian, spec.to_memory, req.check_coupling,
            _projection_key(spec))


def _projection_key(spec: Spec):
    return None if spec.project is None else tuple(spec.project.describe().items())


def _per_sample_products(spec: Spec, req: Request, budget_bytes: int, e: Exception) -> tuple[Spec, Plan]:
    """Independent samples and shared tensors (parameters), where neither forward mode nor the
    per-sample strategy (torch.func) can run fn: reverse mode with a product per (sample, output
    element), by plain autograd (see [Shared tensors in reverse mode] in coloured); else ``e``."""
    shared = any(not t.batched for t in spec.targets)
    if not shared or spec.part is not None or spec.mode == "forward" or spec.coupling.kind != "independent" \
            or is_out_of_memory(e):
        raise e
    each = Coupling("independent", spec.batch_size, colours=torch.arange(spec.batch_size),
                    reason="a product per sample for the shared tensors")
    alt = dataclasses.replace(spec, mode="reverse")
    try:
        p = make_coupled_plan(alt, each, spec.device, budget_bytes, chunk_size=req.chunk_size, cache=probe_cache,
                              max_seconds=None)
    except Exception:  # noqa: BLE001 - that cannot run either: the first failure says why
        raise e from None
    return alt, dataclasses.replace(p, wrt=_targets(spec))


def _right_one_order_higher(spec: Spec, req: Request, p: Plan, budget_bytes: int) -> tuple[Spec, Plan]:
    """create_graph=True: the route must be right when its results are differentiated again (see [Why
    create_graph is checked one order higher] in _check): the plan, or the other route, or a refusal."""
    why = check_higher_order(spec, p)
    if why is None:
        return spec, p
    route = STRATEGIES[p.strategy].route
    other = "reverse" if "forward" in p.modes else "forward"
    if spec.mode == "auto":
        alt = dataclasses.replace(spec, mode=other)
        try:
            q = _make_plan(alt, req, budget_bytes)
            ok = STRATEGIES[q.strategy].check(alt, q) is None and check_higher_order(alt, q) is None
        except Exception:  # noqa: BLE001 - the other route cannot run fn: the refusal below says why
            ok = False
        if ok:
            return alt, q
        raise ValueError(
            f"chunkjac: create_graph=True, but neither route differentiates fn's second derivatives right: by "
            f"{route}, {why}, and the other route fails too (PyTorch's higher derivative of an op in fn is wrong). "
            "Compute the second derivatives without create_graph, or rewrite the op (e.g. layer_norm by its "
            "definition).")
    raise ValueError(
        f"chunkjac: create_graph=True with mode={spec.mode!r}: by {route}, {why} (PyTorch's higher derivative "
        f"of an op in fn is wrong here). Pass mode='auto', which takes the route that is right, or "
        f"mode={other!r}.")


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


def _make_plan(spec: Spec, req: Request, budget_bytes: int, remembered: dict | None = None) -> Plan:
    if spec.coupling.kind == "independent":
        p = make_plan(spec, spec.device, budget_bytes, chunk_size=req.chunk_size, cache=probe_cache,
                      remembered=remembered)
    else:
        p = make_coupled_plan(spec, spec.coupling, spec.device, budget_bytes, chunk_size=req.chunk_size,
                              cache=probe_cache, max_seconds=req.max_seconds)
    return dataclasses.replace(p, wrt=_targets(spec))


def _targets(spec: Spec) -> tuple[str, ...]:
    return tuple(f"input {t.index}" if t.kind == "input" else f"parameter {t.name!r}" for t in spec.targets)


def _pinned(req: Request) -> tuple[Spec, Plan]:
    """A recorded plan (``plan=``): no check, probe or timing; the plan's coupling stands."""
    spec, given = req.spec, req.plan
    if given.part != spec.part:
        raise ValueError(f"chunkjac: plan= was made for {given.part or 'Jacobians'}, this call asks for "
                         f"{spec.part or 'Jacobians'}; make the plan with the same arguments (part=...).")
    mine = (spec.batch_size, tuple(t.numel for t in spec.targets), spec.device)
    theirs = (given.batch_size, given.in_numels, given.device)
    if mine != theirs or len(given.modes) != len(spec.targets):
        raise ValueError(
            f"chunkjac: plan= was made for another call: {given.batch_size:,} samples, wrt element counts "
            f"{given.in_numels} on {given.device}; this call has {spec.batch_size:,} samples, "
            f"{mine[1]} on {spec.device}. Make the plan with chunkjac.plan(...) and the same arguments.")
    wrt = _targets(spec)
    if given.wrt and given.wrt != wrt:
        raise ValueError(
            f"chunkjac: plan= was made for {', '.join(given.wrt)}; this call differentiates w.r.t. {', '.join(wrt)}. "
            "Make the plan with chunkjac.plan(...) and the same wrt.")
    if given.result_bytes and not spec.to_memory:
        raise ValueError("chunkjac: plan= was made for a result in new memory (its one chunk is the result, "
                         f"{given.result_bytes:,} bytes beyond the budget), but this call writes to out=, where a "
                         "chunk must fit the budget. Make the plan with chunkjac.plan(..., out=<the same out>).")
    coupling = given.coupling if given.coupling is not None else independent(spec.batch_size, "plan=")
    # As it is: a recorded plan's trials are not timed again (a training loop's every step would).
    return dataclasses.replace(spec, coupling=coupling), dataclasses.replace(given, trials=())


def _refuse_too_long(p: Plan) -> None:
    if p.too_long:
        raise TooLongError(f"chunkjac: refusing a run predicted to take too long.\nplan: {p}")


def _check_resumed_plan(spec: Spec, o, p: Plan) -> None:
    """A resumed dump runs its own recorded plan: cross-check its forward mode as a new plan is."""
    if not o.complete and o.plan is not p:
        mismatch = forward_mode_verdict(spec, o.plan)
        if mismatch is not None:
            raise mismatch


def _run_sharded(job: _distributed.Job, req: Request, seen: Watch, written: list):
    """A dump shared by the processes of a torch.distributed job: steps 2-5 of [Sharded dumps]."""
    device = _distributed.device_for(job, req.given["device"])
    o = None
    try:
        if device is not None and torch.device(device) != req.spec.device:
            req = req.remake(device=device)
        versions = _versions(req.spec.args, written)
        if job.rank != 0:
            given = job.receive("plan")  # rank 0's plan (even where each rank was given one), on this rank's device
            if device is not None:
                given = dataclasses.replace(given, device=torch.device(device))
            req = req.with_plan(given)
        spec, p, _ = prepare(req, seen)
        if job.rank == 0:
            job.publish("plan", p)
            log.info("chunkjac: plan, shared by %d processes: %s", job.world, p)
        _refuse_too_long(p)
        if job.rank == 0:
            o = open_output(spec, p, req.out, req.resume, job)
            units = o.units or []
            job.publish("open", (units, sorted(o.skip), o.complete))
        else:
            units, done, complete = job.receive("open")
            o = open_output(spec, p, req.out, True, job)
            o = dataclasses.replace(o, units=units, skip=frozenset(done), complete=complete)
        job.todo = [i for i in range(len(units)) if i not in o.skip]
        mine = set(job.share(job.todo))
        _check_resumed_plan(spec, o, p)
        # (The executor's last act, sink.jacobians(), lists this rank's last chunks in its record.)
        execute(spec, o.plan, progress=req.progress, sink=o.sink, units=units,
                skip=frozenset(i for i in range(len(units)) if i not in mine), job=job)
        _check_unmodified(spec.args, versions)
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
