"""Call normalisation: turn ``compute``'s arguments into a validated :class:`Spec`.

Every argument check happens here, before any work, so that plans and strategies never re-check.
Errors name the argument, what was expected, what was got and what to do.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ._coupling import Coupling, from_argument
from ._errors import describe as _describe
from ._inputs import Source, from_dataset, from_memmap, is_lazy_array, with_batch_dim

MODES = ("auto", "reverse", "forward")
PARTS = ("full", "diagonal", "laplacian")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class Target:
    """One thing to differentiate with respect to.

    ``index`` names a positional input (``kind="input"``); ``name`` a parameter or buffer of the
    module (``kind="param"``). ``batched`` targets give dy_i/dx_i; unbatched ones (a parameter, an
    input with ``in_dims`` None) give dy_i/dθ for the one shared θ.
    """

    kind: str
    index: int | None
    name: str | None
    batched: bool
    shape: tuple[int, ...]  # per-sample shape for batched inputs, whole shape otherwise
    label: str              # how the user named it, for messages

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, eq=False)
class Spec:
    """A validated call: what to run, on what, and what to differentiate."""

    fn: Callable
    args: tuple
    in_dims: tuple[int | None, ...]
    batch_size: int
    targets: tuple[Target, ...]
    single: bool            # wrt was one item: return one Jacobian, not a tuple
    output: Any             # index/key into fn's outputs, or None for a tensor output
    mode: str
    coupling: Coupling | str  # "auto" until the probe has checked
    create_graph: bool
    return_outputs: bool
    device: torch.device      # where chunks are computed
    home: torch.device        # where the batched inputs live, and the results go
    part: Any = None          # derivatives of higher order: an _operators.Operator; None: the Jacobian
    return_jacobian: bool = False  # with part: the first derivatives too, from the same pass
    keys: tuple | None = None  # a dict result (wrt="params" or a list): its keys, one per target
    flat: bool = False         # a dict's Jacobians concatenated along their last dim: (B, *out, P)
    to_memory: bool = True     # out=None: a one-chunk run's result is the chunk's own tensor (see _plan)
    project: Any = None        # a _projection.Bound: the targets' rows projected to (B, *out, dim)

    @property
    def results(self) -> int:
        """How many result tensors a run fills: one per wrt target, or the part (and the Jacobian)."""
        if self.project is not None:
            return 1
        return len(self.targets) if self.part is None else len(self.part.reads)

    def result_shapes(self, out_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """(B, *out, *in) per target; for an operator, its results (Operator.result_shapes): (B, *out)
        Laplacian, (B, *out, *in) diagonal, (B, *out, *in, *in) full Hessian, then (B, *out, *in) for
        the Jacobian when asked; (B,) divergence; (B, *out) per named derivative."""
        b = self.batch_size
        if self.project is not None:
            return [(b, *out_shape, self.project.projection.dim)]
        if self.part is None:
            return [(b, *out_shape, *t.shape) for t in self.targets]
        return self.part.result_shapes(b, out_shape)

    def param(self, name: str) -> torch.Tensor:
        return _module_tensors(self.fn)[name]


def evolve(spec: Spec, **changes) -> Spec:
    """``dataclasses.replace`` for the hot path (a training loop's every call): a copy with ``changes``,
    without re-running __init__ (a fifth of the time)."""
    new = object.__new__(Spec)
    new.__dict__.update(spec.__dict__)
    new.__dict__.update(changes)
    return new


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return named


def normalize(fn, inputs, *, wrt, output, in_dims, mode, coupling, create_graph, return_outputs,
              device=None, part=None, return_jacobian=False, flat=False, to_memory=True, project=None) -> Spec:
    if not callable(fn):
        raise TypeError(f"chunkjac: fn must be a callable or an nn.Module, got {_describe(fn)}.")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "chunkjac: called inside torch.inference_mode(), where autograd records nothing, so no "
            "derivative can be taken. Call it outside inference_mode (inside torch.no_grad() is fine).")
    args = _normalize_inputs(inputs)
    dims = _normalize_in_dims(in_dims, args)
    args = _place_sources(args, dims)
    batch_size = _batch_size(args, dims)
    home = next(a.device for a, d in zip(args, dims) if d is not None)
    device = _resolve_device(device, fn, home)
    if device.type == "meta":
        raise ValueError("chunkjac: fn's parameters are on the meta device, which holds shapes but no values; "
                         "a Jacobian depends on the values. Materialise the model first (model.to_empty(device="
                         "'cpu') and load or initialise its weights).")
    # Shared tensors go to the compute device once; batched ones stream there chunk by chunk.
    args = tuple(_shared(a, device) if d is None and isinstance(a, torch.Tensor) else a for a, d in zip(args, dims))
    targets, single, keys = _normalize_wrt(wrt, fn, args, dims)
    if mode not in MODES:
        raise ValueError(f"chunkjac: mode must be one of {MODES}, got {mode!r}.")
    if flat and keys is None:
        raise ValueError("chunkjac: flat=True concatenates the Jacobians of a dict result (wrt='params' or a list "
                         f"of names); wrt={wrt!r} gives {'one tensor' if single else 'a tuple'}.")
    if part is not None:
        part = _operator(part, targets, wrt, batch_size, return_jacobian)
        single = len(part.reads) == 1 and part.names is None
        keys = part.names
    if project is not None:
        from ._projection import resolve
        if part is not None:
            raise ValueError("chunkjac: project= projects first derivatives (compute); second derivatives take none.")
        if flat:
            raise ValueError("chunkjac: project= gives one (B, *out, dim) tensor already; drop flat=True.")
        project = resolve(project, targets)
        single, keys = True, None
    coupling = from_argument(coupling, batch_size)
    return Spec(fn=fn, args=args, in_dims=dims, batch_size=batch_size, targets=targets, single=single,
                output=output, mode=mode, coupling=coupling, create_graph=bool(create_graph),
                return_outputs=bool(return_outputs), device=device, home=home, part=part,
                return_jacobian=bool(return_jacobian) and part is not None, keys=keys, flat=bool(flat),
                to_memory=bool(to_memory), project=project)


def _operator(part, targets, wrt, batch_size: int, return_jacobian: bool):
    """The Operator a call computes: hessian's part by name, or the one a builder makes for the
    target's per-sample shape (laplacian's, bilaplacian's, divergence's, derivatives's arguments are
    checked there)."""
    from . import _operators
    if isinstance(part, str) and part not in PARTS or not (isinstance(part, str) or callable(part)):
        raise ValueError(f"chunkjac: part must be one of {PARTS}, got {part!r}: 'full' gives (B, *out, *in, *in), "
                         "'diagonal' (B, *out, *in), 'laplacian' (B, *out).")
    if len(targets) != 1 or targets[0].kind != "input" or not targets[0].batched:
        raise ValueError(
            f"chunkjac: derivatives of higher order are taken w.r.t. one batched input (wrt=<its index>), got "
            f"wrt={wrt!r}. For several inputs, concatenate them into one inside fn (fn(torch.cat([x, t], -1)) with "
            "wrt=0); for a loss's derivatives w.r.t. parameters, use create_graph=True and autograd on the result.")
    if isinstance(part, str):
        return _operators.hessian_part(part, targets[0].shape, bool(return_jacobian))
    return part(targets[0].shape, batch_size)


def _shared(a: torch.Tensor, device: torch.device) -> torch.Tensor:
    a = a.clone() if a.is_inference() else a  # inference tensors cannot enter an autograd graph
    return a.to(device)


def _resolve_device(device, fn, home: torch.device) -> torch.device:
    """``device`` if given, else where fn's parameters are, else where the batched inputs are."""
    first = _first_parameter(fn) if isinstance(fn, nn.Module) else None
    params = [] if first is None else [first.device]
    if device is None:
        return params[0] if params else home
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"chunkjac: device={device!r} is not a device; use e.g. 'cpu', 'cuda' or 'cuda:1'.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"chunkjac: device={str(device)!r}, but this PyTorch build sees no CUDA device; "
                         "use device='cpu' or leave device=None.")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if params and params[0] != device:
        raise ValueError(
            f"chunkjac: device={str(device)!r} but fn's parameters are on {params[0]}; move the model "
            f"first (model.to({str(device)!r})) or leave device=None to compute where they are.")
    return device


def _first_parameter(m: nn.Module):
    """next(m.parameters(), None), without the generator machinery (a training loop's every call)."""
    for p in m._parameters.values():
        if p is not None:
            return p
    for sub in m._modules.values():
        if sub is not None and (p := _first_parameter(sub)) is not None:
            return p
    return None


def _normalize_inputs(inputs) -> tuple:
    if isinstance(inputs, list):
        raise TypeError(
            "chunkjac: inputs must be a tensor or a tuple of positional arguments, got a list. "
            "Pass tuple(inputs) for several arguments, or (inputs,) if fn takes the list itself.")
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    if isinstance(inputs, Dataset):
        return from_dataset(inputs)
    out = []
    for k, a in enumerate(args):
        if type(a) is torch.Tensor or type(a) is nn.Parameter:  # the usual case, first
            if a.layout != torch.strided or a.device.type == "meta":
                _check_dense(a, f"input {k}")
            out.append(a)
            continue
        if is_lazy_array(a):
            out.append(from_memmap(a, f"input {k} (a {'memmap' if isinstance(a, np.memmap) else 'read-only array'})"))
            continue
        if isinstance(a, np.ndarray):
            # from_numpy shares memory where it can; it refuses negative strides and foreign byte
            # order (read-only arrays and memmaps are read chunk by chunk, above).
            if not a.dtype.isnative:
                a = a.astype(a.dtype.newbyteorder("="))
            if any(st < 0 for st in a.strides):
                a = np.array(a)
            a = torch.from_numpy(a)
        if isinstance(a, torch.Tensor):
            _check_dense(a, f"input {k}")
        out.append(a)
    if not out:
        raise ValueError("chunkjac: inputs is an empty tuple; pass at least one batched tensor.")
    return tuple(out)


def _normalize_in_dims(in_dims, args) -> tuple[int | None, ...]:
    if in_dims is None or type(in_dims) is int or isinstance(in_dims, numbers.Integral) and not isinstance(in_dims, bool):
        raw = [in_dims if isinstance(a, (torch.Tensor, Source)) else None for a in args]
    elif isinstance(in_dims, (tuple, list)):
        if len(in_dims) != len(args):
            raise ValueError(
                f"chunkjac: in_dims has {len(in_dims)} entries but inputs has {len(args)} positional "
                f"arguments; give one batch dim (or None) per input, e.g. in_dims={(0,) * len(args)}.")
        raw = list(in_dims)
    else:
        raise TypeError(f"chunkjac: in_dims must be an int, None or a tuple of those, got {_describe(in_dims)}.")
    dims = []
    for i, (a, d) in enumerate(zip(args, raw)):
        if d is None:
            dims.append(None)
            continue
        if type(d) is not int and (not isinstance(d, numbers.Integral) or isinstance(d, bool)):
            raise TypeError(f"chunkjac: in_dims[{i}] must be an int or None, got {_describe(d)}.")
        if not isinstance(a, (torch.Tensor, Source)):
            raise ValueError(
                f"chunkjac: in_dims[{i}]={d} but input {i} is {_describe(a)}, not a tensor; "
                "use None for inputs that are not batched.")
        if not -a.dim() <= d < a.dim():
            raise ValueError(
                f"chunkjac: in_dims[{i}]={d} is out of range for input {i} of shape {tuple(a.shape)} "
                f"(valid: {-a.dim()}..{a.dim() - 1}); use None for an input that is not batched."
                if a.dim() else
                f"chunkjac: in_dims[{i}]={d} but input {i} is a 0-d tensor, which has no batch dim; "
                "use None for it.")
        dims.append(int(d) % a.dim())
    return tuple(dims)


def _place_sources(args, dims) -> tuple:
    """Sources read along their in_dims; an unbatched one (in_dims None) is read whole."""
    return tuple((with_batch_dim(a, d) if d is not None else a.read_all()) if isinstance(a, Source) else a
                 for a, d in zip(args, dims))


def _batch_size(args, dims) -> int:
    sizes = {i: a.shape[d] for i, (a, d) in enumerate(zip(args, dims)) if d is not None}
    if not sizes:
        raise ValueError(
            "chunkjac: no input is batched (every in_dims entry is None); at least one input must carry "
            "the batch, e.g. in_dims=0 for a (B, ...) tensor.")
    if len(set(sizes.values())) > 1:
        got = ", ".join(f"input {i}: {s}" for i, s in sizes.items())
        raise ValueError(
            f"chunkjac: batched inputs disagree on the batch size ({got}) along their in_dims {dims}; "
            "give every batched input the same number of samples, or in_dims=None for a shared one.")
    b = next(iter(sizes.values()))
    if b == 0:
        raise ValueError("chunkjac: the inputs hold 0 samples; there is nothing to differentiate.")
    return b


_CLOSURE_HELP = (
    "A tensor captured by a closure cannot be swapped for a differentiable copy. Pass it as an input "
    "instead and mark it unbatched, e.g.\n"
    "    chunkjac.compute(lambda x, C: routine(C, x), (x, C), in_dims=(0, None), wrt=1)")


def _normalize_wrt(wrt, fn, args, dims) -> tuple[tuple[Target, ...], bool, tuple | None]:
    """(targets, single, dict keys or None). wrt="params": every trainable parameter of the module,
    in named_parameters() order (a tied parameter once, under its first name); a list: a dict keyed
    by the items as given (a Parameter by its name); a tuple: a tuple, as torch.func's argnums."""
    if isinstance(wrt, str) and wrt == "params" and not (isinstance(fn, nn.Module) and "params" in _module_tensors(fn)):
        if not isinstance(fn, nn.Module):
            raise TypeError(f"chunkjac: wrt='params' names the parameters of an nn.Module, but fn is a "
                            f"{type(fn).__name__}. Pass the module itself as fn. " + _CLOSURE_HELP)
        named = [(n, p) for n, p in fn.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"chunkjac: wrt='params', but {type(fn).__name__} has no trainable parameters "
                             "(none with requires_grad=True).")
        return tuple(_param_target(n, p) for n, p in named), False, tuple(n for n, _ in named)
    single = not isinstance(wrt, (tuple, list))
    items = [wrt] if single else list(wrt)
    if not items:
        raise ValueError("chunkjac: wrt is empty; name at least one input index or parameter.")
    targets = [_target(w, fn, args, dims) for w in items]
    ids = [(t.kind, t.index, t.name) for t in targets]
    if len(set(ids)) != len(ids):
        raise ValueError(f"chunkjac: wrt names the same tensor twice: {wrt!r}.")
    keys = None
    if isinstance(wrt, list):
        keys = tuple(t.name if isinstance(w, torch.Tensor) and t.kind == "param" else w for w, t in zip(items, targets))
    return tuple(targets), single, keys


def _target(w, fn, args, dims) -> Target:
    if type(w) is int or isinstance(w, numbers.Integral) and not isinstance(w, bool):
        n = len(args)
        if not -n <= w < n:
            raise ValueError(
                f"chunkjac: wrt={w} is out of range: fn gets {n} positional input(s) (valid: {-n}..{n - 1}).")
        i = int(w) % n
        return _input_target(i, args[i], dims[i], f"wrt={w}")
    if isinstance(w, str):
        if not isinstance(fn, nn.Module):
            raise TypeError(
                f"chunkjac: wrt={w!r} names a parameter, but fn is a {type(fn).__name__}, not an nn.Module. "
                "Pass the module itself as fn, or pass the tensor as an input. " + _CLOSURE_HELP)
        named = _module_tensors(fn)
        if w not in named:
            some = ", ".join(list(named)[:8]) or "none"
            raise ValueError(
                f"chunkjac: wrt={w!r} names no parameter or buffer of {type(fn).__name__} "
                f"(it has: {some}{', ...' if len(named) > 8 else ''}).")
        return _param_target(w, named[w])
    if isinstance(w, torch.Tensor):
        if isinstance(fn, nn.Module):
            for name, t in _module_tensors(fn).items():
                if t is w:
                    return _param_target(name, t)
        same = [i for i, a in enumerate(args) if a is w]
        if len(same) > 1:
            raise ValueError(
                f"chunkjac: wrt is the tensor passed as inputs {same}; say which one with its index "
                f"(wrt={same[0]}), or a tuple of indices for each of them.")
        if same:
            return _input_target(same[0], args[same[0]], dims[same[0]], f"wrt=<input {same[0]}>")
        raise ValueError(
            f"chunkjac: wrt is {_describe(w)} that is neither one of fn's parameters or buffers nor one of "
            "the inputs. " + _CLOSURE_HELP)
    raise TypeError(
        f"chunkjac: wrt must be an input index (int), a parameter name (str), an nn.Parameter of fn, "
        f"or a tuple of those; got {_describe(w)}.")


def _check_dense(t: torch.Tensor, label: str) -> None:
    """chunkjac slices inputs into chunks and differentiates strided tensors with real values."""
    if t.layout != torch.strided:
        raise TypeError(
            f"chunkjac: {label} is a {t.layout} tensor of shape {tuple(t.shape)}; chunkjac cuts inputs into "
            "chunks of samples, which sparse layouts do not allow. Pass it dense (x.to_dense()), or, if it is "
            "shared by all samples, use it inside fn as a closure.")
    if t.device.type == "meta":
        raise ValueError(
            f"chunkjac: {label} is on the meta device, which holds shapes but no values; a Jacobian depends "
            "on the values. Pass real data (e.g. torch.randn(shape)) on a CPU or CUDA device.")


def _check_float(t: torch.Tensor, label: str) -> None:
    if t.dtype in _FLOATS:
        return
    if t.is_complex():
        raise TypeError(f"chunkjac: {label} is {_describe(t)}; complex dtypes are not supported. "
                        "Differentiate the real and imaginary parts as two real inputs.")
    raise TypeError(
        f"chunkjac: {label} is {_describe(t)}; derivatives need a floating-point tensor. If fn treats it "
        "as numbers, pass a float copy (e.g. x.double()); integer inputs that index or mask are not "
        "differentiable and belong outside wrt.")


def _input_target(i, a, d, label) -> Target:
    if not isinstance(a, (torch.Tensor, Source)):
        raise TypeError(f"chunkjac: {label} names input {i}, which is {_describe(a)}, not a tensor.")
    if a.dtype not in _FLOATS:
        _check_float(a, f"input {i} ({label})")
    shape = tuple(s for k, s in enumerate(a.shape) if k != d) if d is not None else tuple(a.shape)
    return Target(kind="input", index=i, name=None, batched=d is not None, shape=shape, label=label)


def _param_target(name, t) -> Target:
    _check_float(t, f"parameter {name!r}")
    return Target(kind="param", index=None, name=name, batched=False, shape=tuple(t.shape),
                  label=f"wrt={name!r}")
