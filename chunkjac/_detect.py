"""coupling="auto": find out whether samples interact, before any strategy relies on them not doing so.

# NOTE: [What the coupling check checks]
# On the first M = min(B, 64) samples, with every batched floating-point input made a leaf:
#  1. Derivatives. One forward, then 1 + ceil(log2 M) VJPs in one batched call: a random cotangent u
#     on all M samples, and u restricted to the samples whose index has bit b set, for each bit b.
#     If samples are independent, the gradient of u restricted to a set A vanishes on every sample
#     outside A, and the rest of it (u's gradient minus it) on every sample inside A. Any pair i != j
#     differs in some bit, so any dependency y_i <- x_j among the M samples, sparse or not, shows
#     (for almost every u). A dependency through the wrt inputs means coupled derivatives; through
#     another batched input (keys/values, a mask made of floats) it means that chunks would change
#     the answer, even though the derivatives w.r.t. wrt are per-sample.
#  2. Values. fn on parts of the M samples alone must give the same outputs (every tensor output
#     that carries the batch) as on all M: the two halves, and parts of 1, 1, 2, 4, ..., M/2 samples
#     (single samples, odd and even sizes, boundaries off the middle: a chunk can end anywhere).
#     This is exactly what a chunk boundary does, and it catches couplings through inputs that
#     cannot be differentiated (integer indices, detached values, lengths / lengths.max()), batch
#     statistics (BatchNorm in training mode) and functions of the batch size. fn runs under
#     autograd with the wrt inputs requiring grad, as in the strategies, so that a branch on
#     torch.is_grad_enabled() or x.requires_grad goes the same way. Skipped when fn draws random
#     numbers (the global RNG advanced during the forward), since two runs would not draw the same.
# Differences count only above a dtype-dependent relative tolerance (float64 1e-9, float32 1e-5 of
# the largest gradient or output), so rounding (a different BLAS blocking for another batch size,
# x - mean(x) + mean(x)) is not mistaken for coupling. Cost: 11 forwards of at most 64 samples and
# one batched VJP of 1 + log2(64) = 7 rows; cached with the probe while fn's modules, their tensors
# (in-place versions) and the inputs stay the same objects (state_key). Not seen: a coupling that
# exists only between samples beyond the first 64 and not among them, or below the tolerance, or
# that depends on plain Python attributes changed between calls on the same tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

from ._coupling import log2_ceil
from ._errors import is_out_of_memory
from ._function import call, chunk_args, reachable_state, select, working_dtypes
from ._probe import preserved_buffers
from ._inputs import Source
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


def check(spec: Spec) -> Finding:
    m = min(spec.batch_size, CHECK_SAMPLES)
    if m < 2:
        return Finding(False, True, "a single sample")
    while True:
        try:
            with preserved_buffers(spec.fn):
                deriv, through, random = _derivatives(spec, m)
                values = None if random else _values(spec, m)
            break
        except Exception as e:
            if not is_out_of_memory(e) or m <= 2:
                raise
            m //= 2  # a model too large for 64 samples at once: check on fewer
    if deriv:
        return Finding(True, False, deriv)
    if through:
        return Finding(False, False, through)
    if values:
        return Finding(False, False, values)
    return Finding(False, True, "no interaction found" + (" (fn is random: values not compared)" if random else ""))


def state_key(spec: Spec) -> tuple:
    """What the check's answer may depend on besides shapes: the train/eval flags of every module fn
    is or reaches (closures, globals, partials), the identity and in-place version of every tensor
    among those modules' parameters and buffers and among the inputs. An optimizer step, model.train(),
    new inputs or an in-place edit re-run the check; repeated calls on the same state do not."""
    parts = []
    for name, v in reachable_state(spec.fn):
        if isinstance(v, nn.Module):
            parts.append((name, tuple(m.training for m in v.modules()),
                          tuple((id(t), t._version if not t.is_inference() else 0)
                                for t in v.state_dict(keep_vars=True).values())))
        else:
            parts.append((name, id(v), v._version if not v.is_inference() else 0))
    for a in spec.args:
        if isinstance(a, torch.Tensor):
            parts.append((id(a), a._version if not a.is_inference() else 0))
        elif isinstance(a, Source):
            parts.append(id(a))
        elif not isinstance(a, (bool, int, float, str, type(None))):
            parts.append(id(a))
    return tuple(parts)


def _tol(spec: Spec, dtype: torch.dtype) -> float:
    """The tolerance of the loosest precision in play: a float32 model whose output is cast to float64
    rounds like float32 (a single sample takes another BLAS path than 64 of them)."""
    return max(RTOL.get(d, 1e-5) for d in working_dtypes(spec, dtype))


def _rng_state(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _derivatives(spec: Spec, m: int) -> tuple[str, str, bool]:
    """(coupling through wrt inputs, coupling through other batched inputs, fn is random)."""
    args = chunk_args(spec, 0, m)
    wrt = {t.index for t in spec.targets if t.batched}
    leaves = [i for i, (a, d) in enumerate(zip(args, spec.in_dims))
              if d is not None and isinstance(a, torch.Tensor) and a.is_floating_point()]
    for i in leaves:
        args[i] = args[i].detach().requires_grad_(True)
    before = _rng_state(spec.device)
    with torch.enable_grad():
        y = select(spec, call(spec, args), m)
        random = not torch.equal(before, _rng_state(spec.device))
        if not y.requires_grad or not leaves:
            return "", "", random
        bits = log2_ceil(m)
        gen = torch.Generator().manual_seed(0)
        u = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device, y.dtype)
        member = (torch.arange(m, device=y.device)[None, :] >> torch.arange(bits, device=y.device)[:, None]) & 1
        masks = torch.cat([torch.ones(1, m, device=y.device, dtype=torch.long), member]).to(y.dtype)
        cots = masks.reshape(bits + 1, m, *[1] * (y.dim() - 1)) * u
        prims = [args[i] for i in leaves]
        try:
            gs = torch.autograd.grad(y, prims, cots, allow_unused=True, is_grads_batched=True)
        except RuntimeError:  # no batching rule for some backward: the same VJPs one by one
            gs = [torch.stack(g) if g[0] is not None else None for g in zip(*[
                torch.autograd.grad(y, prims, c, allow_unused=True, retain_graph=True) for c in cots])]
    found = {}
    for i, g in zip(leaves, gs):
        if g is None:
            continue
        g = g.movedim(1 + spec.in_dims[i], 1).reshape(bits + 1, m, -1).to(torch.float64)
        full, parts = g[0], g[1:]
        scale = full.abs().max().item()
        inside = member.bool()
        # Gradient of u restricted to A, on samples outside A; and of u restricted to not-A, inside A.
        off_a = (parts * (~inside)[..., None]).abs().amax(dim=(0, 2))
        off_b = ((full[None] - parts) * inside[..., None]).abs().amax(dim=(0, 2))
        off = torch.maximum(off_a, off_b)
        if scale > 0 and off.max().item() > _tol(spec, y.dtype) * scale:
            j = int(off.argmax())
            found[i] = (j, off.max().item() / scale)
    deriv = through = ""
    for i, (j, rel) in found.items():
        text = (f"the input of sample {j} (input {i}) changes the outputs of other samples among the first {m} "
                f"(relative size {rel:.2g}, found by VJPs with random cotangents)")
        if i in wrt:
            deriv = deriv or text
        else:
            through = through or text
    return deriv, through, random


def _values(spec: Spec, m: int) -> str:
    h = m // 2
    splits = [(0, h), (h, m)] + _uneven(m)

    def run(a: int, b: int):
        # Under autograd, the wrt inputs requiring grad, as the strategies run fn: a branch on
        # torch.is_grad_enabled() or x.requires_grad takes the same way here.
        args = chunk_args(spec, a, b)
        for t in spec.targets:
            if t.batched and args[t.index].is_floating_point():
                args[t.index] = args[t.index].detach().requires_grad_(True)
        with torch.enable_grad():
            out = call(spec, args)
        return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, out)

    whole = run(0, m)
    parts = []
    for a, b in splits:
        try:
            parts.append(((a, b), run(a, b)))
        except Exception as e:  # noqa: BLE001 - any failure on a part means chunks cannot run
            return f"fn fails on a part of the batch ({b - a} of {m} samples): {type(e).__name__}: {e}"
    for (a, b), part in parts:
        found = _compare(spec, whole, part, a, b, m)
        if found:
            return found
    return ""


def _uneven(m: int) -> list[tuple[int, int]]:
    """Parts of 1, 1, 2, 4, ... samples covering [0, m): odd and even sizes, single samples, and
    boundaries other than the middle (a chunk can end anywhere)."""
    cuts, size, a = [], 1, 0
    while a < m:
        b = min(a + size, m)
        cuts.append((a, b))
        a, size = b, size if not cuts[1:] else size * 2
    return cuts


def _compare(spec: Spec, whole, part, a: int, b: int, m: int) -> str:
    """Where fn on samples [a, b) alone differs from the same samples inside the whole m."""
    leaves = [v for v in tree_leaves(whole) if isinstance(v, torch.Tensor)]
    got = [v for v in tree_leaves(part) if isinstance(v, torch.Tensor)]
    if len(got) != len(leaves):
        return "fn returns a different number of tensors for a part of the batch"
    n = b - a
    for k, (w, p) in enumerate(zip(leaves, got)):
        if not (w.dim() and p.dim() and w.shape[0] == m and p.shape[0] == n):
            continue  # not a per-sample output: chunks are refused for those elsewhere
        if w.shape[1:] != p.shape[1:]:
            return f"fn's output {k} changes its per-sample shape with the number of samples"
        w = w[a:b]
        if not w.is_floating_point():
            if not torch.equal(p, w):
                return f"fn's output {k} changes when samples [{a}, {b}) are run without the others"
            continue
        p64, w64 = p.to(torch.float64), w.to(torch.float64)
        finite = w64.isfinite() & p64.isfinite()
        if not torch.equal(w64.isfinite(), p64.isfinite()) or not torch.equal(w64[~finite], p64[~finite]) \
                and not (w64[~finite].isnan() & p64[~finite].isnan()).all():
            return f"fn's output {k} changes (non-finite values) when samples [{a}, {b}) are run alone"
        if finite.any():
            diff = (w64 - p64)[finite].abs()
            scale = max(w64[finite].abs().max().item(), 1e-30)
            if diff.max().item() > _tol(spec, leaves[k].dtype) * scale:
                pos = a + int(finite.nonzero()[int(diff.argmax()), 0]) if finite.dim() else a
                return (f"the output of sample {pos} changes when samples [{a}, {b}) are run without the others "
                        f"(relative change {diff.max().item() / scale:.2g})")
    return ""
