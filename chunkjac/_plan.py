"""The plan: strategy, AD mode per target, rows per batched VJP, and the chunk size, as data.

A plan is a frozen dataclass: it can be printed, compared, recorded (a dump's manifest, the plan
cache) and tested without running a model. The planner (``_planner``) makes it; the executor only
carries it out. ``Plan.chunk_at`` is the one place where chunk boundaries are computed (the
executor's out-of-memory back-off asks it with a smaller size). What a plan costs and how it reads
come from its strategy (``_strategies``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ._budget import format_bytes
from ._coupling import Coupling, describe


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
    trials: tuple = field(default=(), compare=False)  # other candidates the run's first chunks time (see _executor)
    held_bytes: int = 0          # project=: the projection matrices held whole (within the budget), or 0: by blocks

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
        """(batched VJPs, batched JVPs) the largest chunk costs (the strategy's own count)."""
        return _strategy(self).products(self)

    def __str__(self) -> str:
        c = "chunk" if self.num_chunks == 1 else "chunks"
        per = "per chunk" if self.num_chunks > 1 else "in all"
        size = f"{self.chunk_size:,}" if self.coupling is None or self.coupling.bounds is None \
            else f"≤ {self.largest_chunk:,}"
        parts = [f"{self.batch_size:,} samples in {self.num_chunks:,} {c} of {size}"]
        if self.coupling is not None:
            parts.append(f"coupled ({describe(self.coupling)}): {self.colours:,} colour"
                         f"{'s' * (self.colours != 1)} per chunk")
        parts.append(_strategy(self).describe(self, per))
        peak = f"peak ≈ {format_bytes(self.peak_bytes - self.result_bytes)}"
        if self.budget_bytes is not None:
            peak += f" of {format_bytes(self.budget_bytes)}"
        if self.result_bytes:
            peak += f" + the result's {format_bytes(self.result_bytes)}"
        parts.append(f"{peak} on {self.device}")
        if self.seconds is not None:
            parts.append(f"≈ {_format_seconds(self.seconds)}" + (" (extrapolated)" if self.extrapolated else ""))
        if self.trials:
            parts.append(f"{len(self.trials)} other candidate{'s' * (len(self.trials) != 1)} timed on the run's first "
                         "chunks")
        text = " · ".join(parts)
        if self.too_long:
            text += (f"\nTOO LONG: about {_format_seconds(self.seconds)}, over max_seconds="
                     f"{self.max_seconds:g}: every one of {self.colours:,} coupled samples needs its own products "
                     "over the whole coupled set. Tell chunkjac which samples interact: coupling=<group ids> "
                     "or a dependency structure (edges, a sparse adjacency) cuts the products to the largest "
                     "group or the colours of the structure.")
        return text


def _strategy(plan: Plan):
    from ._strategies import STRATEGIES  # (strategies import Plan; Plan asks them about themselves)
    return STRATEGIES[plan.strategy]


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
