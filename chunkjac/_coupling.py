"""Coupling: which samples may influence which, as chunk boundaries and a colouring of the samples.

# NOTE: [Colouring]
# Row r of sample i's Jacobian is the slice i of the gradient of y[i, r]. One VJP may carry the
# cotangent e_r on several samples at once if none of them influences another: the gradient's
# slice j is then d y[j, r] / d x_j plus terms d y[i, r] / d x_j of the other samples i, which are
# zero. A set of such samples is a colour (a distance-1 colouring of the graph "y_i depends on
# x_j"), and a chunk costs (colours x rows) VJP rows instead of (samples x rows):
#   independent samples  -> 1 colour: the sum trick;
#   groups of size g     -> g colours (the rank of a sample within its group);
#   a band of width w    -> w + 1 colours;
#   every sample coupled -> B colours: one-hot on every (sample, row), the full selective extraction.
# Forward mode is the same with tangents (colour x input column).
#
# A chunk boundary between samples s-1 and s is allowed only when no dependency crosses it (chunks
# run fn on a slice of the batch): every boundary for independent samples, group boundaries for
# contiguous groups, none inside a coupled set.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._errors import describe as _describe

COUPLINGS = ("auto", "independent", "coupled", "unsplittable")


@dataclass(frozen=True, eq=False)
class Coupling:
    """The dependency structure of a batch of ``batch_size`` samples.

    ``colours`` (B,) gives every sample a colour such that samples of one colour never influence
    each other (None: one colour, independent derivatives). ``bounds`` are the sorted allowed chunk
    boundaries, 0 and B included (None: any boundary). ``kind`` names the structure for reports:
    "independent", "unsplittable" (independent derivatives, but the forward pass mixes samples),
    "coupled", "groups" or "graph"; ``reason`` says how it was found.
    """

    kind: str
    batch_size: int
    colours: torch.Tensor | None = None
    bounds: np.ndarray | None = None
    reason: str = ""
    edges: torch.Tensor | None = None  # a graph's (2, E) edges as declared (for the check, see _declared)

    @property
    def num_colours(self) -> int:
        return 1 if self.colours is None else int(self.colours.max()) + 1

    @property
    def unit(self) -> int:
        """The largest set of samples a chunk cannot split."""
        return 1 if self.bounds is None else int(np.diff(self.bounds).max())

    def stop(self, start: int, size: int) -> int:
        """The end of a chunk from ``start`` of about ``size`` samples: the last allowed boundary within
        ``start + size``, or the first one after ``start`` when the next coupled set is larger."""
        want = min(start + max(size, 1), self.batch_size)
        if self.bounds is None or start >= self.batch_size:
            return want
        k = int(np.searchsorted(self.bounds, want, side="right")) - 1
        if self.bounds[k] > start:
            return int(self.bounds[k])
        return int(self.bounds[np.searchsorted(self.bounds, start, side="right")])

    def colours_at(self, start: int, stop: int) -> torch.Tensor | None:
        """Colours of samples [start, stop), renumbered 0..k-1 (None: one colour)."""
        if self.colours is None:
            return None
        c = self.colours[start:stop]
        used, inverse = torch.unique(c, return_inverse=True)
        return None if len(used) == 1 else inverse


def independent(batch_size: int, reason: str = "") -> Coupling:
    return Coupling("independent", batch_size, reason=reason)


def unsplittable(batch_size: int, reason: str) -> Coupling:
    return Coupling("unsplittable", batch_size, bounds=np.array([0, batch_size]), reason=reason)


def coupled(batch_size: int, reason: str = "coupling='coupled'") -> Coupling:
    return Coupling("coupled", batch_size, colours=torch.arange(batch_size) if batch_size > 1 else None,
                    bounds=np.array([0, batch_size]), reason=reason)


def from_argument(coupling, batch_size: int) -> Coupling | str:
    """``compute``'s ``coupling=`` as a :class:`Coupling`, or "auto" (detected later by the probe).

    Accepted: "auto", "independent", "coupled"; a (B,) integer tensor or array of group ids; a
    (2, E) integer tensor or array of edges (j, i) meaning "y_i may depend on x_j" (torch_geometric's
    ``edge_index``); a sparse (B, B) tensor whose nonzeros (i, j) mean the same; or a list of B
    neighbour lists.
    """
    if isinstance(coupling, str):
        if coupling not in COUPLINGS:
            raise ValueError(
                f"chunkjac: coupling must be one of {COUPLINGS}, a (B,) tensor of group ids, a (2, E) edge "
                f"index or a sparse (B, B) adjacency; got {coupling!r}.")
        if coupling == "auto":
            return "auto"
        if coupling == "independent":
            return independent(batch_size, "coupling='independent'")
        if coupling == "unsplittable":
            return unsplittable(batch_size, "coupling='unsplittable'")
        return coupled(batch_size)
    if isinstance(coupling, torch.Tensor) and coupling.layout != torch.strided:
        return _from_sparse(coupling, batch_size)
    if isinstance(coupling, (list, tuple)) and not isinstance(coupling, torch.Tensor):
        return _from_neighbours(coupling, batch_size)
    if isinstance(coupling, np.ndarray):
        if coupling.dtype.kind not in "iub":
            raise TypeError(
                f"chunkjac: coupling is a numpy array of dtype {coupling.dtype}; group ids and edges must be "
                "integers (e.g. np.int64).")
        coupling = torch.from_numpy(np.asarray(coupling))
    if not isinstance(coupling, torch.Tensor):
        raise TypeError(
            f"chunkjac: coupling must be a string, a tensor of group ids or edges, a sparse adjacency or "
            f"neighbour lists; got {_describe(coupling)}.")
    if coupling.is_floating_point() or coupling.is_complex() or coupling.dtype == torch.bool:
        raise TypeError(
            f"chunkjac: coupling is {_describe(coupling)}; group ids and edges must be integers "
            "(e.g. a torch.long tensor).")
    c = coupling.detach().to("cpu", torch.long)
    if c.dim() == 1:
        return groups(c, batch_size)
    if c.dim() == 2 and c.shape[0] == 2:
        return graph(c, batch_size)
    raise ValueError(
        f"chunkjac: coupling is a tensor of shape {tuple(c.shape)}; expected ({batch_size},) group ids, one "
        "per sample, or a (2, E) edge index.")


def groups(ids: torch.Tensor, batch_size: int) -> Coupling:
    """Samples interact only within their group: colour = rank of the sample within its group."""
    if ids.shape != (batch_size,):
        raise ValueError(
            f"chunkjac: coupling has {ids.numel()} group ids but the batch has {batch_size} samples; "
            "give one group id per sample.")
    _, inverse, counts = torch.unique(ids, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    first = torch.cumsum(counts, 0) - counts           # where each group starts in sorted order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(batch_size) - first[inverse[order]]
    # A boundary may not fall strictly inside a group's span [first member, last member].
    idx = torch.arange(batch_size)
    lo = torch.full((len(counts),), batch_size, dtype=torch.long).scatter_reduce(0, inverse, idx, "amin")
    hi = torch.zeros(len(counts), dtype=torch.long).scatter_reduce(0, inverse, idx, "amax")
    bounds = _bounds(lo.numpy(), hi.numpy(), batch_size)
    return Coupling("groups", batch_size, colours=rank if int(counts.max()) > 1 else None, bounds=bounds,
                    reason=f"{len(counts):,} groups of up to {int(counts.max())} samples")


def graph(edges: torch.Tensor, batch_size: int) -> Coupling:
    """Samples interact along edges (j, i): y_i may depend on x_j. Greedy distance-1 colouring."""
    if edges.numel() and (int(edges.min()) < 0 or int(edges.max()) >= batch_size):
        raise ValueError(
            f"chunkjac: coupling has edges between samples {int(edges.min())}..{int(edges.max())}, but the "
            f"batch has samples 0..{batch_size - 1}.")
    e = edges.numpy()
    e = e[:, e[0] != e[1]]
    a, b = np.minimum(e[0], e[1]), np.maximum(e[0], e[1])
    bounds = _bounds(a, b, batch_size)
    # Undirected adjacency in CSR form; greedy colouring in sample order.
    src = np.concatenate([a, b])
    dst = np.concatenate([b, a])
    order = np.argsort(src, kind="stable")
    src, dst = src[order], dst[order]
    ptr = np.searchsorted(src, np.arange(batch_size + 1))
    colours = np.full(batch_size, -1, dtype=np.int64)
    for i in range(batch_size):
        nb = colours[dst[ptr[i]:ptr[i + 1]]]
        taken = set(nb[nb >= 0].tolist())
        c = 0
        while c in taken:
            c += 1
        colours[i] = c
    k = int(colours.max()) + 1 if batch_size else 1
    return Coupling("graph", batch_size, colours=torch.from_numpy(colours) if k > 1 else None, bounds=bounds,
                    reason=f"a dependency graph of {e.shape[1]:,} edges, {k} colour{'s' * (k != 1)}", edges=edges)


def _from_sparse(adj: torch.Tensor, batch_size: int) -> Coupling:
    if adj.shape != (batch_size, batch_size):
        raise ValueError(
            f"chunkjac: coupling is a sparse tensor of shape {tuple(adj.shape)}; a dependency structure must be "
            f"({batch_size}, {batch_size}), nonzero (i, j) meaning y_i may depend on x_j.")
    idx = adj.to_sparse_coo().coalesce().indices()
    return graph(torch.stack([idx[1], idx[0]]).to(torch.long), batch_size)


def _from_neighbours(lists, batch_size: int) -> Coupling:
    if len(lists) != batch_size:
        raise ValueError(
            f"chunkjac: coupling has {len(lists)} neighbour lists but the batch has {batch_size} samples; "
            "give one list per sample i of the samples j whose inputs y_i may depend on.")
    try:
        src = [int(j) for nb in lists for j in nb]
    except (TypeError, ValueError):
        raise TypeError("chunkjac: coupling as neighbour lists must be a list of lists of sample indices.") from None
    dst = [i for i, nb in enumerate(lists) for _ in nb]
    return graph(torch.tensor([src, dst], dtype=torch.long).reshape(2, -1), batch_size)


def _bounds(lo: np.ndarray, hi: np.ndarray, batch_size: int) -> np.ndarray:
    """Allowed boundaries: s in 0..B such that no span [lo, hi] has lo < s <= hi."""
    blocked = np.zeros(batch_size + 2, dtype=np.int64)
    np.add.at(blocked, lo + 1, 1)
    np.add.at(blocked, hi + 1, -1)
    inside = np.cumsum(blocked)[: batch_size + 1] > 0
    return np.flatnonzero(~inside)


def describe(c: Coupling) -> str:
    k = c.num_colours
    if c.kind == "independent":
        return "independent samples"
    if c.kind == "unsplittable":
        return "independent derivatives, unsplittable forward"
    return f"{c.kind}, {k:,} colour{'s' * (k != 1)}" + (f", sets of ≤ {c.unit:,}" if c.unit < c.batch_size else "")


def log2_ceil(n: int) -> int:
    return max(1, math.ceil(math.log2(n))) if n > 1 else 0
