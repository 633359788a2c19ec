"""``torch.autograd.grad`` for the cotangents chunkjac builds itself, without its first-call import.

# NOTE: [autograd.grad's first call]
# torch.autograd.grad given a tensor grad_outputs checks its shape with helpers it imports from
# torch.fx.experimental.symbolic_shapes, which imports sympy: 0.33 s, once per process, on the first
# call of any fresh process (measured: 0.36 s of a 0.39 s first call on a 2,048-sample MLP, whose
# repeated call takes 2 ms). chunkjac makes every cotangent it passes at its output's shape and dtype,
# so where the check cannot fail and nothing overrides the call (no tensor subclass, no torch-function
# mode), ``grad`` runs autograd's engine as torch.autograd.grad does after that check; otherwise, or
# once the module is imported anyway, it is torch.autograd.grad itself.
"""
from __future__ import annotations

import sys

import torch
from torch.autograd import graph as _graph
from torch.overrides import has_torch_function

_engine = getattr(_graph, "_engine_run_backward", None)  # (torch >= 2.3)
_SHAPES = "torch.fx.experimental.symbolic_shapes"
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def grad(outputs, inputs, grad_outputs=None, *, retain_graph=None, create_graph=False, allow_unused=False,
         is_grads_batched=False):
    """As ``torch.autograd.grad(outputs, inputs, grad_outputs, ...)`` (see [autograd.grad's first call])."""
    outs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    ins = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    gos = (grad_outputs,) if isinstance(grad_outputs, torch.Tensor) else \
        None if grad_outputs is None else tuple(grad_outputs)
    if _engine is None or _SHAPES in sys.modules or gos is None or not _checked(outs, ins, gos, is_grads_batched):
        return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph,
                                   create_graph=create_graph, allow_unused=allow_unused,
                                   is_grads_batched=is_grads_batched)
    if retain_graph is None:
        retain_graph = create_graph
    if is_grads_batched:
        from torch import _vmap_internals

        def vjp(g):
            return _engine(outs, g, retain_graph, create_graph, ins, allow_unused, accumulate_grad=False)

        return _vmap_internals._vmap(vjp, 0, 0, allow_none_pass_through=True)(gos)
    return _engine(outs, gos, retain_graph, create_graph, ins, allow_unused, accumulate_grad=False)


def _checked(outs, ins, gos, batched: bool) -> bool:
    """What torch.autograd.grad checks before the engine, for plain tensors: True when it passes."""
    if len(gos) != len(outs) or not ins:
        return False
    for o, g in zip(outs, gos):
        if type(o) not in _PLAIN or type(g) not in _PLAIN or o.is_nested or g.is_nested:
            return False
        shape = g.shape[1:] if batched else g.shape
        if shape != o.shape or o.dtype.is_complex != g.dtype.is_complex:
            return False
    if any(type(i) not in _PLAIN for i in ins):
        return False
    return not has_torch_function(outs + ins)
