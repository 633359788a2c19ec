"""Sinks: where finished chunks go. Now: memory. (Preallocated tensors and .npy files come later.)"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten


class MemorySink:
    """Collects chunk results into (B, *out, *in) tensors.

    A single-chunk run returns the strategy's tensors as they are (no copy). Several chunks are
    copied into tensors allocated at the first chunk; with ``create_graph`` they are concatenated
    instead, so the result stays differentiable.
    """

    def __init__(self, batch_size: int, differentiable: bool, keep_outputs: bool, device: torch.device):
        self.batch_size = batch_size
        self.device = device
        self.differentiable = differentiable
        self.keep_outputs = keep_outputs
        self._jacs: list | None = None
        self._parts: list[list[torch.Tensor]] = []
        self._outputs: list[Any] = []

    def write(self, start: int, stop: int, jacs: list[torch.Tensor], outputs: Any) -> None:
        jacs = [j.to(self.device) for j in jacs]
        if self.keep_outputs:
            self._outputs.append(tree_map(lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v, outputs))
        if start == 0 and stop == self.batch_size:
            self._jacs = [_own_memory(j) for j in jacs]
        elif self.differentiable:
            self._parts.append(list(jacs))
        else:
            if self._jacs is None:
                self._jacs = [j.new_empty((self.batch_size, *j.shape[1:]), device=self.device) for j in jacs]
            for dst, j in zip(self._jacs, jacs):
                dst[start:stop].copy_(j)

    def jacobians(self) -> list[torch.Tensor]:
        if self._parts:
            return [torch.cat(p, 0) for p in zip(*self._parts)]
        return self._jacs

    def outputs(self) -> Any:
        """fn's outputs for the whole batch: tensors that carry the batch in their leading dim are
        concatenated; anything else is taken from the first chunk (the planner refuses several chunks
        where a tensor output does not carry the batch, see ``batched_outputs`` in the probe)."""
        if len(self._outputs) == 1:
            return self._outputs[0]
        flat = [tree_flatten(o)[0] for o in self._outputs]
        leaves0, spec = tree_flatten(self._outputs[0])
        merged = []
        for k, leaf in enumerate(leaves0):
            if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
                merged.append(torch.cat([leaves[k] for leaves in flat], 0))
            else:
                merged.append(leaf)
        return tree_unflatten(merged, spec)


def _own_memory(j: torch.Tensor) -> torch.Tensor:
    """A broadcast Jacobian (y = x + 1 gives the same block for every sample, stride 0) would make
    samples share memory; give them their own, as every other result has."""
    if any(st == 0 and sz > 1 for st, sz in zip(j.stride(), j.shape)):
        return j.contiguous()
    return j
