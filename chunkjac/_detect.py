"""coupling="auto": find out whether samples interact, before any strategy relies on them not doing so.

# NOTE: [What the coupling check checks]
# Windows. M = min(B, 64) contiguous samples (fn runs on contiguous chunks): the first M, the M in
# the middle ([(B-M)//2, (B-M)//2 + M)) and the last M; fewer when they coincide (B <= 64: one).
# In each window:
#  1. Derivatives. Every batched floating-point input is made a leaf, except those autograd refuses
#     to differentiate (a loss's target, BatchNorm's running statistics passed as inputs: found by a
#     forward that fails with them requiring grad, and dropped; the values below still cover them;
#     a wrt input that cannot be differentiated is an error). One forward, then 1 + ceil(log2 M)
#     VJPs in one batched call (one by one, on the retained graph, when a backward has no batching
#     rule): a random cotangent u on all M samples, and u restricted to the samples whose index has
#     bit b set, for each bit b. If samples are independent, the gradient of u restricted to a set A
#     vanishes on every sample outside A, and the rest of it (u's gradient minus it) on every sample
#     inside A. Any pair i != j differs in some bit, so any dependency y_i <- x_j within the window,
#     sparse or not, shows (for almost every u). Through the wrt inputs it means coupled derivatives;
#     through another batched input (keys/values, a mask made of floats) it means that chunks would
#     change the answer, even though the derivatives w.r.t. wrt are per-sample.
#  2. Values. fn on parts of the window alone must give the same outputs (every tensor output that
#     carries the batch) as on the whole window: the two halves, and parts of 1, 1, 2, 4, ..., M/2
#     samples (single samples, odd and even sizes, boundaries off the middle: a chunk can end
#     anywhere). This is what a chunk boundary does, and it catches couplings through inputs that
#     cannot be differentiated (integer indices, detached values, lengths / lengths.max()), batch
#     statistics (BatchNorm in training mode) and functions of the batch size. fn runs under
#     autograd with the wrt inputs requiring grad, as in the strategies, so that a branch on
#     torch.is_grad_enabled() or x.requires_grad goes the same way. The output to differentiate must
#     hold the samples in its leading dim on every part (a time-major RNN whose T happens to equal B
#     does not): an error otherwise. Skipped (except that shape check, on one half) when fn draws
#     random numbers (the global RNG advanced during the forward): two runs would not draw the same.
# Rounding. Differences count only above a relative tolerance of the loosest precision in play
# (float64 1e-9, float32 1e-5, float16 1e-2, bfloat16 3e-2), relative to the largest magnitude over
# the whole window: of each output tensor (all its elements, all M samples), and of each input's
# gradients (all VJP rows). Per element it would not do: a float32 matmul rounds differently for
# another batch size (BLAS blocking), and an output near zero turns that into any relative change
# (issue 20: up to 7e-3 per element on a float32 PINN MLP, at most 2.2e-6 of the window's largest
# output, even trained to outputs near zero). Rounding can still pass that tolerance (cancellation
# a(x) - b(x) of large terms, TF32), so a window that trips in float32, float16 or bfloat16 is
# checked again in float64: the float inputs cast, and every floating parameter and buffer of the
# modules fn reaches swapped for a float64 copy during the calls (as functional_call does; the
# modules are left as they were), autocast off. The float64 verdict stands, and the remaining
# windows run in float64 only. Where the float64 run is impossible (fn casts to float32, a float32
# tensor held by a closure meets a float64 one in a matmul, a module deeper than reachable_state
# looks, no memory for the copies), the low-precision verdict stands: a false alarm stays possible.
# Cost: per window at most 11 forwards of at most M samples (1 for the derivatives, 1 whole, 2
# halves, 7 uneven parts for M = 64) and one batched VJP of 1 + ceil(log2 M) rows (7 for M = 64):
# with three windows 33 forwards and 3 VJP calls. Plus, at most once, the tripping window again in
# float64; plus, only when a forward fails with every float input requiring grad, up to 2 + (number
# of batched float inputs) forwards to find those autograd refuses. fn random: 3 forwards a window.
# A model too large for M samples at once is checked on M/2, M/4, ...
# Not seen: a coupling only between samples of which no window holds two (across the gaps between
# windows), or below the tolerance, or that depends on plain Python attributes changed between calls.
#
# Caching: the verdict is remembered with the call's other decisions, under the guard described in
# [What a remembered decision is keyed on] (_memo).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from . import _autograd
from ._coupling import log2_ceil
from ._errors import is_out_of_memory
from ._function import FnError, call, chunk_args, preserved_buffers, reachable_state, select, working_dtypes
from ._spec import Spec

CHECK_SAMPLES = 64
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Finding:
    """What the check found: ``derivatives`` (y_i depends on some wrt x_j, j != i) and ``splittable``
    (fn on a part of the batch gives that part's outputs unchanged); ``reason`` in words."""

    derivatives: bool
    splittable: bool
    reason: str


@dataclass(frozen=True)
class _Window:
    deriv: str        # a coupling through the wrt inputs
    through: str      # through another batched input
    values: str       # fn on parts differs from fn on the whole
    random: bool      # fn draws random numbers
    dropped: tuple    # batched float inputs autograd cannot differentiate

    @property
    def found(self) -> bool:
        return bool(self.deriv or self.through or self.values)


class _NotFloat64(Exception):
    """fn does not compute in float64 when given float64 inputs and parameters."""


def check(spec: Spec) -> Finding:
    _refuse_meta(spec)
    m = min(spec.batch_size, CHECK_SAMPLES)
    if m < 2:
        return Finding(False, True, "a single sample")
    while True:
        try:
            with preserved_buffers(spec.fn):
                return _check(spec, m)
        except FnError as e:
            if m >= spec.batch_size:
                raise
            return _whole(spec, e)
        except Exception as e:
            if not is_out_of_memory(e) or m <= 2:
                raise
            m //= 2  # a model too large for 64 samples at once: check on fewer


WHOLE_MAX = 4096


def _whole(spec: Spec, e: FnError) -> Finding:
    """fn fails on a window of the batch: a graph layer whose shared edge_index names all N nodes runs
    on all of them or not at all. Checked as one window of the whole batch where that is small enough
    (1 + log2 B VJPs); beyond, the user says how samples interact."""
    if spec.batch_size > WHOLE_MAX:
        raise FnError(
            f"{e.note} The coupling check runs fn on windows of {CHECK_SAMPLES} samples. If fn can run only on "
            "the whole batch (a graph layer whose shared edge_index names every node), pass coupling=<that "
            "edge_index> or group ids (chunkjac then runs the forward on the whole batch and extracts by "
            "colours), or coupling='coupled' / 'unsplittable'.", str(e.__cause__)) from e.__cause__
    try:
        with preserved_buffers(spec.fn):
            return _check(spec, spec.batch_size)
    except FnError:
        raise e from e.__cause__  # fn fails on the whole batch too: its first failure says it


def _check(spec: Spec, m: int) -> Finding:
    # None: float64 not needed yet; True: every window from now on runs in float64; False: cannot.
    floor = max(RTOL.get(d, 1e-5) for d in working_dtypes(spec, torch.float64))
    wide = False if floor <= RTOL[torch.float64] else None
    deriv = through = values = ""
    random, dropped = False, set()
    for start in _windows(spec.batch_size, m):
        w = None
        if wide:
            try:
                w = _window(spec, start, m, True, floor)
            except Exception:  # noqa: BLE001 - e.g. no memory for float64 here: low precision it is
                wide = False
        w = w or _window(spec, start, m, False, floor)
        if w.found and wide is None:
            try:  # rounding or coupling? float64 tells (see the NOTE)
                w, wide = _window(spec, start, m, True, floor), True
            except Exception:  # noqa: BLE001 - float64 impossible here: the low-precision verdict stands
                wide = False
        deriv, through, values = deriv or w.deriv, through or w.through, values or w.values
        random, dropped = random or w.random, dropped | set(w.dropped)
        if deriv:
            break  # the strongest verdict: no window can change it
    if deriv:
        return Finding(True, False, deriv)
    if through or values:
        return Finding(False, False, through or values)
    notes = [" (fn is random: values not compared)"] if random else []
    notes += [f" (input {i} cannot be differentiated: checked by values only)" for i in sorted(dropped)]
    return Finding(False, True, "no interaction found" + "".join(notes))


def _windows(b: int, m: int) -> list[int]:
    """Starts of the windows of m samples: first, middle, last (contiguous, as chunks are)."""
    return sorted({0, (b - m) // 2, b - m})


def _refuse_meta(spec: Spec) -> None:
    """Before any work: the check reads values (.item()), and so does every strategy."""
    where = [f"input {k}" for k, a in enumerate(spec.args) if isinstance(a, torch.Tensor) and a.is_meta]
    for name, v in reachable_state(spec.fn):
        tensors = [*v.parameters(), *v.buffers()] if isinstance(v, nn.Module) else [v]
        if any(t.is_meta for t in tensors):
            where.append(f"{name} ({'a module with tensors' if isinstance(v, nn.Module) else 'a tensor'})")
    if spec.device.type == "meta":
        where.append("the compute device")
    if where:
        what = where[0]
        raise ValueError(
            f"chunkjac: {what} is on the meta device. Meta tensors hold no values (only shapes and dtypes), "
            "and a Jacobian needs real data. Materialise them first (e.g. model.to_empty(device='cpu') and "
            "load the weights; real inputs), or use chunkjac.plan on real tensors for a cost estimate.")


def _tol(dtype: torch.dtype, floor: float, wide: bool) -> float:
    """The tolerance of the loosest precision in play: ``floor`` is that of the inputs and of the
    tensors fn reaches (working_dtypes): a float32 model whose output is cast to float64 rounds like
    float32 (a single sample takes another BLAS path than 64 of them). In float64 (wide), float64's."""
    return max(RTOL[torch.float64] if wide else floor, RTOL.get(dtype, 1e-5))


def _rng_state(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _window(spec: Spec, start: int, m: int, wide: bool, floor: float) -> _Window:
    """Both checks on samples [start, start + m); in float64 if ``wide``."""
    with _float64(spec) if wide else contextlib.nullcontext():
        deriv, through, random, dropped = _derivatives(spec, start, m, wide, floor)
        values = _values(spec, start, m, wide, floor, random, bool(deriv))
    return _Window(deriv, through, values, random, dropped)


@contextlib.contextmanager
def _float64(spec: Spec):
    """fn computing in float64: every floating parameter and buffer of the modules fn reaches swapped
    for a float64 copy during the call, autocast off. Swapped and put back by setattr, so that
    modules that cache their tensors (an LSTM's _flat_weights) see both swaps; tied tensors share
    one copy. The modules are left as they were; buffer updates (running statistics) land in the copies."""
    swapped = []  # (submodule, attribute, original), in order
    try:
        copies: dict[int, torch.Tensor] = {}
        for _, v in reachable_state(spec.fn):
            if not isinstance(v, nn.Module):
                continue
            named = [*v.named_parameters(remove_duplicate=False), *v.named_buffers(remove_duplicate=False)]
            for name, t in named:
                if t.is_floating_point() and t.dtype != torch.float64:
                    if id(t) not in copies:
                        c = t.detach().to(torch.float64)
                        copies[id(t)] = nn.Parameter(c, t.requires_grad) if isinstance(t, nn.Parameter) else c
                    owner, _, attr = name.rpartition(".")
                    sub = v.get_submodule(owner)
                    swapped.append((sub, attr, t))
                    setattr(sub, attr, copies[id(t)])
        with torch.autocast(spec.device.type, enabled=False) if torch.amp.is_autocast_available(spec.device.type) \
                else contextlib.nullcontext():
            yield
    finally:
        for sub, attr, t in reversed(swapped):
            setattr(sub, attr, t)


def _args(spec: Spec, a: int, b: int, wide: bool) -> list:
    args = chunk_args(spec, a, b)
    if wide:
        args = [v.to(torch.float64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for v in args]
    return args


def _derivatives(spec: Spec, start: int, m: int, wide: bool, floor: float) -> tuple[str, str, bool, tuple]:
    """(coupling through wrt inputs, coupling through other batched inputs, fn is random, the batched
    float inputs dropped because autograd cannot differentiate them)."""
    args = _args(spec, start, start + m, wide)
    wrt = [t.index for t in spec.targets if t.batched]
    floats = [i for i, (a, d) in enumerate(zip(args, spec.in_dims))
              if d is not None and isinstance(a, torch.Tensor) and a.is_floating_point()]
    leaves = floats
    before = _rng_state(spec.device)
    try:
        run = _leaf(args, leaves)
        with torch.enable_grad():
            out = call(spec, run)
    except Exception as e:  # noqa: BLE001 - an op refusing to differentiate an input? (see _differentiable)
        if is_out_of_memory(e) or not floats:
            raise
        leaves = _differentiable(spec, args, floats, wrt, e)
        before = _rng_state(spec.device)
        run = _leaf(args, leaves)
        with torch.enable_grad():
            out = call(spec, run)
    random = not torch.equal(before, _rng_state(spec.device))
    y = select(spec, out, m)
    if wide and y.dtype != torch.float64:
        raise _NotFloat64(f"fn's output is {y.dtype} on float64 inputs and parameters")
    if not y.requires_grad or not leaves:
        return "", "", random, tuple(i for i in floats if i not in leaves)
    bits = log2_ceil(m)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, y.dtype)
    member = (torch.arange(m, device=y.device)[None, :] >> torch.arange(bits, device=y.device)[:, None]) & 1
    masks = torch.cat([torch.ones(1, m, device=y.device, dtype=torch.long), member]).to(y.dtype)
    cots = masks.reshape(bits + 1, m, *[1] * (y.dim() - 1)) * u
    # A backward that autograd cannot run for one of the other inputs (a derivative not implemented
    # there): check through the wrt inputs alone.
    tries = [leaves]
    if any(i not in wrt for i in leaves) and any(i in wrt for i in leaves):
        tries.append([i for i in leaves if i in wrt])
    for k, ids in enumerate(tries):
        try:
            gs = _vjps(y, [run[i] for i in ids], cots)
            break
        except Exception as e:  # noqa: BLE001
            if is_out_of_memory(e) or k == len(tries) - 1:
                raise
    dropped = tuple(i for i in floats if i not in ids)
    found = {}
    for i, g in zip(ids, gs):
        if g is None:
            continue
        g = g.movedim(1 + spec.in_dims[i], 1).reshape(bits + 1, m, -1).to(torch.float64)
        j, rel = _leak(g, member.bool())
        if rel > _tol(y.dtype, floor, wide):
            found[i] = (start + j, rel)
    deriv = through = ""
    window = f"the first {m}" if start == 0 else f"samples [{start}, {start + m})"
    for i, (j, rel) in found.items():
        text = (f"the input of sample {j} (input {i}) changes the outputs of other samples among {window} "
                f"(relative size {rel:.2g}, found by VJPs with random cotangents)")
        if i in wrt:
            deriv = deriv or text
        else:
            through = through or text
    return deriv, through, random, dropped


def _cause(e: Exception) -> BaseException:
    """fn's own exception, which ``call`` wraps in an FnError."""
    return e.__cause__ if isinstance(e, FnError) and e.__cause__ is not None else e


def _leaf(args: list, ids: list[int]) -> list:
    run = list(args)
    for i in ids:
        run[i] = args[i].detach().requires_grad_(True)
    return run


def _leak(g: torch.Tensor, inside: torch.Tensor) -> tuple[int, float]:
    """g: (1 + bits, m, n) gradients of u and of u restricted to each bit set A. The largest part that
    reaches samples it should not, relative to the largest gradient in the window, and its sample.
    Non-finite values are no evidence either way (inf - inf)."""
    g = torch.where(g.isfinite(), g, torch.zeros((), dtype=g.dtype, device=g.device))
    full, parts = g[0], g[1:]
    # Gradient of u restricted to A, on samples outside A; and of u restricted to not-A, inside A.
    off_a = (parts * (~inside)[..., None]).abs().amax(dim=(0, 2))
    off_b = ((full[None] - parts) * inside[..., None]).abs().amax(dim=(0, 2))
    off = torch.maximum(off_a, off_b)
    scale = g.abs().max().item() if g.numel() else 0.0
    if scale == 0:
        return 0, 0.0
    return int(off.argmax()), off.max().item() / scale


def _differentiable(spec: Spec, args: list, floats: list[int], wrt: list[int], first: Exception) -> list[int]:
    """fn failed with every batched float input requiring grad (``first``): some op refuses to
    differentiate an argument in the forward ("not differentiable with respect to argument
    'target'"). The inputs fn can run with requiring grad: the wrt ones, then the others one by
    one. A wrt input it cannot is an error; fn failing with none requiring grad is fn's own error."""

    def runs(ids) -> bool:
        try:
            with torch.enable_grad():
                call(spec, _leaf(args, ids))
        except Exception as e:  # noqa: BLE001
            if is_out_of_memory(e):
                raise
            return False
        return True

    base = [i for i in floats if i in wrt]
    if base == floats or not runs(base):
        if not runs([]):
            raise first
        bad = next((i for i in base if not runs([i])), base[0])
        why = _cause(first)
        raise ValueError(
            f"chunkjac: fn cannot be differentiated with respect to input {bad}, which wrt names: with that "
            f"input requiring grad fn fails ({type(why).__name__}: {why}); without it fn runs. PyTorch "
            "has no derivative for some arguments of some ops (a loss's target, BatchNorm's running "
            "statistics). Differentiate with respect to another input (wrt=<its index>), or compute this "
            "derivative by other means (e.g. finite differences).") from None
    kept = list(base)
    for i in floats:
        if i not in base and runs(kept + [i]):
            kept.append(i)
    return sorted(kept)


def _vjps(y: torch.Tensor, prims: list, cots: torch.Tensor) -> list:
    """The VJPs of the rows of cots in one batched call; one by one when some backward has no batching
    rule (torch.compile, per-sample-gradient hooks, a custom Function calling .item()). The batched try
    retains the graph: a failure half-way must not leave the one-by-one calls a freed graph."""
    try:
        return list(_autograd.grad(y, prims, cots, allow_unused=True, is_grads_batched=True,
                                        retain_graph=True))
    except Exception:  # noqa: BLE001 - any failure of the batched call: the same VJPs one by one
        pass
    rows = [_autograd.grad(y, prims, c, allow_unused=True, retain_graph=True) for c in cots]
    return [torch.stack(g) if g[0] is not None else None for g in zip(*rows)]


def _pick(spec: Spec, out):
    """The output to differentiate, without select's checks (the window's forward made those)."""
    if spec.output is None:
        return out
    try:
        return out[spec.output]
    except (IndexError, KeyError, TypeError):
        return None


def _values(spec: Spec, start: int, m: int, wide: bool, floor: float, random: bool, coupled: bool) -> str:
    h = m // 2
    splits = [(0, h), (h, m)] + _uneven(m)

    def run(a: int, b: int):
        # Under autograd, the wrt inputs requiring grad, as the strategies run fn: a branch on
        # torch.is_grad_enabled() or x.requires_grad takes the same way here.
        args = _args(spec, start + a, start + b, wide)
        for t in spec.targets:
            if t.batched and args[t.index].is_floating_point():
                args[t.index] = args[t.index].detach().requires_grad_(True)
        with torch.enable_grad():
            out = call(spec, args)
        return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, out)

    whole = None if random else run(0, m)
    parts = []
    for a, b in splits[:1] if random else splits:
        try:
            part = run(a, b)
        except Exception as e:  # noqa: BLE001 - any failure on a part means chunks cannot run
            why = _cause(e)
            return f"fn fails on a part of the batch ({b - a} of {m} samples): {type(why).__name__}: {why}"
        rows = _check_rows(spec, _pick(spec, part), start + a, start + b, m, coupled)
        if rows:
            return rows
        parts.append(((a, b), part))
    if random:
        return ""  # two runs would not draw the same numbers: only the shape is checked
    for (a, b), part in parts:
        found = _compare(whole, part, a, b, m, start, wide, floor)
        if found:
            return found
    return ""


def _check_rows(spec: Spec, y, a: int, b: int, m: int, coupled: bool) -> str:
    """Whether the output to differentiate holds the samples of a part in its leading dim. On the
    window of m it passed select, but that can be a coincidence: a time-major RNN's (T, B, H) with
    T = m. Where the window's derivatives are per-sample (y_i depends on x_i alone), its leading dim
    does hold the samples, and only the whole batch can be run (a shared input with one row per
    sample: addmm's bias): that is said, for an unsplittable run. Otherwise it is refused."""
    n = b - a
    if isinstance(y, torch.Tensor) and not (y.dim() and y.shape[0] == n):
        where = "fn's output" if spec.output is None else f"fn's output[{spec.output!r}]"
        if not coupled:
            return (f"{where} has shape {tuple(y.shape)} for a part of {n} samples: its leading dim follows "
                    f"the samples on the whole batch only (a shared input with one row per sample?)")
        raise ValueError(
            f"chunkjac: {where} has shape {tuple(y.shape)} for a part of {n} samples (samples [{a}, {b})), but "
            f"its leading dim must hold the samples: chunkjac runs fn on parts of the batch. On {m} samples "
            f"it had {m} rows only by coincidence (another dim of size {m}, e.g. time in a time-major RNN "
            "with in_dims=1). Return the samples first, e.g. out.transpose(0, 1), or use batch_first=True "
            "with in_dims=0.")


def _uneven(m: int) -> list[tuple[int, int]]:
    """Parts of 1, 1, 2, 4, ... samples covering [0, m): odd and even sizes, single samples, and
    boundaries other than the middle (a chunk can end anywhere)."""
    cuts, size, a = [], 1, 0
    while a < m:
        b = min(a + size, m)
        cuts.append((a, b))
        a, size = b, size if not cuts[1:] else size * 2
    return cuts


def _compare(whole, part, a: int, b: int, m: int, start: int, wide: bool, floor: float) -> str:
    """Where fn on samples [a, b) of the window alone differs from the same samples inside the whole
    window, relative to the largest magnitude of that output over the whole window (see the NOTE)."""
    leaves = [v for v in tree_leaves(whole) if isinstance(v, torch.Tensor)]
    got = [v for v in tree_leaves(part) if isinstance(v, torch.Tensor)]
    if len(got) != len(leaves):
        return "fn returns a different number of tensors for a part of the batch"
    n = b - a
    span = f"samples [{start + a}, {start + b})"
    for k, (whole_k, p) in enumerate(zip(leaves, got)):
        if not (whole_k.dim() and p.dim() and whole_k.shape[0] == m and p.shape[0] == n):
            continue  # not a per-sample output: chunks are refused for those elsewhere
        if whole_k.shape[1:] != p.shape[1:]:
            return f"fn's output {k} changes its per-sample shape with the number of samples"
        w = whole_k[a:b]
        if not w.is_floating_point():
            if not torch.equal(p, w):
                return f"fn's output {k} changes when {span} are run without the others"
            continue
        p64, w64 = p.to(torch.float64), w.to(torch.float64)
        finite = w64.isfinite() & p64.isfinite()
        if not torch.equal(w64.isfinite(), p64.isfinite()) or not torch.equal(w64[~finite], p64[~finite]) \
                and not (w64[~finite].isnan() & p64[~finite].isnan()).all():
            return f"fn's output {k} changes (non-finite values) when {span} are run alone"
        if finite.any():
            diff = (w64 - p64)[finite].abs()
            everywhere = whole_k.detach().to(torch.float64)
            scale = max(everywhere[everywhere.isfinite()].abs().max().item(), 1e-30)
            if diff.max().item() > _tol(whole_k.dtype, floor, wide) * scale:
                pos = start + a + int(finite.nonzero()[int(diff.argmax()), 0]) if finite.dim() else start + a
                return (f"the output of sample {pos} changes when {span} are run without the others "
                        f"(relative change {diff.max().item() / scale:.2g} of the output's largest magnitude)")
    return ""
