"""The plan: strategy, AD mode per target, rows per batched VJP, and the chunk size.

A plan is data (a frozen dataclass): it can be printed, compared and tested without running a model.
The executor only carries it out. Chunk sizes are decided here; ``Plan.chunk_at`` is the one place
where chunk boundaries are computed (the executor's out-of-memory back-off asks it with a smaller size).

# NOTE: [Choosing the AD mode]
# The sum trick costs one forward plus one VJP per per-sample output element in reverse mode, or one
# JVP per per-sample input element in forward mode. Both can vectorise several rows/columns in one
# call (is_grads_batched / vmap) or loop over them; which is faster depends on the model (measured
# here, 1e5 samples: sin is 3x faster vectorised, the PINN MLP 3->128x3->3 1.3x faster looped).
# So the planner measures: every candidate (mode x vectorised-or-looped) is run by the probe on small
# chunks, its peak memory and time fitted as a + b*n, and the fastest whose chunk fits the budget wins.
# Without a time measurement (a single candidate) the count rule decides: forward mode only when
# 2 * n_in < n_out, a JVP column costing about twice a VJP row here. Shared tensors (a parameter, an
# unbatched input) always use forward mode: reverse mode would sum their per-sample contributions.
#
# NOTE: [Chunking for speed]
# Chunks exist for memory, but they also make the run faster on CPUs: a chunk whose saved activations
# fit in the caches runs the backward passes out of cache. Measured here (PINN MLP, 1e5 samples,
# reverse mode): one chunk 0.61 s; chunks of 2k-16k samples 0.36-0.42 s. Operations that save little
# per sample (sin) gain nothing and pay a Python overhead per chunk, so the speed chunk is sized by the
# bytes autograd saves per sample; the budget can only make it smaller.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ._budget import format_bytes
from ._coupling import Coupling, describe
from ._errors import BudgetError, RandomFunctionError, is_out_of_memory
from ._function import preserved_buffers
from ._memo import ProbeCache
from ._probe import Measurement, Probe, measure_memory, measure_time, probe
from ._spec import Spec

JVP_COST = 2.0
PER_SAMPLE_COST = 8.0
MAX_VECTORISED = 4096  # rows (columns) in one vectorised call at most
BLOCK = 16
TIME_MIN_BATCH = 256  # smaller batches run faster than their candidates could be timed
CACHE_BYTES = 32 * 2**20
# NOTE: [Margins]
# Chunks are planned so that the predicted peak stays within margin(device) * budget. On CUDA the
# predictor is the caching allocator's own max_memory_allocated, and 0.8 leaves room for its
# fragmentation. On the CPU the predictor counts live tensor bytes, which matches the steady-state
# RSS growth of a run (PINN 3->256x3->3, chunks of 10,922: 56 MB measured, 56.3 MB predicted), but
# in a fresh process glibc's heap grows to 5.5-5.8x the live bytes during the first chunks before
# its free lists settle (chunks of 2,482: 70 MB for 12.8 MB predicted; of 9,930: 254 MB for 51 MB).
# A fixed mmap threshold would track live bytes but made the run 1.7x slower. So the CPU margin
# divides by 6: a budget bounds the RSS growth of a fresh process. Chunks are still mostly sized by
# speed (see [Chunking for speed]), so this costs little time.
SAFETY = 0.8
CPU_HEAP_GROWTH = 6.0


def margin(device: torch.device) -> float:
    return SAFETY / CPU_HEAP_GROWTH if device.type == "cpu" else SAFETY


@dataclass(frozen=True)
class Plan:
    """How a call will run. ``modes[k]`` is the AD mode of target k (``"reverse"`` or ``"forward"``).

    ``peak_bytes`` is the predicted peak of one chunk on ``device``; ``seconds`` the predicted total
    (None where time was not measured); ``budget_bytes`` the budget the chunk was sized for.
    """

    strategy: str
    modes: tuple[str, ...]
    batch_size: int
    chunk_size: int
    rows_per_vjp: int          # per-sample output rows in one batched VJP (reverse mode)
    cols_per_jvp: int          # per-sample input columns in one batched JVP (forward mode)
    out_shape: tuple[int, ...]
    in_numels: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    peak_bytes: int = 0
    seconds: float | None = None
    budget_bytes: int | None = None
    batched_outputs: bool = True
    coupling: Coupling | None = field(default=None, compare=False)  # None: independent samples
    colours: int = 1               # colours in the largest chunk: products = colours x rows (or columns)
    max_seconds: float | None = None  # a coupled plan predicted to take longer is refused
    extrapolated: bool = False     # seconds/peak extrapolated from smaller coupled sets
    part: str | None = None        # second derivatives ("full", "diagonal", "laplacian"); None: Jacobians
    result_bytes: int = 0          # of peak_bytes, the result itself, outside the budget (see _adopted)
    wrt: tuple[str, ...] = ()      # what it differentiates ("input 0", "parameter 'fc.weight'"): plan= checks it

    @property
    def too_long(self) -> bool:
        return (self.colours > 1 and self.max_seconds is not None and self.seconds is not None
                and self.seconds > self.max_seconds)

    @property
    def mode(self) -> str:
        return self.modes[0] if len(set(self.modes)) == 1 else "mixed"

    @property
    def num_chunks(self) -> int:
        if self.coupling is None or self.coupling.bounds is None:
            return -(-self.batch_size // self.chunk_size)
        return sum(1 for _ in self.chunks())

    def chunk_at(self, start: int, size: int | None = None) -> tuple[int, int]:
        """The chunk that starts at sample ``start``: (start, stop), of about ``size`` samples (default
        chunk_size); coupled samples are never split (a chunk holds whole coupled sets)."""
        size = size or self.chunk_size
        if self.coupling is None:
            return start, min(start + size, self.batch_size)
        return start, self.coupling.stop(start, size)

    def colours_at(self, start: int, stop: int):
        """(stop - start,) colour ids of a chunk's samples, or None where they are independent."""
        return None if self.coupling is None else self.coupling.colours_at(start, stop)

    def chunks(self) -> Iterator[tuple[int, int]]:
        """(start, stop) of every chunk, in order."""
        start = 0
        while start < self.batch_size:
            start, stop = self.chunk_at(start)
            yield start, stop
            start = stop

    def chunk_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(samples, colours) of every chunk, as arrays in chunk order."""
        bounds = np.array([0] + [stop for _, stop in self.chunks()])
        sizes = np.diff(bounds)
        if self.coupling is None or self.coupling.colours is None:
            return sizes, np.ones_like(sizes)
        # Distinct colours per chunk: unique (chunk, colour) pairs, counted by chunk.
        chunk = np.repeat(np.arange(len(sizes)), sizes)
        c = self.coupling.colours.numpy()
        pairs = np.unique(chunk * (int(c.max()) + 1) + c)
        return sizes, np.bincount(pairs // (int(c.max()) + 1), minlength=len(sizes))

    @property
    def largest_chunk(self) -> int:
        return int(self.chunk_table()[0].max()) if self.coupling is not None else min(self.chunk_size, self.batch_size)

    @property
    def products_per_chunk(self) -> tuple[int, int]:
        """(batched VJPs, batched JVPs) the largest chunk costs; a Taylor pass counts as one JVP."""
        if self.strategy == "taylor":
            return 0, self.colours
        if self.strategy == "per_sample":
            return 1, 0
        if self.strategy == "double_backward":
            dims = self.in_numels[0]
            return self.colours * math.prod(self.out_shape) * (1 + -(-dims // max(self.rows_per_vjp, 1))), 0
        rows = self.colours * math.prod(self.out_shape)
        vjps = -(-rows // self.rows_per_vjp) if "reverse" in self.modes else 0
        jvps = sum(-(-n * self.colours // self.cols_per_jvp) for n, m in zip(self.in_numels, self.modes)
                   if m == "forward")
        return vjps, jvps

    def __str__(self) -> str:
        c = "chunk" if self.num_chunks == 1 else "chunks"
        vjps, jvps = self.products_per_chunk
        work = []
        per = "per chunk" if self.num_chunks > 1 else "in all"
        if self.part is not None:
            work.append(self._second_order_work(per))
        elif self.strategy == "per_sample":
            rows = math.prod(self.out_shape)
            work.append(f"{rows:,} VJP{'s' * (rows != 1)} per sample, vectorised over the chunk's samples")
        elif vjps:
            rows = self.colours * math.prod(self.out_shape)
            work.append(f"{rows:,} VJP{'s' * (rows != 1)} {per} in {vjps:,} call{'s' * (vjps != 1)}")
        if jvps:
            cols = sum(n * self.colours for n, m in zip(self.in_numels, self.modes) if m == "forward")
            work.append(f"{cols:,} JVP{'s' * (cols != 1)} {per} in {jvps:,} call{'s' * (jvps != 1)}")
        size = f"{self.chunk_size:,}" if self.coupling is None or self.coupling.bounds is None \
            else f"≤ {self.largest_chunk:,}"
        parts = [f"{self.batch_size:,} samples in {self.num_chunks:,} {c} of {size}"]
        if self.coupling is not None:
            parts.append(f"coupled ({describe(self.coupling)}): {self.colours:,} colour"
                         f"{'s' * (self.colours != 1)} per chunk")
        if self.part is not None:
            parts.append(work[0])
        elif self.strategy == "per_sample":
            parts.append(f"per-sample reverse mode, {work[0]}")
        else:
            parts.append(f"{self.mode} mode, {' + '.join(work) or 'no products'}")
        peak = f"peak ≈ {format_bytes(self.peak_bytes - self.result_bytes)}"
        if self.budget_bytes is not None:
            peak += f" of {format_bytes(self.budget_bytes)}"
        if self.result_bytes:
            peak += f" + the result's {format_bytes(self.result_bytes)}"
        parts.append(f"{peak} on {self.device}")
        if self.seconds is not None:
            parts.append(f"≈ {_format_seconds(self.seconds)}" + (" (extrapolated)" if self.extrapolated else ""))
        text = " · ".join(parts)
        if self.too_long:
            text += (f"\nTOO LONG: about {_format_seconds(self.seconds)}, over max_seconds="
                     f"{self.max_seconds:g}: every one of {self.colours:,} coupled samples needs its own products "
                     "over the whole coupled set. Tell chunkjac which samples interact: coupling=<group ids> "
                     "or a dependency structure (edges, a sparse adjacency) cuts the products to the largest "
                     "group or the colours of the structure.")
        return text

    def _second_order_work(self, per: str) -> str:
        dims = self.in_numels[0]
        passes = f"{self.colours:,} passes {per}" if self.colours > 1 else f"one pass {per}"
        if self.strategy == "taylor":
            terms = {"laplacian": "1 summed second-order term", "diagonal": f"{dims:,} second-order terms",
                     "full": f"{dims * dims:,} second-order terms"}[self.part]
            return (f"{self.part}: Taylor mode, {passes} carrying the value, {dims:,} direction"
                    f"{'s' * (dims != 1)} and {terms}")
        vjps = self.products_per_chunk[0]
        return (f"{self.part}: reverse over reverse, {vjps:,} VJP call{'s' * (vjps != 1)} {per} "
                f"({self.rows_per_vjp:,} Hessian row{'s' * (self.rows_per_vjp != 1)} per call)")


def _format_seconds(s: float) -> str:
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:,.0f} days" if s < 3 * 365 * 86400 else f"{s / (365 * 86400):,.3g} years"


def speed_chunk(batch_size: int, saved_bytes_per_sample: float, result_bytes_per_sample: float = 0.0) -> int:
    """The chunk whose saved activations fill about CACHE_BYTES (see [Chunking for speed]).

    Where the Jacobian is larger per sample than the activations (an MLP 784 -> 256 -> 10: 31 kB
    against 4 kB), writing it dominates and chunks only add a copy into the result (measured: 0.61 s
    in chunks of 8k against 0.42 s in one chunk), so the whole batch is one speed chunk.
    """
    if saved_bytes_per_sample <= 0 or result_bytes_per_sample > saved_bytes_per_sample:
        return batch_size
    return max(1, min(batch_size, int(CACHE_BYTES // saved_bytes_per_sample)))


def candidates(spec: Spec, p: Probe, device: torch.device) -> tuple[list[Plan], list[Plan]]:
    """(candidates, fallbacks): every (mode, vectorisation) worth measuring, the count rule's choice
    first; and, in auto mode, the other mode's plans, used only if no candidate can run."""
    if spec.part is not None:
        return second_order_candidates(spec, p, device), []
    n_out = p.out_numel
    batched_in = sum(t.numel for t in spec.targets if t.batched)
    shared_only = not any(t.batched for t in spec.targets)
    close = True
    if spec.mode != "auto":
        modes = [spec.mode]
    else:
        preferred = "forward" if JVP_COST * batched_in < n_out else "reverse"
        other = "reverse" if preferred == "forward" else "forward"
        # Measure the other mode only where it could win: counts within a factor of 4.
        close = 0 < batched_in <= 4 * n_out and n_out <= 4 * batched_in
        modes = [preferred] + ([other] if not shared_only else [])
    max_in = max(t.numel for t in spec.targets)
    plans = []
    for mode in modes:
        target_modes = tuple(mode if t.batched else "forward" for t in spec.targets)
        uses_reverse = "reverse" in target_modes
        width = n_out if uses_reverse else max_in
        # All rows in one call, one per call, and for wide outputs a middle block whose memory
        # (BLOCK x the chunk's gradients) fits where all rows at once would not.
        # (Not all at once beyond MAX_VECTORISED: a 256x784 weight's 200,704 one-hot tangents would
        # take 161 GB before the measurement could say so.)
        blocks = ([width] if width <= MAX_VECTORISED else []) + [1] + ([BLOCK] if width > 2 * BLOCK else [])
        for block in dict.fromkeys(max(b, 1) for b in blocks):
            plans.append(Plan(
                strategy="coloured", modes=target_modes, batch_size=spec.batch_size,
                chunk_size=spec.batch_size,
                rows_per_vjp=block if uses_reverse else max(n_out, 1),
                cols_per_jvp=max_in if uses_reverse else block,
                out_shape=p.out_shape, in_numels=tuple(t.numel for t in spec.targets), dtype=p.dtype,
                device=device))
    split = len(plans) if close else sum(1 for q in plans if q.modes == plans[0].modes)
    shared = sum(t.numel for t in spec.targets if not t.batched)
    if shared and spec.mode != "forward":
        # See [Per-sample Jacobians of shared tensors]: n_out VJPs per sample against one JVP per
        # element of the shared tensors; mode="reverse" asks for this strategy alone.
        per_sample = Plan(strategy="per_sample", modes=("reverse",) * len(spec.targets), batch_size=spec.batch_size,
                          chunk_size=spec.batch_size, rows_per_vjp=max(n_out, 1), cols_per_jvp=1,
                          out_shape=p.out_shape, in_numels=tuple(t.numel for t in spec.targets), dtype=p.dtype,
                          device=device)
        if spec.mode == "reverse":
            return [per_sample], []
        # Count rule (without timings: small batches): a JVP column per shared element against a
        # vmapped VJP row per output element, each sample a batch of one (about PER_SAMPLE_COST x a
        # batched VJP row here: functional_call and vmap's per-op overhead).
        first = JVP_COST * shared > PER_SAMPLE_COST * n_out
        return ([per_sample] + plans if first else plans + [per_sample]), []
    return plans[:split], plans[split:]


# NOTE: [Choosing a second-order strategy]
# Taylor mode ("forward": one pass carrying 1 + D + s vectors per tensor, see _taylor) against
# reverse over reverse ("reverse": 1 + D VJPs per output element, the second ones through the first
# ones' graph). The count rule puts Taylor mode first: on the PINN MLP 3->128x3->3 its pass costs
# about 5 forwards where reverse over reverse costs 3 x (1 + 3) VJPs of ~2-3 forwards each. Both
# are measured on small chunks (as for Jacobians) and the faster wins; a Taylor plan is then
# cross-checked against reverse over reverse on the first samples (_check.check_second_order).
def second_order_candidates(spec: Spec, p: Probe, device: torch.device) -> list[Plan]:
    dims = spec.targets[0].numel
    base = dict(batch_size=spec.batch_size, chunk_size=spec.batch_size, out_shape=p.out_shape,
                in_numels=(dims,), dtype=p.dtype, device=device, part=spec.part)
    taylor = Plan(strategy="taylor", modes=("forward",), rows_per_vjp=1, cols_per_jvp=1, **base)
    reverse = [Plan(strategy="double_backward", modes=("reverse",), rows_per_vjp=k, cols_per_jvp=1, **base)
               for k in dict.fromkeys((dims, 1))]
    return {"auto": [taylor] + reverse, "forward": [taylor], "reverse": reverse}[spec.mode]


def _stack(spec: Spec, plan: Plan) -> int:
    """Vectors a Taylor pass carries per tensor (value, D directions, s second-order terms): its
    working set per sample is that many times the activations (PINN MLP, 10^5 points: chunks of
    2-4k ran 0.36 s, of 16k 0.51 s, sized by the activations alone)."""
    dims = spec.targets[0].numel
    return 1 + dims + {"laplacian": 1, "diagonal": dims, "full": dims * dims}[plan.part]


def result_numel(spec: Spec, p: Probe) -> int:
    """Elements of one sample's result (all result tensors)."""
    return sum(math.prod(s[1:]) for s in spec.result_shapes(p.out_shape))


def _keyed(cache: ProbeCache | None, spec: Spec, *extra) -> tuple[ProbeCache, tuple]:
    """The cache to use and the key prefix of this spec's entries; without a cache, or for fn that
    cannot be guarded (see _memo), a cache that keeps nothing."""
    key = None if cache is None else cache.key(spec, *extra)
    if key is None:
        return ProbeCache(size=0), ()
    return cache, key


def make_plan(spec: Spec, device: torch.device, budget_bytes: int, chunk_size: int | None = None,
              cache: ProbeCache | None = None) -> Plan:
    """Measure the candidates on small chunks and pick the fastest whose chunk fits ``budget_bytes``.

    ``chunk_size`` overrides the chunk (the plan still reports its predicted peak). Raises
    :class:`BudgetError` when the budget cannot hold one sample of any candidate.
    """
    cache, key = _keyed(cache, spec, str(device))
    p = cache.get(key + ("probe",), spec.fn, lambda: probe(spec))
    plans, fallbacks = candidates(spec, p, device)
    result_bytes = result_numel(spec, p) * p.dtype.itemsize
    fast = speed_chunk(spec.batch_size, p.saved_bytes_per_sample, result_bytes)
    measured, failure = [], None
    for group in (plans, fallbacks):
        if measured:
            break  # a candidate runs: the fallbacks are not needed
        for plan in group:
            if isinstance(failure, RandomFunctionError) and "forward" in plan.modes:
                continue  # a looped forward mode would differentiate a new random draw per column
            cand_key = key + (plan.strategy, plan.part, spec.return_jacobian, plan.modes, plan.rows_per_vjp,
                              plan.cols_per_jvp)
            try:
                m = cache.get(cand_key + ("memory",), spec.fn, lambda: measure_memory(spec, plan))
            except Exception as e:  # noqa: BLE001 - whatever stops a candidate, another may run
                # In auto mode a candidate that cannot run (no forward-mode formula, an old-style
                # autograd.Function, numpy inside fn, a random fn under vmap, a chunkjac call inside fn
                # under torch.func.jvp) is not chosen; an explicit mode, or no candidate left, reports
                # the first failure.
                # Out of memory on a probe chunk: that candidate does not fit; another may.
                if spec.mode != "auto":
                    raise
                failure = failure or e
                continue
            measured.append((plan, m, cand_key))
    if not measured:
        raise failure
    fitted = []
    for plan, m, cand_key in measured:
        speed = fast if plan.strategy != "taylor" else speed_chunk(
            spec.batch_size, p.saved_bytes_per_sample * _stack(spec, plan), result_bytes)
        n = min(chunk_size, spec.batch_size) if chunk_size else min(speed, _fits(m, budget_bytes, spec.batch_size, margin(device)))
        adopted = 0
        if not chunk_size and n < spec.batch_size <= speed and _adopted(spec, m, budget_bytes, result_bytes, device):
            n, adopted = spec.batch_size, spec.batch_size * result_bytes
        if n >= 1:
            fitted.append((dataclasses.replace(plan, result_bytes=adopted), m, n, cand_key))
    if not fitted:
        one = min(m.peak(1) for _, m, _ in measured)
        need = one / margin(device)
        raise BudgetError(
            f"chunkjac: budget={format_bytes(budget_bytes)} cannot hold the work of even one sample on "
            f"{device}: one sample needs about {format_bytes(one)} (with the planner's margin, a "
            f"budget of {format_bytes(need)}). Pass budget='{_round_up(need)}' or more.")
    # Under torch.use_deterministic_algorithms(True) timings must not choose: the same call must get
    # the same plan, and so the same bits, in every run and process (the count rule decides).
    deterministic = torch.are_deterministic_algorithms_enabled()
    if len(fitted) > 1 and spec.batch_size > TIME_MIN_BATCH and not deterministic:
        timed = []
        for plan, m, n, cand_key in fitted:
            m = cache.get(cand_key + ("time", n), spec.fn, lambda: measure_time(spec, plan, m, n))
            chunks = -(-spec.batch_size // n)
            timed.append((chunks * m.sec_const + spec.batch_size * m.sec_per_sample, plan, m, n))
        # Candidates within TIE of the fastest are equal within the timing noise: take the first in
        # candidate order, so that the same call gets the same plan (and bit-identical results).
        best = min(t[0] for t in timed)
        chosen = next(t for t in timed if t[0] <= (1 + TIE) * best)
        if chosen is not timed[0]:
            key_duel = key + ("duel", chosen[1].strategy, chosen[1].part, chosen[1].modes, chosen[1].rows_per_vjp,
                              chosen[1].cols_per_jvp)
            if not cache.get(key_duel, spec.fn, lambda: _confirmed(spec, timed[0], chosen)):
                chosen = timed[0]
        seconds, plan, m, n = chosen
    else:  # one candidate, or a batch too small for timing to pay: the count rule's first choice
        (plan, m, n, _), seconds = fitted[0], None
    return dataclasses.replace(plan, chunk_size=n, peak_bytes=int(m.peak(n)), seconds=seconds,
                               budget_bytes=budget_bytes, batched_outputs=p.batched_outputs)


DUEL_ROUNDS = 3
DUEL_MAX = 8192


def _confirmed(spec: Spec, first, challenger) -> bool:
    """Whether ``challenger`` beats the count rule's ``first`` candidate side by side: both run on the
    same chunk, interleaved, best of DUEL_ROUNDS each. Timed one after the other, the first candidate
    measured pays for the cold allocator and caches, and on this 2-core machine that flipped the
    choice between runs (seq 5->2->10: forward mode won the fit and then ran 2x slower)."""
    from ._probe import _run, best_seconds
    n = max(1, min(first[3], challenger[3], DUEL_MAX))
    best = {0: float("inf"), 1: float("inf")}
    with preserved_buffers(spec.fn):
        for _ in range(DUEL_ROUNDS):
            for k, (_, plan, _, _) in enumerate((first, challenger)):
                try:
                    best[k] = min(best[k], best_seconds(lambda: _run(spec, plan, n), plan.device, 1))
                except Exception as e:  # the memory fit was optimistic: the count rule's order stands
                    if not is_out_of_memory(e):
                        raise
                    return False
    return best[1] * (1 + TIE) < best[0]


def _adopted(spec: Spec, m: Measurement, budget_bytes: int, result_bytes: int, device: torch.device) -> bool:
    """Whether the whole batch fits as one chunk once its Jacobians are counted as the result.

    On the CPU the budget does not count the result in memory (the output asked for), and a run of
    one chunk returns the chunk's own Jacobians as the result, without a copy (_sinks.MemorySink).
    Where the Jacobians dominate a chunk's memory (per-sample parameter Jacobians: 8 MB a sample for
    an MLP 784 -> 256 -> 10 against kilobytes of activations), counting them would cut the batch into
    chunks whose copies into the result cost as much as computing them (measured: 6.1 s against
    vmap(jacrev)'s 2.9 s in one piece at B = 1,000)."""
    if not spec.to_memory or device.type != "cpu" or spec.home.type != "cpu":
        return False
    work = m.mem_const + spec.batch_size * max(0.0, m.mem_per_sample - result_bytes)
    return work <= margin(device) * budget_bytes


def _fits(m: Measurement, budget_bytes: int, batch_size: int, share: float) -> int:
    """The largest chunk whose predicted peak stays inside margin * budget (0 if not one sample)."""
    room = share * budget_bytes - m.mem_const
    if m.mem_per_sample <= 0:
        return batch_size if room >= 0 else 0
    return int(max(0, min(batch_size, room // m.mem_per_sample)))


def _round_up(nbytes: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= size:
            v = nbytes / size
            return f"{int(v) + 1}{unit}" if v < 100 else f"{int(v / 10 + 1) * 10}{unit}"
    return f"{int(nbytes) + 1}B"


# NOTE: [Planning coupled chunks]
# A coupled chunk holds whole coupled sets and costs one forward plus ceil(P / k) batched products,
# P = colours x rows (reverse) or colours x columns (forward), k pairs per call. Running a whole
# chunk to measure it would be the work itself (3072 products for 1024 coupled samples of dim 3),
# so the planner measures chunks cut short: the forward with 1 and 5 products of 1 pair, and of 2
# pairs (memory: a + b*k), then one product of the largest k that fits (up to KMAX) to see whether
# vectorising pairs pays. It does not always: on a 2-core CPU, 1024-sample attention ran 0.44x as
# fast with 16 pairs per call as with 1 (the (k, B, B) intermediates leave the caches), so k wins
# only when it is cheaper per pair by VECTORISE_GAIN (single timings are noisy). Chunks of several
# coupled sets (groups) are measured on up to PROBE_MAX samples and scaled linearly; one coupled
# set larger than that is measured at 1,024 and 4,096 samples and extrapolated with the power of n
# fitted to the forward-and-one-product time (the plan says so): an order of magnitude, enough to
# refuse 10^6 coupled samples, not a schedule.
KMAX = 64
KTRY = 8
# Predicted times this close count as equal (see make_plan): on this 2-core machine a candidate's
# timing varies by 20-40% between runs (sin on 10^6 x 3: forward mode timed 27 ms against reverse 29 ms
# in one plan, then ran 31 ms against 19 ms), so only a clear gap may overrule the count rule's order.
TIE = 0.25
VECTORISE_GAIN = 0.8  # more pairs per call must be this much cheaper per pair (timings are noisy)
PROBE_MAX = 4096
EXTRAPOLATE_FROM = (1024, 4096)


def make_coupled_plan(spec: Spec, coupling: Coupling, device: torch.device, budget_bytes: int,
                      chunk_size: int | None = None, cache: ProbeCache | None = None,
                      max_seconds: float | None = None) -> Plan:
    """Plan a run over coupled chunks (see [Planning coupled chunks]); ``coupling`` is not independent."""
    from ._probe import measure_step
    cache, key = _keyed(cache, spec, str(device), "coupled", coupling.kind, coupling.batch_size, coupling.unit,
                        coupling.num_colours, spec.part, spec.return_jacobian)
    p = cache.get(key + ("probe",), spec.fn, lambda: probe(spec, coupling))
    n_out = p.out_numel
    batched_in = sum(t.numel for t in spec.targets if t.batched)
    preferred = "forward" if JVP_COST * batched_in < n_out or spec.part is not None else "reverse"
    # auto: the count rule's mode, and the other one if fn cannot run it (no forward-mode formula).
    wanted = [spec.mode] if spec.mode != "auto" else [preferred, "reverse" if preferred == "forward" else "forward"]
    # Per target; distinct: with no batched target both are one. Shared tensors in reverse mode get a
    # colour per sample (see [Shared tensors in reverse mode] in coloured).
    tries = list(dict.fromkeys(tuple(m for _ in spec.targets) for m in wanted))
    declared = coupling
    result_bytes = result_numel(spec, p) * p.dtype.itemsize
    # Second derivatives: a Taylor pass per colour group (one "pair" each, width 1), or reverse over
    # reverse with 1 + D VJPs per output element of each group; neither vectorises groups (k = 1).
    second = spec.part is not None
    dims = spec.targets[0].numel

    def with_k(k: int) -> Plan:
        if second:
            return base
        if "reverse" in modes:
            return dataclasses.replace(base, rows_per_vjp=k)
        return dataclasses.replace(base, cols_per_jvp=k)

    def colours_in(n: int) -> int:
        c = coupling.colours_at(0, n)
        return 1 if c is None else int(c.max()) + 1

    def step(n: int, k: int, calls: int, repeats: int = 2, memory: bool = True):
        c = coupling.colours_at(0, n)
        return cache.get(key + ("step", modes, n, k, calls, repeats, memory), spec.fn,
                         lambda: measure_step(spec, with_k(k), n, c, calls, repeats, memory))

    share = margin(device) * budget_bytes
    unit = coupling.unit
    extrapolated = unit > PROBE_MAX
    if chunk_size:
        target = chunk_size
    elif unit >= spec.batch_size:
        target = spec.batch_size
    else:
        target = max(unit, speed_chunk(spec.batch_size, p.saved_bytes_per_sample, result_bytes))
    if not extrapolated:
        n0 = coupling.stop(0, min(target, PROBE_MAX))
        sizes, scale = [n0], None
    else:  # one coupled set too large to measure: two prefixes, then a power law
        sizes = [s for s in EXTRAPOLATE_FROM if s < spec.batch_size]
        n0 = sizes[-1]
    for i, modes in enumerate(tries):
        coupling = declared
        if any(m == "reverse" and not t.batched for m, t in zip(modes, spec.targets)) and \
                (coupling.colours is None or coupling.num_colours < coupling.batch_size):
            coupling = dataclasses.replace(coupling, colours=torch.arange(coupling.batch_size),
                                           reason=f"{coupling.reason}; a product per sample for the shared tensors")
        width = n_out if "reverse" in modes else max(t.numel for t in spec.targets)
        base = Plan(strategy="coloured", modes=modes, batch_size=spec.batch_size, chunk_size=spec.batch_size,
                    rows_per_vjp=1, cols_per_jvp=1 if "reverse" not in modes else max(t.numel for t in spec.targets),
                    out_shape=p.out_shape, in_numels=tuple(t.numel for t in spec.targets), dtype=p.dtype,
                    device=device, coupling=coupling, max_seconds=max_seconds, batched_outputs=p.batched_outputs)
        if second:
            taylor = "reverse" not in modes
            width = 1 if taylor else n_out * (1 + dims)
            base = dataclasses.replace(base, strategy="taylor" if taylor else "double_backward", part=spec.part,
                                       rows_per_vjp=1, cols_per_jvp=1)
        try:
            step(sizes[0], 1, 1)
            break
        except Exception as e:  # noqa: BLE001 - as in make_plan: the other mode may run
            if i == len(tries) - 1 or is_out_of_memory(e):
                raise
    fits = {}
    for n in sizes:
        # Each measurement only what it is for: every run is a forward and O(n) products over the set.
        (m1, t1), (_, t5) = step(n, 1, 1), step(n, 1, 5, memory=False)
        m2 = step(n, min(2, colours_in(n) * width), 1, repeats=0)[0]
        # Per call over four calls (a quarter of the noise of one difference), and at least a quarter
        # of the forward plus one call: a backward product costs about as much as a forward, and a
        # difference of short timings can come out near zero.
        t_call = max((t5 - t1) / 4, t1 / 4, 1e-7)
        fits[n] = (m1, m2 - m1, t_call, max(t1 - t_call, 0.0), t1)  # mem a+b, b, t per call, t forward, t1
    if extrapolated:
        (na, fa), (nb, fb) = list(fits.items())[0], list(fits.items())[-1]
        scale = [_power(na, nb, u, v) for u, v in zip(fa, fb)]
        scale[2] = scale[3] = scale[4]  # times grow as the forward-and-one-call does (the robust timing)
        n = unit if chunk_size is None else max(chunk_size, unit)
        one_k, per_k, t_call, t_fwd = (fb[i] * (n / nb) ** scale[i] for i in range(4))
        n_chunk = coupling.stop(0, n)
    else:
        one_k, per_k, t_call, t_fwd, _ = fits[n0]
        n_chunk = n0
    per_k = max(per_k, 0.0)
    pairs = colours_in(n_chunk) * width if not extrapolated else coupling.num_colours * width
    base_mem = one_k - per_k
    per_set = (one_k * min(unit, n_chunk) / n_chunk)  # one coupled set, forward and one product
    if per_set > share and not chunk_size:
        need = per_set / margin(device)
        raise BudgetError(
            f"chunkjac: budget={format_bytes(budget_bytes)} cannot hold one coupled set of {min(unit, n_chunk):,} samples "
            f"({describe(coupling)}) on {device}: its forward and one product need about "
            f"{format_bytes(per_set)} (with the planner's margin, a budget of {format_bytes(need)}). "
            f"Pass budget='{_round_up(need)}' or more, or tell chunkjac which samples interact "
            "(coupling=<group ids> or a dependency structure) so that chunks can be smaller.")
    k_fit = int(max(1, min(pairs, KMAX, (share - base_mem) // per_k if per_k > 0 else pairs)))
    k, per_pair = 1, t_call
    if k_fit > 1 and not extrapolated and not second and not torch.are_deterministic_algorithms_enabled():
        # Vectorising pairs pays (or not) by the first few: try at most KTRY, once, time only; a try
        # of KMAX pairs over 1,024 attention samples cost a quarter of the run it planned.
        k_try = min(k_fit, KTRY)
        t_k = step(n0, k_try, 1, repeats=1, memory=False)[1] - t_fwd
        if t_k / k_try < VECTORISE_GAIN * per_pair:  # vectorise only where it clearly pays
            k, per_pair = k_try, t_k / k_try
    # Chunks of several coupled sets: scale linearly from the measured chunk, within the budget.
    size = n_chunk
    if not extrapolated and unit < spec.batch_size:
        mem_k = base_mem + per_k * k
        room = int(n0 * share / mem_k) if mem_k > 0 else spec.batch_size
        size = chunk_size or max(1, min(target, room))
    plan = dataclasses.replace(with_k(k), chunk_size=size, budget_bytes=budget_bytes, extrapolated=extrapolated)
    # Every chunk's cost from its own size and colours: uneven groups make chunks of unequal cost.
    sizes, colours = plan.chunk_table()
    if extrapolated:
        colours = np.full_like(colours, coupling.num_colours)
    calls = -(-colours * width // k)
    seconds = float(((sizes / n_chunk) * (t_fwd + calls * per_pair * k)).sum())
    return dataclasses.replace(plan, colours=int(colours.max()), seconds=seconds,
                               peak_bytes=int(sizes.max() / n_chunk * (base_mem + per_k * k)))


def _power(na: int, nb: int, va: float, vb: float) -> float:
    """The exponent of n between two measurements, kept in [1, 3] (no coupled work grows slower than
    linearly in the set it runs on; attention grows quadratically)."""
    if va <= 0 or vb <= 0:
        return 1.0
    return min(3.0, max(1.0, math.log(vb / va) / math.log(nb / na)))
