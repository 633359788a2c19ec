"""Which of its inputs fn writes in place, found before fn ever runs on the user's memory.

# NOTE: [Writes into the inputs]
# chunkjac calls fn on chunks that are views of the user's batched inputs (narrowed, not copied).
# An op that writes in place into such an input changes the user's tensor, and one that expects
# another size writes past the chunk: batch_norm in training mode given per-sample running
# statistics (in_dims=0 where they are per channel) writes C entries through a view of n < C rows,
# past the end of the storage, and the process dies later (SIGSEGV) in whatever touches that heap.
# PyTorch's kernel does not check the size. So before any other pass (the coupling check, the
# probes, the run), fn runs once on a small window under a torch-function mode that sees every torch
# call before it runs: a call that writes an argument in place (an in-place method or operator,
# ``out=``, a ``torch.ops`` op whose schema marks the argument ``(a!)``, and the batch norms, whose
# running statistics no schema declares) into memory shared with a batched input is stopped there,
# before it writes, and the call refused; what that mode cannot see (a C++ extension writing
# through ``.data``) is caught after the run by comparing the batched inputs' values. (A dispatch mode
# would see below the Python API, but entering one imports torch._dynamo: 1.3 s of every fresh
# process's first call.) Writes into shared inputs (in_dims=None:
# running statistics passed whole) are allowed; they are undone after the call like module buffers
# (_function.as_it_was). The verdict is remembered with the call's other decisions (see _memo).
# If fn cannot run under the dispatch mode (a compiled or exotic fn), nothing is concluded and the
# call goes on as before.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

from ._function import FnError, call, chunk_args
from ._inputs import Source
from ._spec import Spec

WINDOW = 64  # samples fn runs on, as the coupling check's first window
WHOLE_MAX = 4096  # fn that fails on the window (a graph layer) runs on the whole batch up to this size
VALUES_MAX = 256 * 2**20  # batched inputs up to this size are also compared by value after the run


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b) or bool(((a != a) & (b != b) | (a == b)).all())  # NaN where NaN was


class _Write(Exception):
    def __init__(self, index: int, op, argument: str):
        super().__init__(index, op, argument)
        self.index, self.op, self.argument = index, op, argument


def _storage(t: torch.Tensor) -> int | None:
    """The address of t's storage; None where it has none (meta tensors, functorch wrappers) or it is
    empty (every empty storage is at address 0: no write can reach it)."""
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return s.data_ptr() if s.nbytes() else None


# The batch norms write their running statistics in training mode, and no schema says so
# (aten::native_batch_norm predates the (a!) annotations): where each takes (running_mean,
# running_var) and its training flag, by position and keyword; None: always (_batch_norm_with_update).
def _norms() -> dict:
    F = torch.nn.functional
    table = {F.batch_norm: (1, 2, 5, "training"), F.instance_norm: (1, 2, 5, "use_input_stats"),
             torch.instance_norm: (3, 4, 5, "use_input_stats")}
    for name in ("batch_norm", "native_batch_norm", "_native_batch_norm_legit", "cudnn_batch_norm",
                 "miopen_batch_norm"):
        if hasattr(torch, name):
            table[getattr(torch, name)] = (3, 4, 5, "training")
    by_name = {"native_batch_norm": (3, 4, 5, "training"), "_native_batch_norm_legit": (3, 4, 5, "training"),
               "cudnn_batch_norm": (3, 4, 5, "training"), "miopen_batch_norm": (3, 4, 5, "training"),
               "batch_norm": (3, 4, 5, "training"), "instance_norm": (3, 4, 5, "use_input_stats"),
               "_batch_norm_with_update": (3, 4, None, None)}
    return table, by_name


_NORMS, _NORMS_BY_OP = _norms()
# In-place by name, but they change a tensor's autograd flags or bookkeeping, never its values.
_NOT_WRITES = {"requires_grad_", "retain_grad_", "share_memory_", "record_stream_", "pin_memory_", "detach_",
               "resize_as_sparse_", "_coalesced_", "set_"}
_INPLACE_OPERATORS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                      "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__",
                      "__imatmul__"}


def _writes(func, args, kwargs):
    """(argument name, value, undeclared) of each argument the torch call ``func`` writes in place."""
    name = getattr(func, "__name__", "")
    schema = getattr(func, "_schema", None)
    if schema is not None:  # a torch.ops overload: its schema says
        for k, arg in enumerate(schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                yield arg.name, args[k] if k < len(args) else kwargs.get(arg.name), False
        name = schema.name.split("::")[-1]
    elif ((name.endswith("_") and not name.endswith("__")) or name in _INPLACE_OPERATORS) and name not in _NOT_WRITES:
        if args:
            yield "self", args[0], False
    if "out" in kwargs:
        yield "out", kwargs["out"], False
    norm = _NORMS_BY_OP.get(name) if schema is not None else _NORMS.get(func)
    if norm is not None:
        mean, var, at, flag = norm
        training = True if at is None else (args[at] if len(args) > at else kwargs.get(flag, flag == "use_input_stats"))
        if training:
            for k, key in ((mean, "running_mean"), (var, "running_var")):
                yield key, args[k] if len(args) > k else kwargs.get(key), True


class _Watch(TorchFunctionMode):
    """Stops a torch call that would write into a batched input's memory; records writes into shared
    ones. ``batched``: storage -> (input index, whether fn gets a copy: an input read from a file or
    a Dataset, which fn may write within its bounds)."""

    def __init__(self, batched: dict[int, tuple[int, bool]], shared: dict[int, int]):
        super().__init__()
        self.batched, self.shared, self.written = batched, shared, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for name, v, undeclared in _writes(func, args, kwargs):
            for t in v if isinstance(v, (list, tuple)) else (v,):
                if not isinstance(t, torch.Tensor):
                    continue
                s = _storage(t)
                if s in self.batched:
                    index, copy = self.batched[s]
                    # A copy may be written where the op stays inside it: a declared write always
                    # does; a batch norm writes C = input.shape[1] entries, whatever it is given.
                    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
                    inside = not undeclared or (x is not None and x.dim() > 1 and t.numel() == x.shape[1])
                    if not (copy and inside):
                        raise _Write(index, getattr(func, "__name__", func), name)
                if s in self.shared:
                    self.written.add(self.shared[s])
        return func(*args, **kwargs)


def written_inputs(spec: Spec) -> tuple[int, ...]:
    """The shared inputs fn writes in place (to be restored after the call); raises ValueError when
    fn writes into a batched one. See [Writes into the inputs]."""
    found = _written(spec, min(spec.batch_size, WINDOW))
    if found is None and WINDOW < spec.batch_size <= WHOLE_MAX:  # fn runs only on the whole batch?
        found = _written(spec, spec.batch_size)
    return found or ()


def _written(spec: Spec, m: int) -> tuple[int, ...] | None:
    """written_inputs on the first m samples; None when fn does not run there."""
    args = chunk_args(spec, 0, m)
    batched = {s: (i, isinstance(spec.args[i], Source)) for i, (a, d) in enumerate(zip(args, spec.in_dims))
               if d is not None and isinstance(a, torch.Tensor) and (s := _storage(a)) is not None}
    shared = {s: i for i, (a, d) in enumerate(zip(args, spec.in_dims))
              if d is None and isinstance(a, torch.Tensor) and (s := _storage(a)) is not None}
    if not batched:
        return ()
    for t in spec.targets:  # as the strategies run fn: the wrt inputs are leaves that require grad
        if t.batched and args[t.index].is_floating_point():
            args[t.index] = args[t.index].detach().requires_grad_(True)
    saved = {i: args[i].detach().clone() for i in shared.values()}  # this run's own writes, undone
    # Writes no schema or table declares (a C++ extension's op): the batched inputs' values, compared.
    whole = {i: spec.args[i].detach().clone() for i, _ in batched.values()
             if isinstance(spec.args[i], torch.Tensor) and spec.args[i].numel() * spec.args[i].element_size() <= VALUES_MAX}
    watch = _Watch(batched, shared)
    try:
        with torch.enable_grad(), watch:
            call(spec, args)
        changed = [i for i, v in whole.items() if not _same(spec.args[i], v)]
        if changed:
            raise _Write(changed[0], "an op", "(its values changed during fn)")
    except _Write as w:
        for i, v in whole.items():
            if not _same(spec.args[i], v):
                with torch.no_grad():
                    spec.args[i].copy_(v)
        raise ValueError(
            f"chunkjac: fn writes in place into input {w.index}, a batched input ({w.op} writes its argument "
            f"{w.argument!r}). chunkjac runs fn on views of your inputs, chunk by chunk: the write would change "
            "your tensor, and an op that expects another size (statistics per channel given one row per sample) "
            "writes past the end of the chunk. Pass that input with in_dims=None if all samples share it (running "
            "statistics are per channel), or write fn without in-place operations on its inputs.") from None
    except FnError:
        return None  # fn fails on this window: the coupling check finds out why, with fn's own error
    except Exception:  # noqa: BLE001 - fn cannot run under a dispatch mode: nothing concluded
        return ()
    finally:
        with torch.no_grad():
            for i, v in saved.items():
                if not torch.equal(spec.args[i], v):
                    spec.args[i].copy_(v)
    return tuple(sorted(watch.written))
