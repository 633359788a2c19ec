"""The executor: carries a plan out, chunk by chunk, from the strategy into the sink.

It streams batched inputs to the compute device (on CUDA, the next chunk's copy overlaps the current
chunk's compute on a side stream), shows progress, and backs off on out-of-memory errors: free what
it can, halve the chunk, retry the same samples, keep the smaller size for the rest of the run.
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


def _show_progress(progress, plan: Plan) -> bool:
    if progress is None:
        long = plan.seconds is not None and plan.seconds > LONG_RUN_SECONDS
        return long and sys.stderr.isatty()
    return bool(progress)


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
            skip: frozenset = frozenset(), job=None):
    """Run ``plan`` into ``sink`` (default: memory). ``units``: the chunks a dump records as done
    (``sink.done(i)`` after the last piece of unit i is written); those in ``skip`` are already on
    disk (or, in a sharded dump ``job``, another rank's share: see [Sharded dumps] in _distributed).
    Without units the whole batch is one unit. Returns what compute returns."""
    strategy = STRATEGIES[plan.strategy]
    if sink is None and units is None and plan.chunk_at(0)[1] >= plan.batch_size and \
            not _show_progress(progress, plan):
        # One chunk into memory (a training loop's every step): the strategy's tensors are the result,
        # with none of the streaming machinery around them.
        try:
            jacs, outputs = strategy(spec, plan, chunk_args(spec, 0, plan.batch_size), plan.batch_size,
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
    # Samples on disk before this run (a sharded job's skip also holds the other ranks' shares).
    before = skip if job is None else frozenset(range(len(units))) - set(job.todo)
    already = sum(b - a for i, (a, b) in enumerate(units) if i in before)
    # No bar object at all when none is shown: a training loop calls this every step.
    show = _show_progress(progress, plan) and (job is None or job.rank == 0)
    bar = tqdm(total=plan.batch_size, initial=already, unit="sample", unit_scale=True, desc="chunkjac",
               dynamic_ncols=True) if show else _NoBar()
    if job is not None:  # one bar for the whole job, on rank 0: the samples every rank has finished
        bar = _JobBar(bar, job, already, plan.batch_size if show else None)
    backed_off = False
    # (A Jacobian is not a training step: buffers that fn updates in place, BatchNorm's running
    # statistics in training mode, are put back by the caller: _function.as_it_was.)
    try:
        with bar:
            for k, (unit, (u0, u1)) in enumerate(todo):
                start = u0
                while start < u1:
                    stop = min(plan.chunk_at(start, size)[1], u1)
                    failed = False
                    try:
                        args = loader.get(start, stop)
                        nxt = _next_piece(plan, size, stop, u1, todo, k)
                        if nxt is not None:
                            loader.prefetch(*nxt)
                        jacs, outputs = strategy(spec, plan, args, stop - start, plan.colours_at(start, stop))
                    except Exception as e:
                        if not is_out_of_memory(e):
                            raise
                        failed = True  # leave the except block first: its traceback holds the chunk's tensors
                    if failed:
                        args = jacs = outputs = None
                        loader.drop()
                        size, plan, backed_off = *_back_off(spec, plan, start, stop), True
                        continue
                    sink.write(start, stop, jacs, outputs)
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


def _result(spec: Spec, plan: Plan, jacs: list, outputs):
    """What compute returns, from the result tensors (and fn's outputs)."""
    result = jacs[0] if spec.single else tuple(jacs)
    if spec.keys is not None:  # wrt="params" or a list: a dict, or one (B, *out, P) tensor
        result = _flat(jacs, plan) if spec.flat else dict(zip(spec.keys, jacs))
    if not spec.return_outputs:
        return result
    # Second derivatives come back flat: (H, outputs) or (H, J, outputs), as a PINN loss reads them.
    return (*jacs, outputs) if spec.part is not None else (result, outputs)


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
