"""Probe: run fn on a few samples to learn what it returns and what it costs, before planning.

``probe`` learns the per-sample output shape, dtype and device (validating ``output`` and the batch
dim early and cheaply), and the bytes autograd saves for backward per sample, fitted on two sizes so
that what does not grow with the batch (weights saved by matmuls) drops out. ``measure`` runs a
candidate plan's strategy on small chunks and fits peak memory and time as ``a + b * n``.
Both are cached in ``probe_cache`` (see _memo) so that a second call does not probe again.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_leaves

from ._errors import is_out_of_memory
from ._function import call, chunk_args, preserved_buffers, select
from ._memory import measure_peak
from ._spec import Spec

PROBE_SIZES = (2, 10)  # at least two: BatchNorm in training mode refuses a single sample


@dataclass(frozen=True)
class Probe:
    out_shape: tuple[int, ...]  # per sample
    dtype: torch.dtype
    device: torch.device
    saved_bytes_per_sample: float  # activations autograd keeps for a reverse pass
    batched_outputs: bool = True   # every tensor fn returns carries the batch in its leading dim

    @property
    def out_numel(self) -> int:
        return math.prod(self.out_shape)


def _forward_saving(spec: Spec, n: int) -> tuple[torch.Tensor, int]:
    """fn on the first n samples with the batched wrt inputs requiring grad; bytes saved for backward."""
    saved: dict[tuple, int] = {}

    def pack(t):
        # The tensor's own bytes, not its storage's: a saved view of the input shares the storage of
        # the whole batch. Keyed by address and layout so that a tensor saved twice counts once.
        saved[(t.data_ptr(), tuple(t.shape), tuple(t.stride()))] = t.numel() * t.element_size()
        return t

    args = chunk_args(spec, 0, n)
    for t in spec.targets:
        if t.batched:
            args[t.index] = args[t.index].detach().requires_grad_(True)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = call(spec, args)
    except RuntimeError as e:
        if "saved tensor hooks" not in str(e):
            raise
        # fn uses torch.func inside, which refuses these hooks: no cache-size estimate, same answers.
        saved.clear()
        with torch.enable_grad():
            out = call(spec, args)
    y = select(spec, out, n)
    batched = [t for t in spec.targets if t.batched and t.numel]
    if batched and not y.requires_grad and _moves(spec, args, y, batched):
        raise ValueError(
            f"chunkjac: fn's output is not connected to {batched[0].label} by autograd: fn leaves autograd on "
            "the way (.detach(), .numpy(), .item(), torch.no_grad() inside fn, a tensor rebuilt from Python "
            "numbers), although its output changes with that input: every derivative would come out zero "
            "without being zero. Keep fn in differentiable torch operations.")
    return out, y.detach(), sum(saved.values())


def _moves(spec: Spec, args: list, y: torch.Tensor, targets) -> bool:
    """Whether fn's output changes when the batched targets do: an output off the autograd graph is
    then detached (wrong zeros), not constant (a zero Jacobian, as torch.func gives)."""
    moved = list(args)
    for t in targets:
        a = args[t.index].detach()
        moved[t.index] = a + (a.abs() + 1) * 1e-2
    with torch.no_grad():
        z = select(spec, call(spec, moved), y.shape[0])
    return not torch.equal(z, y)


ALIGN_MAX = 4096  # probe on whole coupled sets up to this size, on plain prefixes beyond


def probe(spec: Spec, coupling=None) -> Probe:
    sizes = [min(spec.batch_size, s) for s in PROBE_SIZES]
    if coupling is not None:  # whole coupled sets: fn may only accept whole groups
        sizes = [a if (a := coupling.stop(0, s)) <= max(s, ALIGN_MAX) else s for s in sizes]
    sizes = sorted(set(sizes))
    with preserved_buffers(spec.fn):
        runs = [(n, *_forward_saving(spec, n)) for n in sizes]
    (n0, out0, y, s0), (n1, out1, _, s1) = runs[0], runs[-1]
    per_sample = (s1 - s0) / (n1 - n0) if n1 > n0 else s0 / n0
    return Probe(out_shape=tuple(y.shape[1:]), dtype=y.dtype, device=y.device,
                 saved_bytes_per_sample=max(per_sample, 0.0),
                 batched_outputs=all(_carries(a, n0) and _carries(b, n1)
                                     for a, b in zip(tree_leaves(out0), tree_leaves(out1))
                                     if isinstance(a, torch.Tensor)))


def _carries(t: torch.Tensor, n: int) -> bool:
    return t.dim() > 0 and t.shape[0] == n


MEMORY_SIZES = (8, 32)  # samples per probe chunk for the memory fit
# The time fit needs chunks large enough that per-sample work, not Python overhead, shows: chunk
# sizes double from TIME_START until one call takes TIME_TARGET seconds (or the candidate's chunk is
# reached); the fit uses that size and a quarter of it.
TIME_START = 1024
TIME_TARGET = 0.02
RESULT_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Measurement:
    """Peak bytes and seconds of one chunk of n samples, fitted as ``const + per_sample * n``."""

    mem_const: float
    mem_per_sample: float
    sec_const: float = 0.0
    sec_per_sample: float = 0.0

    def peak(self, n: int) -> float:
        return self.mem_const + self.mem_per_sample * n

    def seconds(self, n: int) -> float:
        return self.sec_const + self.sec_per_sample * n


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    (n0, v0), (n1, v1) = points[0], points[-1]
    if n1 == n0:
        return 0.0, v1 / n1
    slope = max((v1 - v0) / (n1 - n0), 0.0)
    return max(v1 - slope * n1, 0.0), slope


# NOTE: [Measuring a plan of many products]
# A plan's chunk runs one forward and P batched products (VJPs of rows, JVPs of columns); a shared
# tensor of 5,120 elements looped one JVP per call is P = 5,120. Measuring such a candidate in full
# would cost more than the run it plans (400 s of planning for a 0.06 s answer, measured), so a
# candidate of more than SHORT products is run cut short: memory from SHORT products (the peak is
# the forward plus one block of products in flight; the result itself is allocated whole either way),
# time from 1 and SHORT products, extrapolated to P as t1 + (P - 1) * (t_SHORT - t1) / (SHORT - 1),
# the per-product time floored at a quarter of t1 (a difference of short timings can come out near
# zero). Planning a candidate then costs a few forwards whatever P is.
SHORT = 3


def _products(plan) -> int:
    vjps, jvps = plan.products_per_chunk
    return vjps + jvps


def _run(spec: Spec, plan, n: int, calls: int | None = None):
    from ._strategies import STRATEGIES  # strategies import the plan; the probe runs them
    quiet = dataclasses.replace(spec, return_outputs=False)
    small = dataclasses.replace(plan, batch_size=n, chunk_size=n)
    if calls is None:
        return STRATEGIES[plan.strategy](quiet, small, chunk_args(spec, 0, n), n)
    return STRATEGIES[plan.strategy](quiet, small, chunk_args(spec, 0, n), n, None, calls)


def measure_memory(spec: Spec, plan) -> Measurement:
    sizes = sorted({min(spec.batch_size, s) for s in MEMORY_SIZES})
    calls = SHORT if _products(plan) > SHORT else None
    points = []
    with preserved_buffers(spec.fn):
        for n in sizes:
            peak, result = measure_peak(lambda: _run(spec, plan, n, calls), plan.device)
            del result
            points.append((n, float(peak)))
    a, b = _fit(points)
    return Measurement(mem_const=a, mem_per_sample=b)


def measure_time(spec: Spec, plan, m: Measurement, largest: int) -> Measurement:
    """Adds the time fit, from chunks of up to ``largest`` samples (best of two runs each)."""
    total = _products(plan)

    def seconds(n: int) -> float:
        if total <= SHORT:
            return best_seconds(lambda: _run(spec, plan, n), plan.device)
        t1 = best_seconds(lambda: _run(spec, plan, n, 1), plan.device)
        ts = best_seconds(lambda: _run(spec, plan, n, SHORT), plan.device)
        return t1 + (total - 1) * max((ts - t1) / (SHORT - 1), t1 / 4)

    largest = max(1, min(largest, spec.batch_size))
    # A chunk whose result outgrows the caches is memory-bound where a small one is not (a loop of
    # VJPs then joins its rows in one more pass over memory): time chunks whose result is at least
    # RESULT_BYTES, so that the choice holds at the size the plan runs (MLP 784->256->10: the loop
    # looked faster at 1,024 samples and ran 1.3x slower at 10,000).
    result = math.prod(plan.out_shape) * sum(plan.in_numels) * plan.dtype.itemsize
    with preserved_buffers(spec.fn):
        n = min(max(TIME_START, -(-RESULT_BYTES // max(result, 1))), largest)
        while True:
            try:
                t = seconds(n)
                break
            except Exception as e:  # the memory fit was optimistic: time what does fit
                if not is_out_of_memory(e) or n == 1:
                    raise
                n //= 2
                largest = n
        while t < TIME_TARGET and n < largest:
            bigger = min(2 * n, largest)
            try:
                t, n = seconds(bigger), bigger
            except Exception as e:  # the memory fit was optimistic: time what did fit
                if not is_out_of_memory(e):
                    raise
                break
        points = [(max(1, n // 4), seconds(max(1, n // 4))), (n, t)] if n > 1 else [(n, t)]
    c, d = _fit(points)
    return dataclasses.replace(m, sec_const=c, sec_per_sample=d)


def measure_step(spec: Spec, plan, n: int, colours, calls: int, repeats: int = 2,
                 memory: bool = True) -> tuple[float, float]:
    """(peak bytes, best seconds) of a coupled chunk of the first n samples cut short after ``calls``
    batched products: a forward and ``calls`` products of ``plan.rows_per_vjp`` (cols_per_jvp) pairs.
    ``memory=False`` skips the peak (0), ``repeats=0`` the time (inf): each run is a full forward."""
    from ._strategies import STRATEGIES
    quiet = dataclasses.replace(spec, return_outputs=False)
    small = dataclasses.replace(plan, batch_size=n, chunk_size=n)
    args = chunk_args(spec, 0, n)

    def work():
        return STRATEGIES[plan.strategy](quiet, small, args, n, colours, calls)

    peak = 0
    with preserved_buffers(spec.fn):
        if memory:
            peak, result = measure_peak(work, plan.device)
            del result
        best = best_seconds(work, plan.device, repeats)
    return float(peak), best


def best_seconds(work, device: torch.device, repeats: int = 2) -> float:
    """The best of ``repeats`` timed runs of ``work`` (synchronised on CUDA)."""
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best
