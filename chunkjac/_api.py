"""The public functions: real signatures and docstrings, nothing else. Each builds one validated
:class:`~chunkjac._request.Request` and hands it to ``_call``, which runs the pipeline.

Every public function goes through one boundary (``_public``): its arguments are bound first (a
misspelled keyword is a TypeError naming the closest valid one); fn's own exceptions come back as
themselves, with chunkjac's context in a note (PEP 678); PyTorch errors raised while chunkjac
differentiates are said as such.
"""
from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable

from . import _call, _operators, _request
from ._errors import passes_through
from ._function import FnError
from ._plan import Plan

MAX_SECONDS = 3600.0


def _public(api):
    sig = inspect.signature(api)
    keywords = frozenset(n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY)

    @functools.wraps(api)
    def call(*args, **kwargs):
        if len(args) != 2 or not kwargs.keys() <= keywords:  # (the usual call binds: no need to look)
            try:
                sig.bind(*args, **kwargs)
            except TypeError as e:
                raise TypeError(_binding_error(api.__name__, sig, kwargs, e)) from None
        try:
            return api(*args, **kwargs)
        except FnError as e:
            failed = e
        except Exception as e:
            if passes_through(e):
                raise
            raise _pytorch_failure(e, kwargs) from e
        raise _users_error(failed)

    return call


def _binding_error(name: str, sig: inspect.Signature, kwargs: dict, e: TypeError) -> str:
    unknown = [k for k in kwargs if k not in sig.parameters]
    if name in ("laplacian", "bilaplacian", "divergence", "derivatives") and "part" in unknown:
        return f"chunkjac.{name}() takes no part=; use chunkjac.hessian(..., part=...)."
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(sig.parameters), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; it takes: {', '.join(sig.parameters)}."
        return f"chunkjac.{name}() got an unexpected keyword argument {unknown[0]!r}{hint}"
    return f"chunkjac.{name}(): {e}. Signature: {name}{sig}"


def _users_error(e: FnError) -> BaseException:
    """fn's own exception, as fn raised it (same class: the caller's ``except ValueError`` sees it),
    with chunkjac's context (which chunk, which inputs) added as a note."""
    cause = e.__cause__
    if cause is None:
        return e
    note = getattr(e, "note", str(e))
    if hasattr(cause, "add_note"):
        cause.add_note(note)
    else:  # Python 3.10: the attribute PEP 678 defines, shown by tracebacks from 3.11 on
        cause.__notes__ = [*getattr(cause, "__notes__", []), note]
    return cause.with_traceback(cause.__traceback__)


def _frames(tb):
    while tb is not None:
        yield tb
        tb = tb.tb_next


def _pytorch_failure(e: Exception, kwargs: dict) -> RuntimeError:
    """The last line of "exact or a clear error": an exception that is neither chunkjac's own, fn's
    (those are FnError, see _function.call) nor an out-of-memory error comes from PyTorch while
    chunkjac differentiates; it is said as such, with the cause chained."""
    why = (str(e).strip().splitlines() or [""])[0] or type(e).__name__
    mode = kwargs.get("mode", "auto")
    if "derivative for" in why and "not implemented" in why:
        if mode != "auto":
            hint = (f"With mode={mode!r} the route needs that derivative; mode='auto' tries the other routes "
                    "(forward mode, Taylor mode for second derivatives), which may not.")
        else:
            hint = ("fn uses an operation that PyTorch cannot differentiate on any route chunkjac can take: "
                    "replace it with a differentiable one (or differentiate another input).")
    elif "donated buffers" in why:
        hint = ("fn is torch.compile'd, and its compiled backward frees its buffers after one use while "
                "chunkjac needs several backward passes per forward: set torch._functorch.config."
                "donated_buffer = False before compiling, or compile with backend='aot_eager'.")
    elif any(tb.tb_frame.f_code.co_filename.endswith(("grad_sample_module.py", "hooks.py"))
             for tb in _frames(e.__traceback__)):
        hint = ("A backward hook of fn's module failed: hooks that expect one backward pass per forward "
                "(Opacus's GradSampleModule: call .disable_hooks() first) cannot serve the several "
                "backward passes a Jacobian takes.")
    else:
        hint = ("This is unexpected: please report it to chunkjac with the traceback (PyTorch's error is "
                "chained below); mode='reverse' or coupling='independent' may avoid the failing path.")
    return RuntimeError(f"chunkjac: PyTorch failed while chunkjac differentiated fn ({type(e).__name__}: {why}). "
                        f"{hint}")


# The public functions pass their arguments on as ``**locals()``: each keyword is named once, in the
# signature, and checked once, in _request.make.

@_public
def compute(
    fn: Callable,
    inputs: Any,
    *,
    wrt: Any = 0,
    output: Any = None,
    in_dims: Any = 0,
    mode: str = "auto",
    coupling: Any = "auto",
    create_graph: bool = False,
    return_outputs: bool = False,
    budget: int | str | None = None,
    device: Any = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    max_seconds: float | None = MAX_SECONDS,
    out: Any = None,
    resume: bool = True,
    plan: Plan | None = None,
    flat: bool = False,
    check_coupling: bool = True,
    project: Any = None,
):
    """Per-sample Jacobians ``J[i] = d fn(x)_i / d x_i`` for every sample i of a batch.

    Args:
        fn: a callable or ``nn.Module``; ``fn(*inputs)`` returns a tensor (B, *out) whose leading dim
            holds the samples, or a tuple/list/dict of outputs (then pick one with ``output``).
        inputs: one tensor (or numpy array), or a tuple of positional arguments. Numpy arrays are
            converted (memmaps and read-only arrays are read chunk by chunk); a map-style Dataset
            gives one positional input per position of its items; values that are not tensors are
            passed through unchanged.
        wrt: what to differentiate with respect to: an input index (int, default 0), a parameter or
            buffer of ``fn`` (its name, or the ``nn.Parameter`` itself), a tuple of those (then a
            tuple of Jacobians is returned, in the same order), a list of those (a dict keyed by the
            items, a Parameter by its name), or ``"params"``: every trainable parameter of the module,
            a dict name -> (B, *out, *param.shape) in ``named_parameters()`` order (a tied parameter
            once, under its first name, with its total derivative over every use).
        output: index or key of the output to differentiate when ``fn`` returns several.
        in_dims: the batch dim of each input, as in ``torch.vmap``: an int for every tensor input,
            or a tuple with one int or None per input. None marks an input shared by all samples.
        mode: ``"reverse"`` (one batched VJP per per-sample output element), ``"forward"`` (one
            batched JVP per per-sample input element) or ``"auto"``: the faster of the two, measured
            on small chunks. Shared tensors (parameters, unbatched inputs) always use forward mode.
        coupling: which samples interact. ``"auto"`` (default) checks three windows of 64 samples
            (first, middle, last) and warns (CouplingWarning) when it leaves the sum trick;
            ``"independent"`` asserts no interaction (not checked: the fast path of a training loop);
            ``"coupled"``: all samples may interact; ``"unsplittable"``: per-sample derivatives, but
            the forward pass needs the whole batch; a (B,) tensor of group ids; a (2, E) edge index,
            sparse (B, B) adjacency or neighbour lists (checked: see ``check_coupling``). Cost grows
            with the colours of the structure (docs/coupling.md).
        create_graph: return Jacobians (and outputs) connected to the autograd graph, so a loss on
            them can be differentiated again (physics-informed training). Off, results are detached.
        return_outputs: also return fn's full outputs for the whole batch, computed in the same pass.
        budget: memory chunkjac may use on the compute device: ``"20GB"``, ``"512MiB"``, an int of
            bytes, ``"80%"`` of the free memory, or None for half of it. Larger budgets allow larger
            chunks (fewer Python round trips); beyond the cache-friendly chunk they do not help.
            On the CPU the result itself is not counted: it is the output you asked for.
        device: where to compute (``"cuda"``, ``"cuda:1"``, ``"cpu"``); default: where fn's
            parameters are, else where the inputs are. Inputs elsewhere stream there chunk by chunk;
            results come back to where the inputs live.
        chunk_size: samples per chunk, overriding the planner.
        progress: a progress bar on stderr: True, False, or None for "when the run is predicted to
            take over 10 s and stderr is a terminal".
        max_seconds: refuse (TooLongError) a coupled plan predicted to take longer; None: no limit.
        out: where the result goes: None (new memory; refused, with advice, when it would not fit),
            a preallocated tensor of the result's shape and dtype (a tuple of them for a tuple wrt),
            or a path to a ``.npy`` file, created at its final shape and filled chunk by chunk, with a
            manifest next to it (``path + ".chunkjac.json"``) that makes the dump resumable. The call
            returns ``out`` (for a path: a CPU tensor sharing memory with the file).
        resume: with a path ``out`` whose manifest matches this call, skip the chunks already on disk
            (a complete dump is a no-op); False starts the file over. A manifest of a different call
            is refused either way.
        plan: a :class:`Plan` recorded from ``chunkjac.plan(...)`` with the same arguments: run it as
            it is, without the coupling check, probes or timings (a training loop pays nothing per
            step for planning, and a dump gets the same plan in every process). Under
            ``torch.use_deterministic_algorithms(True)`` the planner itself chooses without timing.
        flat: with a dict result, one (B, *out, P) tensor instead: the Jacobians flattened and
            concatenated along the last dim in the dict's order.
        check_coupling: with declared group ids or a graph as ``coupling``, verify before running that
            no two samples the declaration keeps apart interact (random-cotangent VJPs on the chunks
            the plan runs: about 1 + log2(chunk) products per colour, once per remembered decision),
            and refuse with what was found; False trusts the declaration.
        project: a :class:`Projection` (or an int: its dim, Rademacher, seed 0): the per-sample rows of
            every target (flattened, concatenated in target order) projected to ``dim`` numbers, one
            (B, *out, dim) tensor; for fn returning a per-sample loss, projected per-sample gradients
            (B, dim). A chunk's full rows exist only while the chunk is projected (docs/parameters.md).

    Returns:
        For a batched input x of shape (B, *in) and output y of shape (B, *out): a tensor of shape
        (B, *out, *in). For a shared tensor θ: (B, *out, *θ.shape). With a tuple ``wrt``, a tuple of
        those; with ``return_outputs=True``, ``(J, outputs)``. J has the output's dtype.

    Raises:
        TypeError, ValueError: an argument is wrong (the message names it and says what would do).
        BudgetError: the budget cannot hold even one sample (the message says what would).
        TooLongError: a coupled plan is predicted to take longer than ``max_seconds``.
        CouplingError: a declared coupling misses interactions between samples.
        Whatever fn raises on a chunk of the inputs, as fn raised it, with a note naming the chunk.

    Cost: reverse mode runs one forward and n_out VJPs over the batch; forward mode n_in JVPs, where
    n_out and n_in are per-sample element counts; ``chunkjac.plan`` shows the choice and estimates.

    Example:
        >>> f = torch.nn.Sequential(torch.nn.Linear(5, 2), torch.nn.Sigmoid(), torch.nn.Linear(2, 10))
        >>> chunkjac.compute(f, torch.randn(3, 5)).shape
        torch.Size([3, 10, 5])
    """
    return _call.run(_request.make("compute", **locals()))


@_public
def plan(
    fn: Callable,
    inputs: Any,
    *,
    wrt: Any = 0,
    output: Any = None,
    in_dims: Any = 0,
    mode: str = "auto",
    coupling: Any = "auto",
    create_graph: bool = False,
    return_outputs: bool = False,
    budget: int | str | None = None,
    device: Any = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    max_seconds: float | None = MAX_SECONDS,
    out: Any = None,
    resume: bool = True,
    flat: bool = False,
    check_coupling: bool = True,
    part: str | None = None,
    return_jacobian: bool = False,
    project: Any = None,
) -> Plan:
    """The :class:`Plan` ``compute`` (or, with ``part``, ``hessian``) would carry out with the same
    arguments, without computing any Jacobian (it probes fn on a few small chunks). ``print(plan)``
    gives a one-line report. It takes ``compute``'s arguments but ``plan=`` (``progress``, ``resume``
    and ``flat`` do not change the plan), and ``hessian``'s ``part`` and ``return_jacobian``. Of
    ``out`` only whether the result goes to new memory matters (a result in memory may be one chunk
    larger than the budget, see ``Plan.result_bytes``); nothing is written."""
    return _call.plan_only(_request.make("plan", **locals()))


@_public
def hessian(
    fn: Callable,
    inputs: Any,
    *,
    part: str = "full",
    wrt: Any = 0,
    output: Any = None,
    in_dims: Any = 0,
    mode: str = "auto",
    coupling: Any = "auto",
    create_graph: bool = False,
    return_outputs: bool = False,
    return_jacobian: bool = False,
    budget: int | str | None = None,
    device: Any = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    max_seconds: float | None = MAX_SECONDS,
    out: Any = None,
    resume: bool = True,
    plan: Plan | None = None,
    check_coupling: bool = True,
):
    """Per-sample second derivatives ``d^2 fn(x)_i / d x_i^2`` for every sample i of a batch.

    Args:
        part: ``"full"``: the Hessians, (B, *out, *in, *in); ``"diagonal"``: the pure second
            derivatives d^2 y / d x_k^2, (B, *out, *in); ``"laplacian"``: their sum over the input's
            elements, (B, *out).
        wrt: the batched input to differentiate twice (an index; one input).
        return_jacobian: also return the first derivatives (B, *out, *in), from the same pass.
        return_outputs: also return fn's outputs, from the same pass.
        mode: ``"auto"`` (measure both, see [Choosing a second-order strategy]), ``"forward"``
            (Taylor mode: one forward pass carries the value, the D first-order directions and the
            second-order terms) or ``"reverse"`` (reverse over reverse: 1 + D VJPs per output element).
        The others as in :func:`compute`: ``output``, ``in_dims``, ``coupling`` (coupled samples get exact
        per-sample blocks by colour groups, never the sum trick), ``create_graph`` (differentiate a
        loss on the results again: physics-informed training), ``budget``, ``device``,
        ``chunk_size``, ``progress``, ``max_seconds``, ``out`` (tensors, or a ``.npy`` path for one
        result, resumable), ``resume``, ``plan`` (from ``chunkjac.plan(..., part=part)``),
        ``check_coupling``.

    Returns:
        The part; with ``return_jacobian`` ``(part, J)``; with ``return_outputs`` the outputs last:
        ``(part, outputs)`` or ``(part, J, outputs)``.

    Cost: Taylor mode runs fn once per chunk on stacks of 1 + D + s vectors (s = 1 for a Laplacian,
    D for the diagonal, D^2 for the full Hessian): about D + 2 forward passes' worth of matrix
    products for a Laplacian, and no backward pass; ``chunkjac.plan(..., part=...)`` shows the choice.

    Example:
        >>> u = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> chunkjac.hessian(u, torch.randn(5, 2)).shape
        torch.Size([5, 1, 2, 2])
    """
    return _call.run(_request.make("hessian", **locals()))


_OPERATOR_KEYWORDS = dict(wrt=0, output=None, in_dims=0, mode="auto", coupling="auto", create_graph=False,
                          return_outputs=False, budget=None, device=None, chunk_size=None, progress=None,
                          max_seconds=MAX_SECONDS, out=None, resume=True, plan=None, check_coupling=True)


def _operator_call(api: str, fn, inputs, part, given: dict, return_jacobian: bool = False):
    kw = {k: given[k] for k in _OPERATOR_KEYWORDS}
    return _call.run(_request.make(api, fn, inputs, part=part, return_jacobian=return_jacobian, **kw))


@_public
def laplacian(
    fn: Callable,
    inputs: Any,
    *,
    dims: Any = None,
    weights: Any = None,
    samples: int | None = None,
    seed: int | None = None,
    distribution: str = "rademacher",
    wrt: Any = 0,
    output: Any = None,
    in_dims: Any = 0,
    mode: str = "auto",
    coupling: Any = "auto",
    create_graph: bool = False,
    return_outputs: bool = False,
    return_jacobian: bool = False,
    budget: int | str | None = None,
    device: Any = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    max_seconds: float | None = MAX_SECONDS,
    out: Any = None,
    resume: bool = True,
    plan: Plan | None = None,
    check_coupling: bool = True,
):
    """Per-sample Laplacians ``sum_k d^2 fn(x)_i / d x_{i,k}^2``, shape (B, *out), by Taylor mode's
    forward Laplacian where fn allows (reverse mode where it does not).

    Args:
        dims: indices 0 ... D-1 into the flattened per-sample input of ``wrt`` (no negative indices):
            the Laplacian over those coordinates only (the spatial part of u(x, y, t)).
        weights: a symmetric (d, d) tensor shared by all samples, or (B, d, d) one per sample (d =
            len(dims), else D): ``sum_jk C_jk d^2 u / dx_j dx_k``. Exact for any symmetric C: a
            positive semi-definite C of rank r costs r directions (C = S S^T), an indefinite one its
            r eigenvectors with signed weights (per sample: 2 d directions, its positive and negative
            parts).
        samples, seed, distribution: an unbiased estimate from ``samples`` random directions per
            sample (``"rademacher"``, or ``"gaussian"``), the same bits for the same seed whatever the
            chunking, the budget or the number of processes.
        return_jacobian: also return the first derivatives (B, *out, *in), from the same pass (the
            plain Laplacian only).
        The others as in :func:`hessian`.

    Cost: one forward pass per chunk carrying 2 + k vectors per tensor (k = D, the rank of C, 2d, or
    ``samples``).

    Example (a PINN's residual of the Poisson equation):
        >>> lap_u, u = chunkjac.laplacian(model, x, return_outputs=True, create_graph=True)
        >>> loss = ((lap_u - f(x)) ** 2).mean()
    """
    given = locals()
    plain = dims is None and weights is None and samples is None and seed is None and distribution == "rademacher"
    part = "laplacian" if plain else _operators.Builder("laplacian", (
        ("dims", dims), ("weights", weights), ("samples", samples), ("seed", seed), ("distribution", distribution),
        ("return_jacobian", return_jacobian)))
    return _operator_call("laplacian", fn, inputs, part, given, return_jacobian if plain else False)


@_public
def bilaplacian(
    fn: Callable,
    inputs: Any,
    *,
    dims: Any = None,
    samples: int | None = None,
    seed: int | None = None,
    distribution: str = "rademacher",
    wrt: Any = 0,
    output: Any = None,
    in_dims: Any = 0,
    mode: str = "auto",
    coupling: Any = "auto",
    create_graph: bool = False,
    return_outputs: bool = False,
    budget: int | str | None = None,
    device: Any = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    max_seconds: float | None = MAX_SECONDS,
    out: Any = None,
    resume: bool = True,
    plan: Plan | None = None,
    check_coupling: bool = True,
):
    """Per-sample bi-Laplacians ``sum_jk d^4 fn(x)_i / dx_j^2 dx_k^2``, shape (B, *out), by fourth-order
    Taylor mode: exact (2^(d-1) + d directions for d <= 5 coordinates, d^2 above), or an unbiased
    estimate from ``samples`` random directions (``seed``, ``distribution`` as in :func:`laplacian`).
    ``dims`` and the other keywords as in :func:`laplacian`.

    Cost: one forward pass per chunk carrying 2 + 3k vectors per tensor (k directions, their first
    three Taylor coefficients and one collapsed fourth-order term)."""
    given = locals()
    part = _operators.Builder("bilaplacian", (("dims", dims), ("samples", samples), ("seed", seed),
                                              ("distribution", distribution)))
    return _operator_call("bilaplacian", fn, inputs, part, given)


@_public
def divergence(
    fn: Callable,
    inputs: Any,
    *,
    samples: int | None = None,
    seed: int | None = None,
    distribution: str = "rademacher",
    wrt: Any = 0,
    output: Any = None,
    in_dims: Any = 0,
    mode: str = "auto",
    coupling: Any = "auto",
    create_graph: bool = False,
    return_outputs: bool = False,
    budget: int | str | None = None,
    device: Any = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    max_seconds: float | None = MAX_SECONDS,
    out: Any = None,
    resume: bool = True,
    plan: Plan | None = None,
    check_coupling: bool = True,
):
    """Per-sample divergences ``sum_k d fn(x)_{i,k} / d x_{i,k}`` (the trace of each sample's Jacobian),
    shape (B,), for fn whose per-sample output has the per-sample input's shape: exact, one forward
    pass carrying D directions; or Hutchinson's unbiased estimate from ``samples`` random directions
    (``seed``, ``distribution`` as in :func:`laplacian`). The other keywords as in :func:`hessian`.

    Example (a continuous normalising flow's log-density change):
        >>> div = chunkjac.divergence(velocity, z)   # (B,)
    """
    given = locals()
    part = _operators.Builder("divergence", (("samples", samples), ("seed", seed), ("distribution", distribution)))
    return _operator_call("divergence", fn, inputs, part, given)


@_public
def derivatives(
    fn: Callable,
    inputs: Any,
    terms: dict,
    *,
    wrt: Any = 0,
    output: Any = None,
    in_dims: Any = 0,
    mode: str = "auto",
    coupling: Any = "auto",
    create_graph: bool = False,
    return_outputs: bool = False,
    budget: int | str | None = None,
    device: Any = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
    max_seconds: float | None = MAX_SECONDS,
    out: Any = None,
    resume: bool = True,
    plan: Plan | None = None,
    check_coupling: bool = True,
):
    """Named partial derivatives of orders 1 to 4, all from one pass: ``{name: (B, *out)}``.

    Args:
        terms: maps a name to a multi-index of per-sample input coordinates (indices into the
            flattened per-sample input of ``wrt``), e.g. ``{"u_t": (2,), "u_xx": (0, 0), "u_xy":
            (0, 1), "u_xxxx": (0, 0, 0, 0)}``.
        out: a folder (one ``<name>.npy`` per term) or a dict of preallocated tensors.
        The others as in :func:`hessian`; with ``return_outputs`` the result is ``(dict, outputs)``.

    Cost: orders 1-2, one pass carrying the value, one direction per coordinate named and one
    second-order term per second derivative (a mixed u_xy directly, not by polarisation); orders 3-4,
    the directions the terms need (distinct sums of their coordinates' axes, by polarisation) with
    Taylor coefficients up to the highest order, that order's terms collapsed.

    Example (Burgers' equation, u(x, t)):
        >>> d = chunkjac.derivatives(u, xt, {"u_x": (0,), "u_t": (1,), "u_xx": (0, 0)}, create_graph=True,
        ...                          return_outputs=True)
        >>> (du, u_val) = d; residual = du["u_t"] + u_val * du["u_x"] - nu * du["u_xx"]
    """
    given = locals()
    return _operator_call("derivatives", fn, inputs, _operators.Builder("derivatives", (("terms", terms),)), given)


def operator(name: str, **options):
    """The operator ``chunkjac.<name>(fn, x, **options)`` computes, to plan it ahead:
    ``p = chunkjac.plan(fn, x, part=chunkjac.operator("laplacian", dims=(0, 1)))``, then
    ``chunkjac.laplacian(fn, x, dims=(0, 1), plan=p)``. ``name``: ``"laplacian"``, ``"bilaplacian"``,
    ``"divergence"`` or ``"derivatives"`` (hessian's parts are passed by name: ``part="full"``)."""
    return _operators.operator(name, **options)
