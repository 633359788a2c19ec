"""The executor: carries a plan out, chunk by chunk, from the strategy into the sink.

It streams batched inputs to the compute device (on CUDA, the next chunk's copy overlaps the current
chunk's compute on a side stream), shows progress, times the plan's other candidates on its first
chunks (see [Timing on the run's first chunks]), and backs off on out-of-memory errors: free what
it can, halve the chunk, retry the same samples, keep the smaller size for the rest of the run.

# NOTE: [Timing on the run's first chunks]
# Candidates the cost model cannot tell apart (all rows in one vectorised call or one per call: sin
# runs 3x faster vectorised, the PINN MLP 1.3x faster looped) ride along with the plan as
# ``Plan.trials``, and the run's own first chunks time them, keeping their results (every candidate
# is exact; they differ in rounding only). The first chunk runs the plan (it pays the allocator's
# and the caches' first use); then the chunks alternate between a trial and the plan. A trial
# slower than the plan's best chunk so far is dropped after one chunk; one faster gets a second
# chunk, and the run switches to it only if its best is under SWITCH x the plan's best (single
# timings vary by 20-40% on a loaded 2-core machine: only a clear gap may switch). So a candidate
# that loses runs on one chunk of the run, and the planner offers trials only to runs of at least
# TRIAL_CHUNKS chunks per trial (see _planner). Only chunks of the full size are timed. What the
# run decided goes to ``decided`` (the call's memo and the plan cache keep it: the next call, or a
# rerun of the script, times nothing). Under torch.use_deterministic_algorithms(True) the planner
# offers no trials: every run computes the same bits.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from ._budget import format_bytes
from ._errors import BudgetError, is_out_of_memory, warn
from ._function import chunk_args
from torch.utils._pytree import tree_map
from ._inputs import Source
from ._plan import Plan
from ._sinks import MemorySink, _own_memory
from ._spec import Spec
from ._strategies import STRATEGIES

LONG_RUN_SECONDS = 10.0  # progress=None shows a bar for runs predicted to take longer
SWITCH = 0.8


def _show_progress(progress, plan: Plan) -> bool:
    if progress is None:
        long = plan.seconds is not None and plan.seconds > LONG_RUN_SECONDS
        return long and sys.stderr.isatty()
    return bool(progress)


class _Trials:
    """Which plan runs the next chunk, while the trials are timed (see [Timing on the run's first
    chunks]); ``plan`` once decided."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.queue = list(plan.trials)   # trials to time, in turn
        self.best: dict = {}             # id of a plan -> its best seconds per sample
        self.tries: dict = {}            # id of a trial -> chunks timed
        self.turn = 0
        self.done = not self.queue

    def next(self) -> Plan:
        """The plan for the next chunk: the plan on the first two (the first one untimed), then a trial
        and the plan in turn."""
        if self.done or self.turn < 2 or self.turn % 2:
            return self.plan
        return self.queue[0]

    def timed(self, q: Plan, seconds: float, n: int, full: bool) -> None:
        self.turn += 1
        if not full:  # a unit's short last chunk: not comparable
            return
        if q is self.plan and self.turn == 1:
            self.best[id(q)] = float("inf")  # the first chunk warms up: not counted
            return
        per = seconds / n
        self.best[id(q)] = min(self.best.get(id(q), float("inf")), per)
        if q is self.plan:
            return
        self.tries[id(q)] = self.tries.get(id(q), 0) + 1
        self.queue.pop(0)
        if per < self.best[id(self.plan)] and self.tries[id(q)] < 2:
            self.queue.append(q)  # faster once: once more, to be sure
        if not self.queue:
            self._decide()

    def failed(self, q: Plan) -> None:
        """A trial that could not run its chunk (out of memory): not a candidate."""
        self.queue = [t for t in self.queue if t is not q]
        self.best.pop(id(q), None)
        self.tries[id(q)] = 0
        if not self.queue:
            self._decide()

    def _decide(self) -> None:
        mine = self.best.get(id(self.plan), float("inf"))
        won = [(self.best[id(t)], k, t) for k, t in enumerate(self.plan.trials)
               if self.tries.get(id(t)) == 2 and self.best[id(t)] < SWITCH * mine]
        self.plan = min(won)[2] if won else self.plan
        self.plan = dataclasses.replace(self.plan, trials=())
        self.done = True


class _Loader:
    """Chunk inputs on the compute device. The next chunk is read ahead: on a background thread when
    inputs are read from files or a Dataset, and on CUDA with its host-to-device copy on a side stream."""

    def __init__(self, spec: Spec):
        self.spec = spec
        streams = spec.device.type == "cuda" and any(
            d is not None and a.device != spec.device for a, d in zip(spec.args, spec.in_dims))
        self.stream = torch.cuda.Stream(spec.device) if streams else None
        lazy = any(isinstance(a, Source) for a in spec.args)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="chunkjac-reader") if lazy else None
        self.ahead = None

    def _load(self, start: int, stop: int) -> list:
        if self.stream is None:
            return chunk_args(self.spec, start, stop)
        with torch.cuda.stream(self.stream):
            return chunk_args(self.spec, start, stop)

    def prefetch(self, start: int, stop: int) -> None:
        if self.pool is not None:
            self.ahead = ((start, stop), self.pool.submit(self._load, start, stop))
        elif self.stream is not None:
            self.ahead = ((start, stop), self._load(start, stop))

    def get(self, start: int, stop: int) -> list:
        if self.ahead is not None and self.ahead[0] == (start, stop):
            args = self.ahead[1]
            args = args.result() if isinstance(args, Future) else args
        else:
            self.drop()
            args = self._load(start, stop)
        self.ahead = None
        if self.stream is not None:
            current = torch.cuda.current_stream(self.spec.device)
            current.wait_stream(self.stream)
            for a in args:
                if isinstance(a, torch.Tensor) and a.device == self.spec.device:
                    a.record_stream(current)  # memory made on the side stream, used on this one
        return args

    def drop(self) -> None:
        if self.ahead is not None and isinstance(self.ahead[1], Future):
            self.ahead[1].cancel()
            try:
                self.ahead[1].result()
            except Exception:  # noqa: BLE001 - a read ahead that failed is read again, and fails there
                pass
        self.ahead = None

    def close(self) -> None:
        self.drop()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def execute(spec: Spec, plan: Plan, progress=None, sink=None, units: list[tuple[int, int]] | None = None,
            skip: frozenset = frozenset(), job=None, decided=None):
    """Run ``plan`` into ``sink`` (default: memory). ``units``: the chunks a dump records as done
    (``sink.done(i)`` after the last piece of unit i is written); those in ``skip`` are already on
    disk (or, in a sharded dump ``job``, another rank's share: see [Sharded dumps] in _distributed).
    Without units the whole batch is one unit. ``decided(plan)``: told the plan the run settled on
    after timing ``plan.trials`` (see [Timing on the run's first chunks]). Returns what compute returns."""
    if plan.trials and (job is not None or torch.are_deterministic_algorithms_enabled()):
        plan = dataclasses.replace(plan, trials=())  # a sharded job's ranks run one plan; see the NOTE
    if sink is None and units is None and plan.chunk_at(0)[1] >= plan.batch_size and \
            not _show_progress(progress, plan):
        # One chunk into memory (a training loop's every step): the strategy's tensors are the result,
        # with none of the streaming machinery around them.
        try:
            jacs, outputs = _chunk(spec, plan, chunk_args(spec, 0, plan.batch_size), plan.batch_size,
                                   plan.colours_at(0, plan.batch_size))
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            gc.collect()  # smaller chunks, below
        else:
            home = spec.home
            jacs = [_own_memory(j if j.device == home else j.to(home)) for j in jacs]
            if spec.return_outputs:
                outputs = tree_map(lambda v: v.to(home) if isinstance(v, torch.Tensor) else v, outputs)
            return _result(spec, plan, jacs, outputs)
    if sink is None:
        sink = MemorySink(plan.batch_size, differentiable=spec.create_graph, keep_outputs=spec.return_outputs,
                          device=spec.home)
    units = units or [(0, plan.batch_size)]
    todo = [(i, u) for i, u in enumerate(units) if i not in skip]
    loader = _Loader(spec)
    size = plan.chunk_size
    trials = _Trials(plan)
    # Samples on disk before this run (a sharded job's skip also holds the other ranks' shares).
    before = skip if job is None else frozenset(range(len(units))) - set(job.todo)
    already = sum(b - a for i, (a, b) in enumerate(units) if i in before)
    # No bar object at all when none is shown: a training loop calls this every step. Where the plan
    # predicts no time (nothing was timed to plan it), the first chunk's time decides (progress=None).
    lazy = progress is None and plan.seconds is None and job is None
    show = _show_progress(progress, plan) and (job is None or job.rank == 0)
    bars = contextlib.ExitStack()
    bar = _NoBar()

    def open_bar(initial: int):
        b = tqdm(total=plan.batch_size, initial=initial, unit="sample", unit_scale=True, desc="chunkjac",
                 dynamic_ncols=True) if show else _NoBar()
        if job is not None:  # one bar for the whole job, on rank 0: the samples every rank has finished
            b = _JobBar(b, job, initial, plan.batch_size if show else None)
        bars.enter_context(b)
        return b

    bar = open_bar(already)
    backed_off = False
    cuda = spec.device.type == "cuda"
    # (A Jacobian is not a training step: buffers that fn updates in place, BatchNorm's running
    # statistics in training mode, are put back by the caller: _function.as_it_was.)
    try:
        with bars:
            for k, (unit, (u0, u1)) in enumerate(todo):
                start = u0
                while start < u1:
                    q = trials.next()
                    stop = min(plan.chunk_at(start, size)[1], u1)
                    timing = not trials.done or lazy
                    failed = False
                    try:
                        args = loader.get(start, stop)
                        nxt = _next_piece(plan, size, stop, u1, todo, k)
                        if nxt is not None:
                            loader.prefetch(*nxt)
                        if timing and cuda:
                            torch.cuda.synchronize(spec.device)
                        t = time.perf_counter()
                        jacs, outputs = _chunk(spec, q, args, stop - start, plan.colours_at(start, stop))
                        if timing and cuda:
                            torch.cuda.synchronize(spec.device)
                        t = time.perf_counter() - t
                    except Exception as e:
                        if not is_out_of_memory(e):
                            raise
                        failed = True  # leave the except block first: its traceback holds the chunk's tensors
                    if failed:
                        args = jacs = outputs = None
                        loader.drop()
                        if q is not trials.plan:  # a trial that does not fit: the plan runs these samples
                            trials.failed(q)
                        else:
                            size, plan, backed_off = *_back_off(spec, plan, start, stop), True
                            trials = _Trials(dataclasses.replace(plan, trials=()))
                        continue
                    sink.write(start, stop, jacs, outputs)
                    if not trials.done:
                        trials.timed(q, t, stop - start, stop - start >= size)
                        if trials.done:
                            plan = trials.plan
                            if decided is not None:
                                decided(plan)
                    if lazy:  # the first chunk's time says whether the run is long enough for a bar
                        lazy = False
                        show = t * plan.num_chunks > LONG_RUN_SECONDS and sys.stderr.isatty()
                        if show:
                            bar = open_bar(already + bar.n)
                    bar.update(stop - start)
                    start = stop
                sink.done(unit)
                if job is not None:
                    job.check()  # another rank failed: stop here, this unit listed
    finally:
        loader.close()
    if backed_off:
        warn(f"chunkjac: ran out of memory on {spec.device} with the planned chunks of {plan.chunk_size:,} "
             f"samples; finished with chunks of {size:,}.", RuntimeWarning)
    return _result(spec, plan, sink.jacobians(), sink.outputs() if spec.return_outputs else None)


def _chunk(spec: Spec, plan: Plan, args: list, n: int, colours):
    """One chunk's results by the plan's strategy, projected where the call asks (see [Projected
    per-sample gradients] in _projection): the chunk's full rows live only here."""
    jacs, outputs = STRATEGIES[plan.strategy](spec, plan, args, n, colours)
    if spec.project is not None and not STRATEGIES[plan.strategy].projects:
        blocks = None if plan.held_bytes or not plan.budget_bytes else plan.budget_bytes / 4
        jacs = [spec.project.project(jacs, 1 + len(plan.out_shape), blocks)]
    return jacs, outputs


def _result(spec: Spec, plan: Plan, jacs: list, outputs):
    """What compute returns, from the result tensors (and fn's outputs)."""
    result = jacs[0] if spec.single else tuple(jacs)
    if spec.keys is not None:  # wrt="params" or a list: a dict, or one (B, *out, P) tensor
        result = _flat(jacs, plan) if spec.flat else dict(zip(spec.keys, jacs))
    if not spec.return_outputs:
        return result
    # Second derivatives come back flat: (H, outputs) or (H, J, outputs), as a PINN loss reads them.
    return (*jacs, outputs) if spec.part is not None and spec.keys is None else (result, outputs)


def _flat(jacs: list, plan: Plan) -> torch.Tensor:
    """Per-target Jacobians (B, *out, *shape_k) as one (B, *out, P), in target order."""
    lead = (plan.batch_size, *plan.out_shape)
    return torch.cat([j.reshape(*lead, -1) for j in jacs], -1)


class _NoBar(contextlib.nullcontext):
    n = 0

    def update(self, n: int) -> None:
        self.n += n


class _JobBar(contextlib.nullcontext):
    """A sharded job's progress: every rank counts its samples in the job's store; rank 0's bar
    shows the sum (with the samples done before this run) and, its own share done, follows the
    others' until the batch is done or a rank fails."""

    def __init__(self, bar, job, before: int, follow_to: int | None):
        super().__init__()
        self.bar, self.job, self.before, self.follow_to = bar, job, before, follow_to

    def __exit__(self, kind, *exc):
        try:
            while kind is None and self.follow_to is not None and self.bar.n < self.follow_to:
                self.job.check()  # a failed rank: stop following (the caller reports it)
                time.sleep(0.1)
                self.update(0)
        finally:
            self.bar.__exit__(kind, *exc)

    def update(self, n: int) -> None:
        total = self.job.progress(n) + self.before
        self.bar.update(total - self.bar.n)


def _next_piece(plan: Plan, size: int, stop: int, u1: int, todo: list, k: int):
    """The piece after [.., stop): in the same unit, or the first of the next unit to run."""
    if stop < u1:
        return stop, min(plan.chunk_at(stop, size)[1], u1)
    if k + 1 < len(todo):
        a, b = todo[k + 1][1]
        return a, min(plan.chunk_at(a, size)[1], b)
    return None


def _back_off(spec: Spec, plan: Plan, start: int, stop: int) -> tuple[int, Plan]:
    """After an out-of-memory error on [start, stop): a smaller chunk, or, where the chunk is one
    coupled set that cannot be split, fewer pairs per batched product."""
    gc.collect()
    if spec.device.type == "cuda":
        torch.cuda.empty_cache()
    failed = stop - start
    if spec.return_outputs and not plan.batched_outputs:
        raise BudgetError(
            f"chunkjac: out of memory on {spec.device} with a chunk of {failed:,} samples, and the run "
            "cannot be split: return_outputs=True and fn returns a tensor without the batch in its "
            "leading dim, whose value would change with the split. Pass a smaller budget or "
            "chunk_size= from the start, or leave return_outputs=False.")
    new = failed // 2
    if new >= 1 and plan.chunk_at(start, new)[1] < stop:
        return new, plan
    pairs = plan.rows_per_vjp if "reverse" in plan.modes else plan.cols_per_jvp
    if pairs > 1:
        fewer = dict(rows_per_vjp=pairs // 2) if "reverse" in plan.modes else dict(cols_per_jvp=pairs // 2)
        return failed, dataclasses.replace(plan, **fewer)
    what = "1 sample" if failed == 1 else f"one coupled set of {failed:,} samples, which cannot be split,"
    raise BudgetError(
        f"chunkjac: out of memory on {spec.device} with a chunk of {what} and one product per call; the "
        f"planned peak was {format_bytes(plan.peak_bytes)} per chunk. Free memory on the device or lower "
        "other use, then run again.")
