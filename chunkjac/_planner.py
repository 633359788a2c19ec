"""The planner: from a call's spec and a probe of fn, the plan (strategy, AD modes, rows or columns
per batched product, chunk size). The one place where a chunk size is decided: ``make_plan`` for
independent samples, ``make_coupled_plan`` for interacting ones.

# NOTE: [Planning that costs almost nothing]
# A one-shot job (a notebook cell, a script, ``chunkjac dump``) pays its plan once and in full, so
# planning must be a small fraction of the run. It used to time every candidate on chunks of its own,
# forward mode included (whose first use in a process costs about a second of PyTorch's set-up), and
# measure each one's memory under the profiler: as long as the run on the demo. Now:
#  1. Candidates come from the strategies, ranked by their cost model (batched products per chunk,
#     see [Choosing the AD mode] in _strategies/_cost); the first that runs on a couple of samples is
#     the plan. Candidates far more expensive by the model (1.5x: forward mode where reverse is
#     cheaper by the counts) are never run at all.
#  2. Memory comes from the strategy's model of bytes per sample (activations measured once by the
#     probe); it is measured (two chunk sizes, fitted as a + b * n) only where the model puts the
#     chunk near the budget, and chunks are sized by speed and budget as before (see [Chunking for
#     speed]).
#  3. Time is measured on the run itself (see [Timing on the run's first chunks] in _executor):
#     candidates of about the same cost ride along as ``Plan.trials``, each runs one of the first
#     chunks, their results kept, and the fastest carries the rest. A plan asked for with
#     ``chunkjac.plan`` has no run to time: it times its chunk once, for the estimate it prints.
#  4. What a run decided is remembered in the process (``probe_cache``) and on disk (``_plancache``):
#     the next call, or a rerun of the script, starts from it and times nothing.
# Under torch.use_deterministic_algorithms(True) nothing is timed and nothing switches: the cost model
# decides, so every run computes the same bits.
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

import numpy as np
import torch

from ._budget import format_bytes
from ._coupling import Coupling, describe
from ._errors import BudgetError, RandomFunctionError, is_out_of_memory
from ._memo import ProbeCache
from ._plan import Plan
from ._probe import Measurement, Probe, best_seconds, measure_memory, probe
from ._spec import Spec
from ._strategies import STRATEGIES

from ._strategies._cost import JVP_COST  # noqa: E402 - the coupled planner's count rule

CACHE_BYTES = 32 * 2**20
TRIAL_COST = 1.5      # candidates within this factor of the first one's cost are timed on the run
TRIALS_MAX = 2
PROJECTED_ROWS = 1024  # rows (samples x outputs) per chunk of a projected call (see make_plan)
TRIAL_CHUNKS = 8      # chunks of the run per trial at least: a loser runs on one chunk in eight at most
VALIDATE = 2          # samples a candidate runs on before it is chosen
TIME_MIN_BATCH = 256  # smaller batches run faster than a timing of them would take
MEMORY_MARGIN = 0.25  # the model's peak under this share of the budget: not measured
MEMORY_MODEL_SAFETY = 2.0
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


def speed_chunk(batch_size: int, saved_bytes_per_sample: float, result_bytes_per_sample: float = 0.0) -> int:
    """The chunk whose saved activations fill about CACHE_BYTES (see [Chunking for speed]).

    Where the Jacobian is larger per sample than the activations (an MLP 784 -> 256 -> 10: 31 kB
    against 4 kB), writing it dominates and chunks only add a copy into the result (measured: 0.61 s
    in chunks of 8k against 0.42 s in one chunk), so the whole batch is one speed chunk.
    """
    if saved_bytes_per_sample <= 0 or result_bytes_per_sample > saved_bytes_per_sample:
        return batch_size
    return max(1, min(batch_size, int(CACHE_BYTES // saved_bytes_per_sample)))


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
              cache: ProbeCache | None = None, remembered: dict | None = None) -> Plan:
    """The plan for independent samples (see [Planning that costs almost nothing]): the cheapest
    candidate by the strategies' cost model that runs, chunked by speed and budget, with the
    candidates of about its cost as ``trials`` for the run to time. ``remembered``: the choice an
    earlier process's run settled on (see _plancache): where it is one of this call's candidates, it
    is tried first, its chunk kept where it fits the budget, and nothing is timed.

    ``chunk_size`` overrides the chunk (the plan still reports its predicted peak). Raises
    :class:`BudgetError` when the budget cannot hold one sample of the plan.
    """
    cache, key = _keyed(cache, spec, str(device))
    p = cache.get(key + ("probe",), spec.fn, lambda: probe(spec))
    if spec.part is not None:
        spec.part.check_output(p.out_shape)
    ranked = sorted((c for s in STRATEGIES.values() for c in s.candidates(spec, p, device)), key=lambda c: c[1])
    first, kept = None, None
    if remembered is not None:
        same = (remembered["strategy"], remembered["part"], tuple(remembered["modes"]), remembered["rows_per_vjp"],
                remembered["cols_per_jvp"])
        first = next((q for q, _ in ranked if _choice(q) == same), None)
        if first is not None:
            ranked = [(first, 0.0)] + [c for c in ranked if _choice(c[0]) != same]
            if remembered["peak_bytes"] <= margin(device) * budget_bytes:
                kept = remembered["chunk_size"]  # (sized for this budget by the earlier run)
    plan, cost, failure = None, 0.0, None
    for q, c in ranked:
        if isinstance(failure, RandomFunctionError) and "forward" in q.modes:
            continue  # a looped forward mode would differentiate a new random draw per column
        try:
            cache.get(key + ("runs",) + _choice(q), spec.fn, lambda q=q: _runs(spec, q))
        except Exception as e:  # noqa: BLE001 - whatever stops a candidate, another may run
            # In auto mode a candidate that cannot run (no forward-mode formula, an old-style
            # autograd.Function, numpy inside fn, a random fn under vmap, a chunkjac call inside fn
            # under torch.func.jvp) is not chosen; an explicit mode, or no candidate left, reports the
            # first failure. Out of memory on two samples: another may fit.
            if spec.mode != "auto" and first is None:
                raise
            failure = failure or e
            continue
        plan, cost = q, c
        break
    if plan is None:
        raise failure
    recalled = plan is first and kept is not None and not chunk_size
    result_bytes = result_numel(spec, p) * p.dtype.itemsize
    if spec.project is not None:
        # The chunk's full rows exist while it is projected; the projection's matrices are held whole
        # where they take at most half the budget (see _executor._chunk).
        result_bytes += p.out_numel * spec.project.numel * p.dtype.itemsize
        held = spec.project.dense_bytes(p.dtype)
        held = held if held <= budget_bytes / 2 else 0
        budget_bytes = int(budget_bytes - held)
    activations, work = STRATEGIES[plan.strategy].memory(spec, p, plan)
    fast = speed_chunk(spec.batch_size, activations, result_bytes)
    if spec.project is not None:
        # A dense projection reads its matrix once per chunk: chunks of PROJECTED_ROWS rows keep that a
        # small part of the products and the chunk's full rows small (MLP 784 -> 256 -> 10, 10^4
        # samples, dim 1,024: one chunk of the whole batch took 2.1x the time of chunks of 1,000). The
        # Kronecker route holds no full rows; the same chunks keep its layers' inputs, their
        # projections and output gradients small (same MLP: 58 MB in chunks of 1,024, 108 MB of 4,096).
        fast = max(1, min(spec.batch_size, -(-PROJECTED_ROWS // max(p.out_numel, 1))))
    m = Measurement(mem_const=0.0, mem_per_sample=MEMORY_MODEL_SAFETY * (activations + work + result_bytes))
    share = margin(device) * budget_bytes
    if recalled:  # the earlier run's chunk and its peak: nothing to measure
        n = min(kept, spec.batch_size)
        m = Measurement(mem_const=0.0, mem_per_sample=remembered["peak_bytes"] / n)
        chunk_size = n
    n = min(chunk_size, spec.batch_size) if chunk_size else min(fast, _fits(m, budget_bytes, spec.batch_size,
                                                                             margin(device)))
    if not recalled and (n < 1 or m.peak(n) > MEMORY_MARGIN * share):  # near the budget: measure, not model
        m = cache.get(key + ("memory",) + _choice(plan), spec.fn, lambda: measure_memory(spec, plan))
        if not chunk_size:
            n = min(fast, _fits(m, budget_bytes, spec.batch_size, margin(device)))
    adopted = 0
    if not chunk_size and n < spec.batch_size <= fast and _adopted(spec, m, budget_bytes, result_bytes, device):
        n, adopted = spec.batch_size, spec.batch_size * result_bytes
    if n < 1:
        need = m.peak(1) / margin(device)
        raise BudgetError(
            f"chunkjac: budget={format_bytes(budget_bytes)} cannot hold the work of even one sample on "
            f"{device}: one sample needs about {format_bytes(m.peak(1))} (with the planner's margin, a "
            f"budget of {format_bytes(need)}). Pass budget='{_round_up(need)}' or more.")
    if spec.project is not None:
        plan = dataclasses.replace(plan, held_bytes=held)
    plan = dataclasses.replace(plan, chunk_size=n, peak_bytes=int(m.peak(n)), budget_bytes=budget_bytes,
                               batched_outputs=p.batched_outputs, result_bytes=adopted)
    deterministic = torch.are_deterministic_algorithms_enabled()
    # Under create_graph the user pays the forward pass and the backward of the step, and the run times
    # only the forward: the cost model decides, the same way in every run (a loaded machine once made
    # a PINN step switch strategies from run to run).
    if first is None and not deterministic and not spec.create_graph and plan.num_chunks >= TRIAL_CHUNKS:
        trials = []
        for q, c in ranked:
            if len(trials) == min(TRIALS_MAX, plan.num_chunks // TRIAL_CHUNKS) or c > TRIAL_COST * cost or \
                    _choice(q) == _choice(plan):
                continue
            per = sum(STRATEGIES[q.strategy].memory(spec, p, q)) + result_bytes
            if MEMORY_MODEL_SAFETY * per * n > share and not chunk_size:
                continue  # it would not fit the plan's chunk
            try:
                cache.get(key + ("runs",) + _choice(q), spec.fn, lambda q=q: _runs(spec, q))
            except Exception:  # noqa: BLE001 - it cannot run fn: not a candidate
                continue
            trials.append(dataclasses.replace(q, chunk_size=n, peak_bytes=int(MEMORY_MODEL_SAFETY * per * n),
                                              budget_bytes=budget_bytes, batched_outputs=p.batched_outputs))
        plan = dataclasses.replace(plan, trials=tuple(trials))
    return plan


def _choice(plan: Plan) -> tuple:
    """What distinguishes candidates: the strategy, modes and vectorisation."""
    return (plan.strategy, None if plan.part is None else plan.part.digest, plan.modes, plan.rows_per_vjp,
            plan.cols_per_jvp)


def _runs(spec: Spec, plan: Plan) -> bool:
    """The candidate runs on the first samples (raises otherwise)."""
    from ._probe import _run
    _run(spec, plan, min(spec.batch_size, VALIDATE))
    return True


def estimate(spec: Spec, plan: Plan, cache: ProbeCache | None = None) -> Plan:
    """The plan with its ``seconds``, from one timed chunk (chunkjac.plan prints it; a run times its
    own chunks instead). Coupled plans, small batches and deterministic runs keep theirs."""
    from ._probe import _run
    if plan.seconds is not None or plan.coupling is not None or spec.batch_size <= TIME_MIN_BATCH or \
            torch.are_deterministic_algorithms_enabled():
        return plan
    cache, key = _keyed(cache, spec, str(plan.device))
    n = min(plan.chunk_size, spec.batch_size)
    # (best of two: the first run of a chunk this size pays the allocator's first use of its memory)
    t = cache.get(key + ("seconds",) + _choice(plan) + (n,), spec.fn,
                  lambda: best_seconds(lambda: _run(spec, plan, n), plan.device, 2))
    return dataclasses.replace(plan, seconds=t * plan.num_chunks)


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
    if spec.part is not None:
        spec.part.check_output(p.out_shape)
    n_out = p.out_numel
    batched_in = sum(t.numel for t in spec.targets if t.batched)
    shared_in = sum(t.numel for t in spec.targets if not t.batched)
    # The count rule per chunk of n samples and c colours: reverse mode c x n_out products (n x n_out
    # with a shared target: a product per sample, see [Shared tensors in reverse mode] in coloured),
    # forward mode JVP_COST x (c x batched elements + shared elements). (Per-sample parameter
    # Jacobians of a BatchNorm CNN, 6 samples: 30 VJPs of one forward, where forward mode needs 1,461
    # JVPs, one per parameter element.)
    n_probe = coupling.stop(0, min(spec.batch_size, PROBE_MAX))
    c_probe = coupling.colours_at(0, n_probe)
    c_probe = 1 if c_probe is None else int(c_probe.max()) + 1
    reverse_count = (n_probe if shared_in else c_probe) * n_out
    forward_count = JVP_COST * (c_probe * batched_in + shared_in)
    preferred = "forward" if forward_count < reverse_count or spec.part is not None else "reverse"
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
        # (floored: a difference of two noisy timings can come out negative, and so did an estimate)
        t_k = max(step(n0, k_try, 1, repeats=1, memory=False)[1] - t_fwd, t_call / 4)
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
