"""What the second-order strategies share: colour groups, merging them, empty results."""
from __future__ import annotations

import math

import torch

from .._spec import Spec


def groups(colours: torch.Tensor | None, calls: int | None) -> list:
    """(n,) masks of the samples that share one pass (None: all of them), at most ``calls`` of them.
    Samples of a negative colour are left out (their results stay zero: the check's subsets)."""
    if colours is None:
        masks = [None]
    else:
        masks = [colours == c for c in torch.unique(colours).tolist() if c >= 0]
    return masks if calls is None else masks[:max(calls, 1)]


def along(mask: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    """A (n,) mask shaped to broadcast along the batch dim ``dim`` of a rank-``rank`` tensor."""
    shape = [1] * rank
    shape[dim] = -1
    return mask.reshape(shape)


def merge(done: torch.Tensor | None, new: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Results (n, ...) of one colour group into those of the others: the group's rows from ``new``.
    torch.where keeps the result on the autograd graph (create_graph)."""
    if mask is None:
        return new
    m = mask.reshape(-1, *([1] * (new.dim() - 1))).to(new.device)
    return torch.where(m, new, torch.zeros((), dtype=new.dtype, device=new.device) if done is None else done)


def selected(spec: Spec, plan, out, n: int) -> torch.Tensor:
    """The differentiated output of a chunk's forward pass, its per-sample shape checked against the probe's."""
    from .._function import select
    y = select(spec, out, n)
    if tuple(y.shape[1:]) != plan.out_shape:
        raise ValueError(
            f"chunkjac: fn's per-sample output shape changed from {plan.out_shape} (probe) to "
            f"{tuple(y.shape[1:])} in a chunk of {n} samples; each sample's output must not depend on "
            "how many samples are in the batch.")
    return y


def is_empty(spec: Spec, plan) -> bool:
    """No derivative to compute: the input or the output has no elements per sample."""
    return spec.targets[0].numel == 0 or math.prod(plan.out_shape) == 0


def empty(spec: Spec, plan, args: list, n: int, dtype: torch.dtype, device: torch.device):
    """Zero-element results of the right shapes, and fn's outputs (one plain forward)."""
    from .._function import call, detach_all
    res = [torch.zeros((n, *s[1:]), dtype=dtype, device=device) for s in spec.result_shapes(plan.out_shape)]
    out = call(spec, list(args))
    return res, (out if spec.create_graph else detach_all(out))
