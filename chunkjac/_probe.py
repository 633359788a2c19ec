"""Probe: run fn on a few samples to learn what it returns before planning.

It learns the per-sample output shape, dtype and device (validating ``output`` and the batch dim
early and cheaply), and the bytes autograd saves for backward per sample, fitted on two sizes so that
what does not grow with the batch (weights saved by matmuls) drops out. The memory planner extends
this with measured time and peak memory.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ._function import call, chunk_args, select
from ._spec import Spec

PROBE_SIZES = (2, 10)  # at least two: BatchNorm in training mode refuses a single sample


@dataclass(frozen=True)
class Probe:
    out_shape: tuple[int, ...]  # per sample
    dtype: torch.dtype
    device: torch.device
    saved_bytes_per_sample: float  # activations autograd keeps for a reverse pass

    @property
    def out_numel(self) -> int:
        n = 1
        for s in self.out_shape:
            n *= s
        return n


@contextlib.contextmanager
def preserved_buffers(fn):
    """Undo in-place buffer updates (BatchNorm running stats) that a probe forward would leave behind."""
    if not isinstance(fn, nn.Module):
        yield
        return
    saved = [(b, b.detach().clone()) for b in fn.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


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
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = select(spec, call(spec, args), n)
    return y.detach(), sum(saved.values())


def probe(spec: Spec) -> Probe:
    sizes = sorted({min(spec.batch_size, s) for s in PROBE_SIZES})
    with preserved_buffers(spec.fn):
        runs = [(n, *_forward_saving(spec, n)) for n in sizes]
    (n0, y, s0), (n1, _, s1) = runs[0], runs[-1]
    per_sample = (s1 - s0) / (n1 - n0) if n1 > n0 else s0 / n0
    return Probe(out_shape=tuple(y.shape[1:]), dtype=y.dtype, device=y.device,
                 saved_bytes_per_sample=max(per_sample, 0.0))
