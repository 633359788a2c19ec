"""chunkjac: exact per-sample Jacobians of PyTorch models over very large batches.

    J = chunkjac.compute(model, x)          # (B, *out, *in), J[i] = dy_i/dx_i
"""
from __future__ import annotations

from typing import Any, Callable

from ._check import check_forward_mode
from ._executor import execute
from ._plan import make_plan
from ._probe import probe
from ._spec import normalize

__version__ = "0.1.0"
__all__ = ["compute", "__version__"]


def compute(
    fn: Callable,
    inputs: Any,
    *,
    wrt: Any = 0,
    output: Any = None,
    in_dims: Any = 0,
    mode: str = "auto",
    coupling: str = "independent",
    create_graph: bool = False,
    return_outputs: bool = False,
):
    """Per-sample Jacobians ``J[i] = d fn(x)_i / d x_i`` for every sample i of a batch.

    Args:
        fn: a callable or ``nn.Module``; ``fn(*inputs)`` returns a tensor (B, *out) whose leading dim
            holds the samples, or a tuple/list/dict of outputs (then pick one with ``output``).
        inputs: one tensor (or numpy array), or a tuple of positional arguments. Numpy arrays are
            converted; values that are not tensors are passed through unchanged.
        wrt: what to differentiate with respect to: an input index (int, default 0), a parameter or
            buffer of ``fn`` (its name, or the ``nn.Parameter`` itself), or a tuple of those (then a
            tuple of Jacobians is returned, in the same order).
        output: index or key of the output to differentiate when ``fn`` returns several.
        in_dims: the batch dim of each input, as in ``torch.vmap``: an int for every tensor input,
            or a tuple with one int or None per input. None marks an input shared by all samples.
        mode: ``"reverse"`` (one batched VJP per per-sample output element), ``"forward"`` (one
            batched JVP per per-sample input element) or ``"auto"``: forward when the per-sample
            inputs are fewer than half the outputs, reverse otherwise. Shared tensors (parameters,
            unbatched inputs) always use forward mode.
        coupling: ``"independent"``: the caller asserts that y_i depends on no x_j with j != i (no
            attention across the batch, no BatchNorm in training mode). The result is exact under
            that assumption and silently wrong without it; it is the only option in this version.
        create_graph: return Jacobians (and outputs) connected to the autograd graph, so a loss on
            them can be differentiated again (physics-informed training). Off, results are detached.
        return_outputs: also return fn's full outputs for the whole batch, computed in the same pass.

    Returns:
        For a batched input x of shape (B, *in) and output y of shape (B, *out): a tensor of shape
        (B, *out, *in). For a shared tensor θ: (B, *out, *θ.shape). With a tuple ``wrt``, a tuple of
        those; with ``return_outputs=True``, ``(J, outputs)``. J has the output's dtype and device.

    Cost: reverse mode runs one forward and n_out VJPs over the batch; forward mode n_in JVPs, where
    n_out and n_in are per-sample element counts. Neither grows with B beyond the batch's own size.

    Example:
        >>> f = torch.nn.Sequential(torch.nn.Linear(5, 2), torch.nn.Sigmoid(), torch.nn.Linear(2, 10))
        >>> chunkjac.compute(f, torch.randn(3, 5)).shape
        torch.Size([3, 10, 5])
    """
    spec = normalize(fn, inputs, wrt=wrt, output=output, in_dims=in_dims, mode=mode, coupling=coupling,
                     create_graph=create_graph, return_outputs=return_outputs)
    plan = make_plan(spec, probe(spec))
    check_forward_mode(spec, plan)
    return execute(spec, plan)
