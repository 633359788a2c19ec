"""The plan: which strategy, which AD mode per target, and the chunk boundaries.

A plan is data (a frozen dataclass): it can be printed, compared and tested without running a model.
The executor only carries it out. This is the one place where chunk boundaries are decided.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ._probe import Probe
from ._spec import Spec

# NOTE: [Choosing the AD mode]
# The sum trick costs one forward plus one VJP per per-sample output element in reverse mode, or one
# JVP per per-sample input element in forward mode (the forward rides along with the JVP). Measured
# here (2-core CPU, torch 2.13, PINN MLP 3->128x3->3 at 1e5 samples) a JVP column costs about twice a
# VJP row (1.15 s for 3 JVPs vs 0.63 s for forward + 3 VJPs), so "auto" picks forward mode only when
# 2 * n_in < n_out. Shared tensors (a parameter, an unbatched input) always use forward mode: reverse
# mode would sum their per-sample contributions.
JVP_COST = 2.0

# NOTE: [Chunking for speed]
# Chunks exist for memory (the budget planner) but they also make the run faster on CPUs: a chunk
# whose saved activations fit in the caches runs the backward passes out of cache. Measured here
# (PINN MLP 3->128x3->3, 1e5 samples, reverse mode): one chunk 0.61 s; chunks of 2k-16k samples
# 0.36-0.42 s. Operations that save little per sample (sin, a 5->2->10 MLP) gain nothing and pay a
# Python overhead per chunk, so the chunk is sized by the bytes autograd saves per sample.
CACHE_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Plan:
    """How a call will run. ``modes[k]`` is the AD mode of target k (``"reverse"`` or ``"forward"``)."""

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

    @property
    def mode(self) -> str:
        return self.modes[0] if len(set(self.modes)) == 1 else "mixed"

    @property
    def num_chunks(self) -> int:
        return -(-self.batch_size // self.chunk_size)

    def chunks(self) -> Iterator[tuple[int, int]]:
        """(start, stop) of every chunk, in order."""
        for start in range(0, self.batch_size, self.chunk_size):
            yield start, min(start + self.chunk_size, self.batch_size)

    @property
    def products_per_chunk(self) -> tuple[int, int]:
        """(batched VJPs, batched JVPs) one chunk costs."""
        rows = 1
        for s in self.out_shape:
            rows *= s
        vjps = -(-rows // self.rows_per_vjp) if "reverse" in self.modes else 0
        jvps = sum(-(-n // self.cols_per_jvp) for n, m in zip(self.in_numels, self.modes) if m == "forward")
        return vjps, jvps

    def __str__(self) -> str:
        c = "chunk" if self.num_chunks == 1 else "chunks"
        vjps, jvps = self.products_per_chunk
        work = []
        if vjps:
            work.append(f"{vjps} batched VJP{'s' * (vjps != 1)}")
        if jvps:
            work.append(f"{jvps} batched JVP{'s' * (jvps != 1)}")
        return (f"{self.batch_size:,} samples in {self.num_chunks:,} {c} of {self.chunk_size:,} · "
                f"{self.strategy}, {self.mode} mode, {' + '.join(work)} per chunk · "
                f"{self.dtype} on {self.device}")


def make_plan(spec: Spec, probe: Probe) -> Plan:
    n_out = probe.out_numel
    batched_in = sum(t.numel for t in spec.targets if t.batched)
    if spec.mode != "auto":
        batched_mode = spec.mode
    else:
        batched_mode = "forward" if JVP_COST * batched_in < n_out else "reverse"
    modes = tuple(batched_mode if t.batched else "forward" for t in spec.targets)
    return Plan(
        strategy="sum_trick",
        modes=modes,
        batch_size=spec.batch_size,
        chunk_size=_chunk_size(spec.batch_size, probe.saved_bytes_per_sample),
        rows_per_vjp=max(n_out, 1),
        cols_per_jvp=max([t.numel for t in spec.targets] + [1]),
        out_shape=probe.out_shape,
        in_numels=tuple(t.numel for t in spec.targets),
        dtype=probe.dtype,
        device=probe.device,
    )


def _chunk_size(batch_size: int, saved_bytes_per_sample: float) -> int:
    """The chunk whose saved activations fill about CACHE_BYTES (see [Chunking for speed])."""
    if saved_bytes_per_sample <= 0:
        return batch_size
    return max(1, min(batch_size, int(CACHE_BYTES // saved_bytes_per_sample)))
