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
#  2. Values. fn on the two halves [0, M/2) and [M/2, M) alone must give the same outputs (every
#     tensor output that carries the batch) as on all M samples: this is exactly what a chunk boundary
#     does, and it catches couplings through inputs that cannot be differentiated (integer indices)
#     and batch statistics (BatchNorm in training mode). Skipped when fn draws random numbers (the
#     global RNG advanced during the forward), since two runs would not draw the same numbers.
# Differences count only above a dtype-dependent relative tolerance (float64 1e-9, float32 1e-5 of
# the largest gradient or output), so rounding (a different BLAS blocking for another batch size,
# x - mean(x) + mean(x)) is not mistaken for coupling. Cost: 3 forwards of at most 64 samples and one
# batched VJP of 1 + log2(64) = 7 rows; cached with the probe. Not seen: a coupling that exists only
# between samples beyond the first 64 and not among them, or below the tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._pytree import tree_leaves

from ._coupling import log2_ceil
from ._errors import is_out_of_memory
from ._function import call, chunk_args, select
from ._probe import preserved_buffers
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


def _tol(dtype: torch.dtype) -> float:
    return RTOL.get(dtype, 1e-5)


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
        if scale > 0 and off.max().item() > _tol(y.dtype) * scale:
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
    with torch.no_grad():
        whole = call(spec, chunk_args(spec, 0, m))
        try:
            parts = [call(spec, chunk_args(spec, a, b)) for a, b in ((0, h), (h, m))]
        except Exception as e:  # noqa: BLE001 - any failure on a part means chunks cannot run
            return f"fn fails on a part of the batch ({h} of {m} samples): {type(e).__name__}: {e}"
    leaves = [v for v in tree_leaves(whole) if isinstance(v, torch.Tensor)]
    split = [[v for v in tree_leaves(p) if isinstance(v, torch.Tensor)] for p in parts]
    if any(len(s) != len(leaves) for s in split):
        return "fn returns a different number of tensors for a part of the batch"
    for k, w in enumerate(leaves):
        a, b = split[0][k], split[1][k]
        if not (w.dim() and a.dim() and b.dim() and w.shape[0] == m and a.shape[0] == h and b.shape[0] == m - h):
            continue  # not a per-sample output: chunks are refused for those elsewhere
        if w.shape[1:] != a.shape[1:] or w.shape[1:] != b.shape[1:]:
            return f"fn's output {k} changes its per-sample shape with the number of samples"
        if not w.is_floating_point():
            if not torch.equal(torch.cat([a, b]), w):
                return f"fn's output {k} changes when a part of the batch is run alone"
            continue
        joined = torch.cat([a, b]).to(torch.float64)
        w = w.to(torch.float64)
        finite = w.isfinite() & joined.isfinite()
        if not torch.equal(w.isfinite(), joined.isfinite()) or not torch.equal(w[~finite], joined[~finite]) \
                and not (w[~finite].isnan() & joined[~finite].isnan()).all():
            return f"fn's output {k} changes (non-finite values) when a part of the batch is run alone"
        if finite.any():
            diff = (w - joined)[finite].abs()
            scale = w[finite].abs().max().item()
            if diff.max().item() > _tol(leaves[k].dtype) * max(scale, 1e-30):
                j = int((diff == diff.max()).nonzero()[0, 0]) if diff.dim() else 0
                pos = finite.nonzero()[j, 0].item() if finite.dim() else 0
                return (f"the output of sample {pos} changes when samples [{0 if pos < h else h}, "
                        f"{h if pos < h else m}) are run without the others (relative change "
                        f"{diff.max().item() / max(scale, 1e-30):.2g})")
    return ""
