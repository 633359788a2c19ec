"""Running the user's function on one chunk: substituting differentiable values, picking the output."""
from __future__ import annotations

import contextlib
import functools
import types
import warnings
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ._errors import is_out_of_memory
from ._inputs import Source
from ._spec import Spec, _FLOATS, _describe


class Chunk(list):
    """A chunk's positional arguments, knowing where the chunk starts in the batch (an operator's
    directions drawn per sample depend on the sample's index, never on the chunking)."""

    start = 0


def chunk_args(spec: Spec, start: int, stop: int) -> list:
    """The positional arguments for samples [start, stop) on the compute device: batched inputs
    narrowed (and copied there if they live elsewhere; pinned, non-blocking on CUDA), others as given."""
    out = Chunk()
    out.start = start
    whole = start == 0 and stop == spec.batch_size
    for a, d in zip(spec.args, spec.in_dims):
        if isinstance(a, Source):
            a = a.read(start, stop)  # a fresh CPU tensor
        elif d is not None and not whole:
            a = a.narrow(d, start, stop - start)
        if d is not None:
            if a.is_inference():  # made under inference_mode: autograd cannot record on it
                a = a.clone()
            if a.device != spec.device:
                if spec.device.type == "cuda" and a.device.type == "cpu":
                    a = a.pin_memory()
                # Non-blocking only towards the GPU: a non-blocking copy to the host could be read
                # before it lands.
                a = a.to(spec.device, non_blocking=spec.device.type == "cuda")
        out.append(a)
    return out


class FnError(RuntimeError):
    """fn itself failed on a chunk of the user's inputs: chunkjac's context (on what) and fn's error in
    the message, fn's exception chained. Private: the public functions raise fn's exception itself,
    with ``note`` (the context alone) added to it (see _api._users_error)."""

    def __init__(self, note: str, why: str = ""):
        super().__init__(f"{note} fn's error: {why}" if why else note)
        self.note = note


def call(spec: Spec, args: list, params: dict[str, torch.Tensor] | None = None) -> Any:
    """fn(*args), with module parameters/buffers replaced by ``params`` (torch.func.functional_call).

    An exception from fn becomes an :class:`FnError` that names the chunk it ran on. Passed through:
    chunkjac's own errors (a chunkjac call inside fn) and out-of-memory errors (the executor backs
    off on them)."""
    try:
        return _call(spec, args, params)
    except Exception as e:
        if type(e).__module__.startswith("chunkjac") or str(e).startswith("chunkjac:") or is_out_of_memory(e):
            raise
        raise FnError(_failure(spec, args, e), str(e).strip() or type(e).__name__) from e


def _failure(spec: Spec, args: list, e: Exception) -> str:
    n = next((a.shape[d] for a, d in zip(args, spec.in_dims) if d is not None and isinstance(a, torch.Tensor)), None)
    part = f"a chunk of {n:,} of the {spec.batch_size:,} samples" if n is not None and n != spec.batch_size \
        else f"all {spec.batch_size:,} samples"
    shapes = "; ".join(f"input {i}: {_describe(a)}" for i, (a, d) in enumerate(zip(args, spec.in_dims))
                       if isinstance(a, torch.Tensor))
    text = (f"chunkjac: fn raised {type(e).__name__} on {part} ({shapes}); chunkjac calls fn on chunks of the "
            f"inputs you passed, along their in_dims={spec.in_dims}.")
    floats = {a.dtype for a in spec.args if isinstance(a, (torch.Tensor, Source)) and a.dtype.is_floating_point}
    params = {t.dtype for _, v in reachable_state(spec.fn) if isinstance(v, nn.Module) for t in v.parameters()
              if t.is_floating_point()}
    if "dtype" in str(e) and floats and params and floats != params:
        have, want = "/".join(sorted(str(d) for d in floats)), "/".join(sorted(str(d) for d in params))
        text += (f"\nThe inputs are {have} but fn's parameters are {want} (numpy arrays are float64): convert "
                 f"one to the other, e.g. x.to({want.split('/')[0]}) or model.to({have.split('/')[0]}).")
        if any(isinstance(a, Source) for a in spec.args):  # read from .npy files: the command line's inputs
            np_want = want.split("/")[0].replace("torch.", "np.")
            text += (f" For a .npy input: np.save(path, np.load(path).astype({np_want})), or cast inside the "
                     "model's factory.")
    return text


def _call(spec: Spec, args: list, params: dict[str, torch.Tensor] | None) -> Any:
    if not params:
        return spec.fn(*args)
    # functional_call can leave plain tensors in place of the Parameters of a submodule that appears
    # twice in the module tree (pytorch#164759); put every original entry back.
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in spec.fn.modules()]
    try:
        return functional_call(spec.fn, params, tuple(args))
    finally:
        for m, ps, bs in saved:
            m._parameters.update(ps)
            m._buffers.update(bs)


def select(spec: Spec, out: Any, n: int) -> torch.Tensor:
    """The output to differentiate, checked to be a float tensor whose leading dim holds the n samples."""
    where = "fn's output"
    if spec.output is not None:
        if not isinstance(out, (tuple, list, dict)):
            raise TypeError(
                f"chunkjac: output={spec.output!r} selects from a tuple, list or dict, but fn returned "
                f"{_describe(out)}; pass output=None for a single tensor.")
        try:
            out = out[spec.output]
        except (IndexError, KeyError, TypeError):
            keys = list(out.keys()) if isinstance(out, dict) else list(range(len(out)))
            raise ValueError(
                f"chunkjac: output={spec.output!r} selects nothing from fn's {type(out).__name__}; "
                f"valid: {keys}.") from None
        where = f"fn's output[{spec.output!r}]"
    elif isinstance(out, (tuple, list, dict)):
        keys = list(out.keys()) if isinstance(out, dict) else list(range(len(out)))
        raise ValueError(
            f"chunkjac: fn returned a {type(out).__name__} of {len(keys)}; say which one to differentiate "
            f"with output= (one of {keys}). return_outputs=True gives all of them back.")
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"chunkjac: {where} must be a tensor to differentiate, got {_describe(out)}.")
    if out.layout != torch.strided:
        raise TypeError(f"chunkjac: {where} is a {out.layout} tensor; chunkjac differentiates dense outputs. "
                        "Return out.to_dense() from fn.")
    if out.dtype not in _FLOATS:
        raise TypeError(
            f"chunkjac: {where} is {_describe(out)}; only float16, bfloat16, float32 and float64 outputs "
            "can be differentiated.")
    if out.dim() == 0 or out.shape[0] != n:
        raise ValueError(
            f"chunkjac: {where} has shape {tuple(out.shape)} for a batch of {n} samples, but its leading "
            f"dim must hold those samples: (B, *out) with B={n}. A reduction over the batch (x.sum(0), a loss "
            "with reduction='mean') mixes the samples; return per-sample values instead "
            "(e.g. reduction='none'), one row per sample." + missing_batch_dim(spec))
    return out


def missing_batch_dim(spec: Spec) -> str:
    """One point passed without its batch dim (torch.rand(3) into Linear(3, ...)) reads as 3 samples
    of one element each: a note that asks, where the batched wrt inputs have per-sample shape ()."""
    wrt = [t for t in spec.targets if t.batched]
    if not wrt or any(t.shape != () for t in wrt):
        return ""
    i = wrt[0].index
    shape = tuple(spec.args[i].shape)
    return (f" Note: input {i} has shape {shape}, read as {spec.batch_size:,} samples of one element each. If it "
            f"is one sample of {spec.batch_size:,} features, add the batch dim: x.unsqueeze(0), shape (1, "
            f"{spec.batch_size}).")


def _plain_object(obj) -> bool:
    """An instance of a user's class with attributes: not a Python module, class, function or builtin."""
    return (hasattr(obj, "__dict__") and not isinstance(obj, (types.ModuleType, type, types.FunctionType,
                                                               types.BuiltinFunctionType, types.MethodType))
            and type(obj).__module__ not in ("builtins", "torch") and not type(obj).__module__.startswith("torch."))


def reachable_state(fn, depth: int = 3) -> list:
    """(name, module or tensor) that fn holds or reaches: fn itself if a module; for functions, the
    modules and tensors in its closure, defaults, bound ``self``, ``functools.partial`` arguments and
    the globals it names (``lambda x: model(x).float()`` reaches ``model``), and the attributes of
    plain objects among those (``trainer.step`` reaches ``trainer.model``); nested to ``depth``. A resumed dump whose model changed behind a closure is refused like any other."""
    seen: set[int] = set()
    found: list = []

    def visit(obj, name: str, d: int) -> None:
        if id(obj) in seen or d < 0:
            return
        seen.add(id(obj))
        if isinstance(obj, (nn.Module, torch.Tensor)):
            found.append((name, obj))
            return
        if isinstance(obj, functools.partial):
            visit(obj.func, name + ".func", d - 1)
            for k, v in enumerate(obj.args):
                visit(v, f"{name}.args[{k}]", d - 1)
            for k, v in obj.keywords.items():
                visit(v, f"{name}.{k}", d - 1)
            return
        if isinstance(obj, (list, tuple)):
            for k, v in enumerate(obj[:64]):
                visit(v, f"{name}[{k}]", d - 1)
            return
        if isinstance(obj, dict):
            for k, v in list(obj.items())[:64]:
                visit(v, f"{name}[{k!r}]", d - 1)
            return
        if hasattr(obj, "__self__") and not isinstance(obj.__self__, type(functools)):
            visit(obj.__self__, name + ".__self__", d - 1)
        code = getattr(obj, "__code__", None)
        if code is None and _plain_object(obj):
            # An object that holds the model (a Trainer whose method is fn, a callable wrapper):
            # its attributes, as a closure's cells are.
            for k, v in list(vars(obj).items())[:64]:
                visit(v, f"{name}.{k}", d - 1)
            return
        if code is not None:
            for cell, var in zip(getattr(obj, "__closure__", None) or (), code.co_freevars):
                try:
                    visit(cell.cell_contents, f"{name}.{var}", d - 1)
                except ValueError:  # an empty cell
                    pass
            for k, v in enumerate(getattr(obj, "__defaults__", None) or ()):
                visit(v, f"{name}.defaults[{k}]", d - 1)
            g = getattr(obj, "__globals__", {})
            for var in code.co_names:
                if var in g:
                    visit(g[var], f"{name}.{var}", d - 1)

    visit(fn, "fn", depth)
    return found


@contextlib.contextmanager
def preserved_buffers(fn):
    """Undo in-place buffer updates (BatchNorm's running statistics) that forwards would leave in
    every module fn is or reaches (a module held by a closure included). Only buffers that changed
    are written back: a write moves the version counter, which the caches key on. (batch_norm updates
    its statistics without moving it, so values are compared too.)"""
    saved = [(b, b.detach().clone(), version(b))
             for _, v in reachable_state(fn) if isinstance(v, nn.Module) for b in v.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v, before in saved:
                if version(b) != before or not torch.equal(b, v):
                    b.copy_(v)


def version(t: torch.Tensor) -> int:
    """t's in-place version counter (0 for inference tensors, which have none)."""
    return 0 if t.is_inference() else t._version


def working_dtypes(spec: Spec, dtype: torch.dtype) -> set:
    """The float dtypes in play besides ``dtype`` (the output's): the inputs', and those of the
    modules and tensors fn is or reaches. A float32 model with a float64 output rounds like float32."""
    dtypes = {dtype} | {a.dtype for a in spec.args if isinstance(a, (torch.Tensor, Source)) and a.dtype.is_floating_point}
    for _, v in reachable_state(spec.fn):
        tensors = v.parameters() if isinstance(v, nn.Module) else [v]
        dtypes |= {t.dtype for t in tensors if t.is_floating_point()}
    return dtypes


def own_buffers(spec: Spec) -> dict[str, torch.Tensor]:
    """Copies of the buffers of a module in training mode, to pass to ``call`` inside torch.func.jvp:
    in training mode fn may update buffers in place (BatchNorm's running statistics), which jvp
    refuses on tensors made outside it; copies made inside it may be updated (and are then dropped)."""
    fn = spec.fn
    if not isinstance(fn, torch.nn.Module) or not any(m.training for m in fn.modules()):
        return {}
    return {name: b.clone() for name, b in fn.named_buffers()}


def reached_modules(fn) -> list[nn.Module]:
    """Every module fn (a Spec's fn, or the Spec) is or reaches, submodules included, each once. For
    a Spec, found once: every chunk of a call asks again (a spec lives for one call)."""
    if isinstance(fn, Spec):
        found = fn.__dict__.get("_reached")
        if found is None:
            found = reached_modules(fn.fn)
            object.__setattr__(fn, "_reached", found)  # (a cache on a frozen dataclass: not a field)
        return found
    return list({id(s): s for _, m in reachable_state(fn) if isinstance(m, nn.Module)
                 for s in m.modules()}.values())


@contextlib.contextmanager
def as_it_was(modules: list[nn.Module]):
    """fn's modules as they were before the call. Always: the values of their buffers (a Jacobian is
    not a training step: running statistics updated by chunkjac's forwards are put back). When the
    call fails (a refusal included), also everything else chunkjac's passes may have left: the
    attributes forwards and hooks add or change (Opacus's ``activations`` and ``grad_sample``), the
    contents of list attributes, the tensors' ``.grad`` and attributes, the parameter, buffer and
    submodule tables. (A call that succeeds leaves what fn's own code records, a call counter say.)
    Only what changed is written back: a buffer write moves the version counter, which the caches
    key on (batch_norm updates running statistics without moving it, so values are compared too).
    Yields ``also(tensors)``: other tensors to put back like buffers from then on (shared inputs fn
    writes in place, see _writes)."""
    saved, tensors, buffers, seen = [], [], [], set()
    for m in modules:
        d = m.__dict__
        saved.append((d, d.copy(), [(v, v.copy()) for v in d.values() if type(v) is list],
                      m._parameters, m._parameters.copy(), m._buffers, m._buffers.copy(), m._modules,
                      m._modules.copy()))
        for t in m._parameters.values():
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                tensors.append((t, t.grad, t.__dict__.copy()))
        for t in m._buffers.values():
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                tensors.append((t, t.grad, t.__dict__.copy()))
                buffers.append((t, t.detach().clone(), version(t)))

    def also(more) -> None:
        buffers.extend((t, t.detach().clone(), version(t)) for t in more if id(t) not in seen)

    try:
        yield also
    except BaseException:
        for d, d0, lists, p, p0, b, b0, s, s0 in saved:
            _restore(d, d0)
            _restore(p, p0)
            _restore(b, b0)
            _restore(s, s0)
            for v, items in lists:
                _restore(v, items)
        for t, grad, attrs in tensors:
            if t.grad is not grad:
                t.grad = grad
            _restore(t.__dict__, attrs)
        raise
    finally:
        if buffers:
            with torch.no_grad():
                for b, v, before in buffers:
                    if version(b) != before or not torch.equal(b, v):
                        b.copy_(v)


def _restore(d, saved) -> None:
    """The dict or list ``d`` as ``saved``, its copy: compared by identity first (the C-level
    comparison's shortcut for the same objects: a call changes nothing, usually), values may be
    tensors, whose == does not say True or False."""
    try:
        if d == saved:
            return
    except (RuntimeError, TypeError, ValueError):  # a tensor's ==, or an object's own __eq__, raising
        pass
    if isinstance(d, dict):
        if len(d) == len(saved) and all(saved.get(k, d) is v for k, v in d.items()):
            return
        d.clear()
        d.update(saved)
    elif len(d) != len(saved) or any(a is not b for a, b in zip(d, saved)):
        d[:] = saved


@contextlib.contextmanager
def shielded(modules: list[nn.Module]):
    """Run fn inside a torch.func transform on stand-ins for the tensors of ``modules`` (those fn
    reaches: ``reached_modules``, found once per chunk rather than at every call of the transform).

    Inside ``torch.func.jvp``, ``model.to(...)`` (and anything else that assigns ``param.data``) puts
    a functorch wrapper of the transform's level into the Parameter object: the wrapper outlives the
    transform and the next forward segfaults (or, at random, the same one). So, entered inside the
    transform, this replaces each module's parameters and buffers by views of themselves (same values,
    same autograd history) made at the transform's level, where such an assignment stays consistent;
    the user's own Parameter objects are put back untouched on the way out.
    """
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in modules]
    views: dict[int, torch.Tensor] = {}  # a tensor held twice (tied weights) gets one view
    for m, params, buffers in saved:
        for table, entries in ((m._parameters, params), (m._buffers, buffers)):
            for k, v in entries.items():
                if v is not None:
                    table[k] = views.setdefault(id(v), v.view_as(v))
    try:
        yield
    finally:  # the dicts as they were, whatever fn put there meanwhile (it may have added entries)
        for m, params, buffers in saved:
            m._parameters.clear()
            m._parameters.update(params)
            m._buffers.clear()
            m._buffers.update(buffers)


@contextlib.contextmanager
def detached_parameters(modules: list[nn.Module]):
    """Run fn with the parameters of ``modules`` detached (same values, no autograd history): a pass
    whose results need no graph records none, even with gradients enabled (which fn's own
    torch.no_grad() blocks must be told from). The user's Parameter objects are put back on the way out."""
    saved = [(m, dict(m._parameters)) for m in modules]
    plain: dict[int, torch.Tensor] = {}
    for m, params in saved:
        for k, v in params.items():
            if v is not None:
                m._parameters[k] = plain.setdefault(id(v), v.detach())
    try:
        yield
    finally:
        for m, params in saved:
            m._parameters.clear()
            m._parameters.update(params)


_decompositions_loaded: list = []


def load_forward_decompositions() -> None:
    """torch.func.jvp loads PyTorch's forward-AD decompositions on first use through torch.jit.script,
    which warns DeprecationWarning: under ``-W error`` the load itself fails. Load them quietly, once."""
    if _decompositions_loaded:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)
        if load is not None:
            load()
    _decompositions_loaded.append(True)


def detach_all(out: Any) -> Any:
    return tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, out)


def split_tensors(out: Any):
    """Flatten fn's outputs into (tensor leaves, a function that rebuilds the structure from them)."""
    leaves, spec = tree_flatten(out)
    where = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]

    def rebuild(tensors):
        full = list(leaves)
        for i, t in zip(where, tensors):
            full[i] = t
        return tree_unflatten(full, spec)

    return tuple(leaves[i] for i in where), rebuild
