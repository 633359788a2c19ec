"""Remembered decisions: what identifies fn, what guards a decision, and the cache that keeps them.

# NOTE: [What a remembered decision is keyed on]
# A call decides things that cost forwards and backward passes: the coupling verdict, the forward-
# mode and Taylor-mode cross-checks, the probes and the plan. A training loop makes the same call
# thousands of times, so these are remembered (``chunkjac.probe_cache``) and reused while nothing
# they depend on has changed. As torch.compile does for the code it traces, chunkjac guards a
# decision on everything fn's behaviour can depend on, checked at every call (``guard``):
#  - fn itself, by identity (``anchors``: a module or object by itself; a plain function by its code
#    and the objects its closure, defaults and globals hold, so that a lambda written again at each
#    call with the same captures hits);
#  - fn's behaviour, by value (``_Walk``): the code of every Python function fn is or reaches; the
#    contents of closure cells, positional and keyword-only defaults, partial arguments, bound
#    ``self``, lists, tuples, dicts and sets (``ops[0] = other`` changes the key); the globals fn's
#    code names, and the attributes it names of user modules (``config.MIX``); every module's class,
#    training flag, hooks, parameter and buffer names, shapes, dtypes and devices, and its plain
#    attributes that the code of its class or of any function reached names (``self.mix``); likewise
#    the attributes of plain objects (a Trainer whose method is fn). Library code (the standard
#    library, site-packages: torch itself) is keyed by identity, its globals taken as constant;
#  - the inputs: shapes, dtypes, devices, in_dims; scalars and other objects by value; integer and
#    bool tensors (indices, group ids, masks: structure) by identity and in-place version;
#  - the torch state a decision reads: autocast, deterministic algorithms, the default dtype;
#  - the call's options.
# Float tensor values (parameters, inputs) are not in the key: an optimizer step changes every
# parameter in place, and deciding again at every step would cost a training loop 2.5x its step.
# Values could change a verdict only through data-dependent paths (a gate at exactly 0 that leaves
# the samples independent until training moves it); against those the coupling verdict and the
# cross-checks are decided again after 1, 2, 4, ... calls on new values (``state_key``: tensor
# identities and in-place versions), the gap doubling up to ``probe_cache.recheck_every`` (100).
# Outside the key: what fn reads without naming it (``getattr(self, name)`` with a computed name,
# a file, an environment variable, a C extension object's internal state, library globals), and
# state beyond WALK_DEPTH levels or WALK_ITEMS objects from fn. fn that reaches more than that is
# never reused (decided at every call, with a warning once). When fn's behaviour depends on what
# the key cannot see, call ``chunkjac.probe_cache.clear()`` after changing it, or decide at every
# call with ``chunkjac.probe_cache.enabled = False``; a training loop that wants no decision at all
# passes a recorded ``plan=``.
"""
from __future__ import annotations

import enum
import functools
import inspect
import os
import sysconfig
import threading
import types
import weakref
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.modules import module as _module

from ._errors import warn
from ._function import reached_modules, version
from ._inputs import Source

WALK_DEPTH = 12      # levels of containers, attributes and closures below fn
WALK_ITEMS = 50_000  # objects one guard may visit; more: not reused (see the NOTE)

_ATOMS = (bool, int, float, complex, str, bytes, type(None), type(Ellipsis), range, torch.dtype,
          torch.device, torch.layout, torch.memory_format, enum.Enum)
_SIMPLE = frozenset({int, float, str, bool, type(None)})
# nn.Module's own bookkeeping: walked explicitly (hooks, tensors, submodules) or irrelevant.
_MODULE_INTERNAL = frozenset({
    "training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_forward_hooks",
    "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_is_full_backward_hook",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks"})
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    roots |= {os.path.dirname(os.path.dirname(torch.__file__)), os.path.dirname(np.__file__)}
    return tuple(sorted(os.path.realpath(r) + os.sep for r in roots if r))


_LIBRARY = _library_roots()
_CHUNKJAC = os.path.dirname(os.path.realpath(__file__)) + os.sep
_library_files: dict[str, bool] = {}


def _is_library_file(filename: str | None) -> bool:
    """Code from the standard library, an installed package (torch, numpy, e3nn, ...) or chunkjac:
    keyed by identity, its module globals taken as constant. The user's code is walked."""
    if not filename:
        return True  # built-in, frozen, generated: nothing to walk
    hit = _library_files.get(filename)
    if hit is None:
        real = os.path.realpath(filename)
        hit = _library_files[filename] = real.startswith(_LIBRARY) or real.startswith(_CHUNKJAC)
    return hit


_code_names: dict = {}


def _names_of(code: types.CodeType) -> frozenset:
    """The global and attribute names a code object and the code nested in it (lambdas,
    comprehensions, inner functions) can read."""
    hit = _code_names.get(code)
    if hit is None:
        names = set(code.co_names)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                names |= _names_of(c)
        hit = _code_names[code] = frozenset(names)
    return hit


_class_names: dict = {}


def _names_of_class(cls: type) -> frozenset:
    """Every name the Python code of ``cls`` and its bases (nn.Module and object excepted) reads."""
    hit = _class_names.get(cls)
    if hit is None:
        names: set = set()
        for base in cls.__mro__:
            if base in (object, nn.Module):
                continue
            for v in vars(base).values():
                for f in (v, getattr(v, "__func__", None), getattr(v, "fget", None), getattr(v, "fset", None)):
                    code = getattr(f, "__code__", None)
                    if isinstance(code, types.CodeType):
                        names |= _names_of(code)
        hit = _class_names[cls] = frozenset(names)
    return hit


class _TooMuch(Exception):
    """fn reaches more than WALK_ITEMS objects."""


class _Walk:
    """A flat list of everything fn's behaviour can depend on (see the NOTE): items appended in walk
    order, containers with their lengths, objects seen twice as references to their first visit."""

    __slots__ = ("out", "state", "modules", "names", "seen", "left", "filtered", "grew", "merged")

    def __init__(self, names: set):
        self.out: list = []
        self.state: list = []    # (id, in-place version) of every tensor: values, for state_key
        self.modules: list = []  # every module reached, once: what a call must leave as it was
        self.names = names       # attribute names that code reached so far reads
        self.seen: dict = {}     # id -> position of the first visit (cycles, shared objects)
        self.left = WALK_ITEMS
        self.filtered = False    # an attribute filter used names: names that grow later mean a second walk
        self.grew = False
        self.merged: set = set()  # ids of the name sets already merged (a class met again is free)

    def read(self, names: frozenset) -> None:
        k = id(names)  # (the sets are cached per code object and class, and live as long as they do)
        if k in self.merged:
            return
        self.merged.add(k)
        if not names <= self.names:
            self.names = self.names | names  # a new set: the one passed in is shared (see watch)
            self.grew = self.grew or self.filtered

    def walk(self, v, depth: int = WALK_DEPTH) -> None:
        out = self.out
        t = type(v)
        if t in _SIMPLE or isinstance(v, _ATOMS):
            out.append(t)
            out.append(v)
            return
        self.left -= 1
        if self.left < 0:
            raise _TooMuch
        if isinstance(v, torch.Tensor):
            self.state.append((id(v), version(v)))
            if v.is_floating_point() or v.is_complex():
                out.append(("T", tuple(v.shape), v.dtype, v.device, v.requires_grad, v.layout))
            else:  # indices, masks, group ids: their values are structure
                out.append(("I", tuple(v.shape), v.dtype, v.device, _Same(v), version(v)))
            return
        k = id(v)
        if k in self.seen:
            out.append(("ref", self.seen[k]))
            return
        self.seen[k] = mark = len(out)
        if depth <= 0:
            out.append(("deep", t, _Same(v)))
            return
        try:
            self._dispatch(v, t, depth - 1)
        except _TooMuch:
            raise
        except Exception:  # noqa: BLE001 - an object whose len, iteration or attributes raise: its identity
            del out[mark:]
            out.append(("X", t, _Same(v)))

    def _dispatch(self, v, t: type, d: int) -> None:
        out = self.out
        if isinstance(v, nn.Module):
            self._module(v, d)
        elif t is types.FunctionType:
            self._function(v, d)
        elif t is types.MethodType:
            out.append("method")
            self.walk(v.__func__, d)
            self.walk(v.__self__, d)
        elif isinstance(v, functools.partial):
            out.append(functools.partial)
            self.walk(v.func, d)
            self.walk(v.args, d)
            self.walk(v.keywords, d)
        elif isinstance(v, (list, tuple)):
            items = list.__iter__(v) if isinstance(v, list) else tuple.__iter__(v)  # not a subclass's overrides
            out.append(t)
            out.append(list.__len__(v) if isinstance(v, list) else tuple.__len__(v))
            for item in items:
                self.walk(item, d)
        elif isinstance(v, dict):
            out.append(t)
            out.append(dict.__len__(v))
            for key, item in dict.items(v):
                self.walk(key, d)
                self.walk(item, d)
        elif isinstance(v, (set, frozenset)):
            out.append(t)
            try:
                out.append(frozenset(v))  # hashable members: order-free
            except TypeError:
                for item in v:
                    self.walk(item, d)
        elif isinstance(v, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            owner = getattr(v, "__self__", None)
            out.append(v if owner is None or isinstance(owner, types.ModuleType) else ("bound", v.__name__))
            if owner is not None and not isinstance(owner, types.ModuleType):
                self.walk(owner, d)  # ops.append: the list
        elif isinstance(v, slice):  # (unhashable before Python 3.12)
            out.append(slice)
            for part in (v.start, v.stop, v.step):
                self.walk(part, d)
        elif isinstance(v, type):
            out.append(v)
        elif isinstance(v, types.ModuleType):
            self._python_module(v, d)
        elif isinstance(v, types.CodeType):
            out.append(v)
            self.read(_names_of(v))
        elif isinstance(v, np.ndarray):
            if v.dtype.kind in "iub" and v.nbytes <= 1 << 16:
                out.append(("A", v.shape, v.dtype.str, v.tobytes()))
            else:
                out.append(("A", v.shape, v.dtype.str, _Same(v)))
        elif isinstance(v, Source):
            out.append(("S", tuple(v.shape), v.dtype, _Same(v)))
        elif hasattr(v, "__dict__") and not isinstance(v, (types.GeneratorType, types.CoroutineType)):
            self._object(v, d)
        else:  # a C object with no attributes to read: its identity
            out.append(("X", t, _hashable(v)))

    def _module(self, m: nn.Module, d: int) -> None:
        self.modules.append(m)
        out, state, md = self.out, self.state, m.__dict__
        cls = type(m)
        out.append(cls)
        out.append(md["training"])
        self.read(_names_of_class(cls))
        if md["_forward_hooks"] or md["_forward_pre_hooks"] or md["_backward_hooks"] or md.get("_backward_pre_hooks"):
            for name in _MODULE_HOOKS:
                out.append(name)
                self.walk(list(md.get(name, {}).values()), d)
        for table in (md["_parameters"], md["_buffers"]):
            out.append(len(table))
            for name, t in table.items():
                out.append(name)
                if t is None:
                    out.append(None)
                    continue
                out.append((t.shape, t.dtype, t.device, t.requires_grad))
                try:
                    state.append((id(t), t._version))
                except RuntimeError:  # an inference tensor: no version counter
                    state.append((id(t), 0))
        self._attributes(md, d, _MODULE_INTERNAL)
        subs = md["_modules"]
        out.append(len(subs))
        for name, sub in subs.items():
            out.append(name)
            self.walk(sub, d)

    def _attributes(self, attrs: dict, d: int, skip=frozenset()) -> None:
        """The attributes (a module's or object's __dict__) that some code reached reads."""
        self.filtered = True
        out = self.out
        out.append("attrs")
        read = attrs.keys() & self.names
        if skip:
            read -= skip
        for name in sorted(read) if len(read) > 1 else read:
            out.append(name)
            v = attrs[name]
            t = type(v)
            if t in _SIMPLE:
                out.append(t)
                out.append(v)
            else:
                self.walk(v, d)
        out.append("/attrs")

    def _function(self, f: types.FunctionType, d: int) -> None:
        out = self.out
        code = f.__code__
        out.append(code)
        names = _names_of(code)
        self.read(names)
        if f.__defaults__:
            self.walk(f.__defaults__, d)
        if f.__kwdefaults__:
            self.walk(f.__kwdefaults__, d)
        for cell in f.__closure__ or ():
            try:
                self.walk(cell.cell_contents, d)
            except ValueError:  # an empty cell
                out.append("empty cell")
        if _is_library_file(code.co_filename):
            return  # torch's own functions: their module globals are constant
        g = f.__globals__
        for name in sorted(names):
            if name in g:
                out.append(name)
                self.walk(g[name], d)

    def _python_module(self, mod: types.ModuleType, d: int) -> None:
        """A module named by fn's code: its name; for the user's own modules (a config module), the
        attributes that code reached names (``config.MIX``)."""
        out = self.out
        out.append(("module", mod.__name__))
        if _is_library_file(getattr(mod, "__file__", None)):
            return
        for name in sorted(self.names & mod.__dict__.keys()):
            v = mod.__dict__[name]
            if not isinstance(v, types.ModuleType):
                out.append(name)
                self.walk(v, d)

    def _object(self, obj, d: int) -> None:
        cls = type(obj)
        self.out.append(cls)
        self.read(_names_of_class(cls))
        self._attributes(vars(obj), d)


def _hashable(v):
    try:
        hash(v)
        return v
    except TypeError:
        return _Same(v)


class _Same:
    """A key part equal only for the same live object: an id alone can be reused by a new object once
    the old one is freed (the next batch's labels at the address of the last batch's)."""

    __slots__ = ("ref", "ident")

    def __init__(self, obj):
        self.ident = id(obj)
        try:
            self.ref = weakref.ref(obj)
        except TypeError:  # not weakly referenceable: held, for as long as the key lives
            self.ref = lambda obj=obj: obj

    def __hash__(self) -> int:
        return self.ident

    def __eq__(self, other) -> bool:
        return isinstance(other, _Same) and self.ref() is not None and self.ref() is other.ref()


_names_by_fn: OrderedDict = OrderedDict()  # identity -> the names a walk of that fn found (saves a second walk)
_warned: set = set()


def guard(spec) -> tuple | None:
    """The key part that says "fn and its inputs behave as they did" (see the NOTE); None when fn
    reaches more than the walk may visit (never reused)."""
    return watch(spec)[0]


def state_key(spec) -> tuple:
    """What a verdict may depend on beyond the guard: the identity and in-place version of every
    tensor fn reaches (module parameters and buffers, tensors it holds) and of the inputs. An
    optimizer step, new inputs or an in-place edit change it; repeated calls on the same state do not
    (see the NOTE: the recheck schedule)."""
    return watch(spec)[1]


class Watch(NamedTuple):
    """What one walk of fn and its inputs found: the guard (None: fn cannot be guarded), the state
    (tensor identities and versions) and every module fn reaches."""

    key: tuple | None
    state: tuple
    modules: list


def watch(spec) -> Watch:
    """The guard, the state and the modules, from one walk: the hot path of a training loop walks once."""
    ident = identity(spec.fn)
    names = _names_by_fn.get(ident, frozenset())
    try:
        for _ in range(3):  # names found late (an attribute read by a function walked later): again
            w = _Walk(names)
            w.walk(spec.fn)
            w.out.append(spec.in_dims)
            for a in spec.args:
                w.walk(a)
            if not w.grew:
                break
            names = w.names
    except _TooMuch:
        if ident not in _warned:
            _warned.add(ident)
            warn(
                f"chunkjac: fn reaches more than {WALK_ITEMS:,} objects, more than chunkjac walks to tell whether "
                "its behaviour changed between calls, so every call decides its coupling and plan anew. Pass "
                "plan=chunkjac.plan(...) to reuse a plan, or make fn a smaller function of the model.",
                RuntimeWarning)
        return Watch(None, (), reached_modules(spec.fn))
    if w.names is not names:  # found new names: the next walk starts with them
        _names_by_fn[ident] = frozenset(w.names)
        while len(_names_by_fn) > 256:
            _names_by_fn.popitem(last=False)
    hooks = (_module._global_forward_hooks, _module._global_forward_pre_hooks, _module._global_backward_hooks,
             _module._global_backward_pre_hooks)
    w.out.append(tuple(tuple(d) for d in hooks) if any(hooks) else ())
    w.out.append((torch.is_autocast_enabled(), torch.are_deterministic_algorithms_enabled(), torch.get_default_dtype()))
    return Watch(tuple(w.out), tuple(w.state), w.modules)


def argument_key(v) -> tuple:
    """A coupling argument (a string, group ids, edges, a sparse adjacency, neighbour lists) by
    content: a structure edited in place, or a new one at a freed one's address, decides again."""
    if isinstance(v, str):
        return (v,)
    if isinstance(v, torch.Tensor) and v.layout != torch.strided:
        v = v.coalesce().indices() if v.layout == torch.sparse_coo else v.to_sparse_coo().coalesce().indices()
    if isinstance(v, (torch.Tensor, np.ndarray)):
        a = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
        return (type(v).__name__, a.shape, str(a.dtype), hash(np.ascontiguousarray(a).tobytes()))
    if isinstance(v, (list, tuple)):  # neighbour lists
        return ("lists", tuple(tuple(int(j) for j in row) if isinstance(row, (list, tuple))
                               else int(row) if isinstance(row, int) else argument_key(row) for row in v))
    return (type(v).__name__, id(v))


def owner(fn):
    """What identifies fn across calls: a bound method's object (``m.forward`` is new at each access)."""
    return fn.__self__ if inspect.ismethod(fn) else fn


def anchors(fn) -> list:
    """The objects whose identities are fn's identity for the cache.

    A module, a bound method's object, any other callable: itself. A plain function is often made
    anew at each call (``compute(lambda x, C: routine(C, x), ...)`` inside a loop) with the same
    behaviour: its code object, the contents of its closure cells and defaults (positional and
    keyword-only), and the globals its code names, so that a lambda written at one place in the
    user's code hits the cache again, while another closure value, or a global rebound, does not.
    """
    if not isinstance(fn, types.FunctionType):
        return [owner(fn)]
    found = [fn.__code__]
    for cell in fn.__closure__ or ():
        try:
            found.append(cell.cell_contents)
        except ValueError:  # an empty cell
            found.append(None)
    found += list(fn.__defaults__ or ())
    found += list((fn.__kwdefaults__ or {}).values())
    g = fn.__globals__
    found += [g[name] for name in fn.__code__.co_names if name in g]
    return found


def identity(fn) -> tuple:
    if inspect.ismethod(fn):
        return (id(fn.__self__), fn.__func__.__qualname__)
    return tuple(id(a) for a in anchors(fn))


def _ref(obj):
    try:
        return weakref.ref(obj)
    except TypeError:  # builtins (torch.sin), ints, tuples: held (small, or alive anyway)
        return lambda obj=obj: obj


class ProbeCache:
    """Remembered decisions and probe results, keyed as [What a remembered decision is keyed on] says.

    Entries hold fn weakly (a bound method by its object, a plain function by its code and what it
    closes over: see ``anchors``): an entry whose fn is gone never matches again and leaves with the
    least recently used. At most ``size`` entries. ``chunkjac.probe_cache`` is the instance the calls
    use: ``.clear()`` empties it; ``.enabled = False`` decides everything at every call.
    """

    def __init__(self, size: int = 128, recheck_every: int = 100):
        self.size = size
        self.recheck_every = recheck_every  # see the NOTE: values are checked again on this schedule
        self.enabled = True
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0

    @staticmethod
    def key(spec, *extra) -> tuple | None:
        """What a probe's results depend on: fn and its inputs (``guard``), the targets, the output
        and the call's options in ``extra``; None when fn cannot be guarded (never reused)."""
        g = guard(spec)
        if g is None:
            return None
        targets = tuple((t.kind, t.index, t.name) for t in spec.targets)
        return (identity(spec.fn), g, targets, repr(spec.output), spec.create_graph, *extra)

    def get(self, key, fn, compute, every: int | None = None, state=None):
        """The cached value for ``key`` (whose first item is fn's identity), computed on a miss; key
        None (fn cannot be guarded) or a disabled cache: computed, not kept.

        With ``every``, the value is computed again after 1, 2, 4, ... uses with another ``state``
        than the last (uses in the same state cannot change the answer and are not counted), the gap
        doubling up to ``every`` and staying there (None or 0: never)."""
        if key is None or not self.enabled or self.size <= 0:
            return compute()
        found = anchors(fn)
        gap = 1
        with self._lock:  # threads may share the cache; compute() runs outside the lock
            try:
                entry = self._entries.get(key)
            except TypeError:  # an object in the key that claims equality by value but cannot be hashed
                return compute()
            # The same objects, not new ones at reused ids.
            if entry is not None and len(entry[0]) == len(found) and all(r() is a for r, a in zip(entry[0], found)):
                if every and state != entry[4]:
                    entry[2] += 1
                    entry[4] = state
                if not every or entry[2] < entry[3]:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry[1]
                gap = min(2 * entry[3], every)
        value = compute()
        with self._lock:
            self._entries[key] = [[_ref(a) for a in found], value, 0, min(gap, every or 1), state]
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return value

    def update(self, key, change) -> None:
        """Replace the value of ``key``'s entry by ``change(value)`` (a decision refined by its run);
        nothing where there is none."""
        if key is None:
            return
        with self._lock:
            try:
                entry = self._entries.get(key)
            except TypeError:
                return
            if entry is not None:
                entry[1] = change(entry[1])

    def forget(self, key) -> None:
        """Drop one entry (a decision found stale when used)."""
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = 0
