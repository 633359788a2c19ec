"""Taylor mode: second derivatives of any fn in one forward pass that carries them.

# NOTE: [Second-order propagation]
# Every tensor u computed from x is carried as a jet (v, d): its value v and a stack d of shape
# (D + s, *v.shape) holding D first-order directions J_k = du/dx . e_k and s second-order terms:
#   part="laplacian": s = 1,     S = sum_k e_k' H_u e_k      (collapsed: the forward Laplacian)
#   part="diagonal":  s = D,     S_k = e_k' H_u e_k
#   part="full":      s = D * D, S_kl = e_k' H_u e_l
# An op z = g(u) maps jets by the chain rule to second order:
#   J_z = g'(v) J_u        S_z = g'(v) S_u + pair(J_u, J_u) through g''(v)
# where pair projects J_k J_l onto the s terms (a sum over k, its diagonal, or all of it). So the
# pass costs about D + s + 1 forwards of the ops' linear parts (one stacked matmul per linear
# layer: D + 2 products for a Laplacian, against the D + 2D + ... of nested first derivatives), and
# never holds a backward graph unless create_graph asks for one.
#
# The jets ride on a Tensor subclass whose __torch_function__ sees every torch call fn makes, at the
# level fn makes it (F.linear, torch.tanh, x[..., :1]), above autograd: the rules below are ordinary
# torch ops on plain tensors, so create_graph=True differentiates them like any other code. Rules:
# elementwise functions by (g', g''), linear and view ops by applying the op to the stack (vmap over
# its leading dim), bilinear ops (mul, matmul) by the product rule. Every other op gets the exact
# generic rule: nested torch.func.jvp of that op alone, vmapped over the directions. What cannot be
# followed (an in-place write of a jet into a plain tensor or into an aliased jet, autograd called
# inside fn, a result hidden in an object) raises TaylorRefused, and the caller computes those
# derivatives another way (reverse over reverse; see _strategies/double_backward.py).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import jvp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import _taylor4
from ._function import load_forward_decompositions
from ._taylor4 import Layout4

PARTS = ("full", "diagonal", "laplacian")


class TaylorRefused(Exception):
    """fn does something Taylor mode cannot follow exactly; the message says what."""


_PASS: contextvars.ContextVar = contextvars.ContextVar("chunkjac_taylor_pass", default=None)


@contextlib.contextmanager
def taylor_pass():
    """The scope of one Taylor pass. Jets made in it belong to it; outside it (a jet fn kept in a hook
    list or on a module, and used later), a jet is its plain value, as a tensor fn saw would be."""
    token = _PASS.set(object())
    try:
        yield
    finally:
        _PASS.reset(token)


@dataclass(frozen=True)
class Layout:
    """How a jet's stack is laid out: D first-order directions, then s second-order terms.

    part "laplacian": one term, sum_k D^2[v_k, v_k]; "diagonal": D^2[v_k, v_k] each; "full": every
    D^2[v_k, v_l]; "first": none; "pairs": terms t = sum_p coef_p D^2[v_k(p), v_l(p)] over ``pairs``
    ((k, l, t, coef), ...), the terms of an operator (see _operators)."""

    dims: int
    part: str
    pairs: tuple = ()
    nterms: int = 0

    @property
    def terms(self) -> int:
        return {"laplacian": 1, "diagonal": self.dims, "full": self.dims * self.dims, "first": 0,
                "pairs": self.nterms}[self.part]

    @property
    def size(self) -> int:
        return self.dims + self.terms

    @functools.cached_property
    def _index(self) -> tuple:
        """(k, l, term) index tensors and coefficients of the pairs, on the CPU, and whether all are k == l."""
        k, l, t, c = (zip(*self.pairs) if self.pairs else ((), (), (), ()))
        return (torch.tensor(k, dtype=torch.long), torch.tensor(l, dtype=torch.long), torch.tensor(t, dtype=torch.long),
                torch.tensor(c, dtype=torch.float64), all(a == b for a, b in zip(k, l)))

    @functools.cached_property
    def simple(self):
        """For pairs that are one direction's square each, coefficient 1, term t the t-th pair (u_xx,
        u_yy of a heat residual): their directions, a slice where consecutive; else None."""
        if self.part != "pairs":
            return None
        k, l, t, c, square = self._index
        if not (square and len(k) == self.nterms and torch.equal(t, torch.arange(self.nterms))
                and bool((c == 1).all())):
            return None
        ks = k.tolist()
        return slice(ks[0], ks[0] + len(ks)) if ks == list(range(ks[0], ks[0] + len(ks))) else k

    @property
    def squares(self):
        """(directions, summed) where every second-order term is a square of directions (see
        _FusedSquares), else None."""
        if self.part == "laplacian":
            return slice(0, self.dims), True
        if self.simple is not None:
            return self.simple, False
        return None

    def _on(self, like: torch.Tensor) -> tuple:
        cache = self.__dict__.setdefault("_placed", {})
        key = (like.device, like.dtype)
        if key not in cache:
            k, l, t, c, square = self._index
            cache[key] = (k.to(like.device), l.to(like.device), t.to(like.device), c.to(like.device, like.dtype), square)
        return cache[key]

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """(P, *shape) per-pair values -> (T, *shape) terms, each pair times its coefficient."""
        _, _, t, c, _ = self._on(x)
        x = x * c.reshape(-1, *([1] * (x.dim() - 1)))
        return torch.zeros((self.nterms, *x.shape[1:]), dtype=x.dtype, device=x.device).index_add(0, t, x)

    def pair(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The second-order terms of the symmetric product of two first-order stacks (D, *shape)."""
        if self.part == "laplacian":
            return torch.linalg.vecdot(a, b, dim=0).unsqueeze(0)
        if self.part == "diagonal":
            return a * b
        if self.part == "first":
            return a.new_zeros((0, *torch.broadcast_shapes(a.shape[1:], b.shape[1:])))
        if self.part == "pairs":
            if self.simple is not None:
                return a[self.simple] * b[self.simple]
            k, l, _, _, square = self._on(a)
            x = a[k] * b[l]
            if not square:
                x = (x + a[l] * b[k]) / 2
            return self._gather(x)
        x = a.unsqueeze(1) * b.unsqueeze(0)
        if a is not b:
            x = (x + x.transpose(0, 1)) / 2
        return x.reshape(self.dims * self.dims, *x.shape[2:])

    def bilinear(self, f, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The second-order terms of a bilinear op f (vmapped over stacks by the caller's ``f``) of two
        first-order stacks: sym B(a_k, b_l) per pair, collapsed (not "full", which pairs all)."""
        if self.part == "first":
            return None
        if self.part == "pairs":
            if self.simple is not None:
                return f(a[self.simple], b[self.simple])
            k, l, _, _, square = self._on(a)
            x = f(a[k], b[l])
            if not square:
                x = (x + f(a[l], b[k])) / 2
            return self._gather(x)
        return self.collapse(f(a, b))

    def collapse(self, quad: torch.Tensor) -> torch.Tensor:
        """Second-order terms from per-pair values (one per direction pair the generic rule ran)."""
        if self.part == "laplacian":
            return quad.sum(0, keepdim=True)
        if self.part == "pairs" and self.simple is None:
            return self._gather(quad)
        return quad

    def generic_pairs(self) -> tuple | None:
        """The (first, second) direction indices the generic rule differentiates along, or None where
        they are the directions themselves (k, k)."""
        if self.part == "full":
            return torch.arange(self.dims).repeat_interleave(self.dims), torch.arange(self.dims).repeat(self.dims)
        if self.part == "pairs":
            k, l, _, _, _ = self._index
            return k, l
        return None


class Jet(torch.Tensor):
    """A tensor that carries its derivatives (see [Second-order propagation]). Its own data is the
    value's (shape, dtype and device queries answer as for the value); every op goes to the rules."""

    _v: torch.Tensor
    _d: torch.Tensor
    _lay: Layout
    _root: Any    # a weak reference to the jet whose memory this one views, or None
    _views: list  # weak references to the jets that view this one's memory (this one being their root)
    _pass: Any    # the Taylor pass that made it (see taylor_pass)

    @staticmethod
    def of(v: torch.Tensor, d: torch.Tensor, lay: Layout) -> "Jet":
        j = v.as_subclass(Jet)
        j._v, j._d, j._lay, j._root, j._views, j._pass = v, d, lay, None, [], _PASS.get()
        return j

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        current = _PASS.get()
        if current is None or _stale(args, kwargs, current):
            # Outside its pass (a jet kept by a hook, on a module, across calls): its plain value.
            args, kwargs = _values((args, kwargs), current)
            if not any(isinstance(a, Jet) for a in tree_flatten((args, kwargs))[0]):
                with torch._C.DisableTorchFunctionSubclass():
                    return func(*args, **kwargs)
        composite = _COMPOSITES.get(func)
        if func in _META:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*[a._v if isinstance(a, Jet) else a for a in args], **kwargs)
        try:
            if composite is not None:
                return _composite(composite, func, args, kwargs)
            body = _python_body(func) if func not in _RULES else None
            if body is not None and torch.is_grad_enabled():
                return body(*args, **kwargs)  # its ops meet their rules (see _python_body)
            with torch._C.DisableTorchFunctionSubclass():
                return _dispatch(func, args, kwargs)
        except TaylorRefused:
            raise
        except Exception as e:
            if _is_oom(e):
                raise
            # A rule that cannot follow this call (or fn's own error on these values): the caller
            # computes the derivatives another way, where fn's own error shows as itself.
            raise TaylorRefused(f"{_name(func)} failed under Taylor mode: "
                                f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from e


def _values(tree, keep=None):
    """tree with jets replaced by their values (those of pass ``keep`` kept as jets)."""
    flat, spec = tree_flatten(tree)
    return tree_unflatten([a._v if isinstance(a, Jet) and (keep is None or a._pass is not keep) else a
                           for a in flat], spec)


def _stale(args, kwargs, current) -> bool:
    """Whether a jet of another pass is among the arguments (top level and one level of lists)."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, Jet):
            if a._pass is not current:
                return True
        elif isinstance(a, (list, tuple)):
            if any(isinstance(e, Jet) and e._pass is not current for e in a):
                return True
    return False


def _jets(args, kwargs) -> list[Jet]:
    return [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, Jet)]


def _layout(jets: list[Jet]) -> Layout:
    return jets[0]._lay


def _floating(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


_SAFE_LEAVES = (torch.Tensor, int, float, bool, complex, str, type(None), torch.Size, torch.dtype, torch.device,
                torch.layout, torch.memory_format, slice, type(Ellipsis))


def _dispatch(func, args, kwargs):
    if not torch.is_grad_enabled():
        # fn's own torch.no_grad() block, or the forward of a custom autograd.Function (run without
        # grad): reverse mode sees a constant there, or the Function's own backward. Taylor mode
        # cannot tell the two apart, so a float result computed from the input is refused.
        out = func(*_values(args), **_values(kwargs))
        if any(_floating(t) for t in tree_flatten(out)[0]):
            raise TaylorRefused(f"fn calls {_name(func)} on a tensor computed from the input with gradients off "
                                "(torch.no_grad() inside fn, or a custom autograd.Function)")
        return out
    at = _INPLACE_AT.get(func)
    if at is not None and len(args) > at:  # F.relu(x, True): the flag by name, as below
        kwargs = {**kwargs, "inplace": args[at]}
        args = args[:at]
    inplace = _inplace_target(func, args, kwargs)
    if inplace is not None:
        return _inplace(func, args, kwargs, inplace)
    if func in _REFUSED:
        raise TaylorRefused(f"fn calls {_name(func)} on a tensor computed from the input")
    if func in _WRONG_FORWARD_OVER_FORWARD:
        raise TaylorRefused(f"PyTorch's forward-over-forward derivative of {_name(func)} is wrong")
    rule = _RULES.get(func)
    if rule is not None:
        return rule(func, args, kwargs)
    return _generic(func, args, kwargs)


_BODIES: dict = {}
_NO_OVERRIDE = {"has_torch_function": lambda *a: False, "has_torch_function_unary": lambda *a: False,
                "has_torch_function_variadic": lambda *a: False}


def _python_body(func):
    """For a torch.nn.functional function written in Python (multi_head_attention_forward, softmax's
    wrappers, ...): a copy of it whose own override check is off, so that its body runs on the jets
    and each op inside meets its rule (the generic rule on the whole would nest forward mode through
    kernels that may have none). None for anything else."""
    if func in _BODIES:
        return _BODIES[func]
    body = None
    code = getattr(func, "__code__", None)
    if code is not None and getattr(func, "__module__", None) in ("torch.nn.functional", "torch.functional") \
            and any(n in code.co_names for n in _NO_OVERRIDE):
        import types
        body = types.FunctionType(code, {**func.__globals__, **_NO_OVERRIDE}, func.__name__, func.__defaults__,
                                  func.__closure__)
        body.__kwdefaults__ = func.__kwdefaults__
    _BODIES[func] = body
    return body



def _name(func) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


# ---------------------------------------------------------------------------------------------------
# In-place writes

_INPLACE_DUNDERS = {"__iadd__": "__add__", "__isub__": "__sub__", "__imul__": "__mul__",
                    "__itruediv__": "__truediv__", "__idiv__": "__truediv__", "__ipow__": "__pow__",
                    "__imatmul__": "__matmul__", "__ifloordiv__": "__floordiv__", "__imod__": "__mod__",
                    "__iand__": "__and__", "__ior__": "__or__", "__ixor__": "__xor__",
                    "__ilshift__": "__lshift__", "__irshift__": "__rshift__"}


def _inplace_target(func, args, kwargs):
    """The tensor an op writes into (args[0] of x.op_(), x[...] = v, F.op(inplace=True); out=), or None."""
    if "out" in kwargs and kwargs["out"] is not None:
        return kwargs["out"]
    name = getattr(func, "__name__", "")
    if name in _INPLACE_DUNDERS or name == "__setitem__" or kwargs.get("inplace") is True:
        return args[0] if args else None
    if name.endswith("_") and not name.endswith("__") and args and isinstance(args[0], torch.Tensor) \
            and name not in ("requires_grad_", "retain_grad_", "share_memory_", "record_stream_"):
        return args[0]
    return None


def _inplace(func, args, kwargs, target):
    """An in-place write: computed out of place, then the target jet takes the new value and
    derivatives. Only a jet that shares its memory with no other tensor fn holds can be rebound so."""
    name = getattr(func, "__name__", "")
    if not isinstance(target, Jet):
        raise TaylorRefused(f"fn writes a value computed from the input into another tensor in place "
                            f"({_name(func)}); write it out of place (torch.cat, torch.stack, torch.where)")
    if (target._root is not None and target._root() is not None) or any(r() is not None for r in target._views):
        # A write through one of two aliases must show in the other; the jets' stacks are not shared.
        raise TaylorRefused(f"fn writes in place ({_name(func)}) into a tensor computed from the input "
                            "while a view of it (or the tensor it views) is alive")
    if "out" in kwargs and kwargs["out"] is not None:
        raise TaylorRefused(f"fn passes out= to {_name(func)}")
    if name == "__setitem__":
        new = _setitem(target, args[1], args[2])
    elif name in ("copy_",):
        src = args[1]
        new = _dispatch(torch.Tensor.expand_as, (_dispatch(torch.Tensor.to, (src, target._v.dtype), {}), target._v),
                        {}) if isinstance(src, Jet) else src.to(target._v.dtype).expand_as(target._v).clone()
    elif name in ("zero_", "fill_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_"):
        v = target._v.clone()
        getattr(v, name)(*_values(args[1:]), **_values(kwargs))
        new = v
    elif kwargs.get("inplace") is True:
        new = _dispatch(func, args, {**kwargs, "inplace": False})
    else:
        plain = _INPLACE_DUNDERS.get(name) or name[:-1]
        out_of_place = getattr(torch.Tensor, plain, None)
        if out_of_place is None:
            raise TaylorRefused(f"fn calls the in-place {_name(func)}, which has no out-of-place form")
        new = _dispatch(out_of_place, args, kwargs)
    if isinstance(new, Jet):
        v, d = new._v, new._d
        if v.shape != target._v.shape:
            v = v.expand_as(target._v)
            d = d.expand(d.shape[0], *target._v.shape)
        d = d.to(target._v.dtype)
    else:
        # A constant now (zero_(), fill_(), a write of constants over all of it): no derivatives.
        v = new.expand_as(target._v)
        d = torch.zeros((target._lay.size, *target._v.shape), dtype=target._v.dtype, device=target._v.device)
    # The value is written where it was, as fn's write would be: plain tensors sharing its memory
    # (a .detach() taken before) see it. (A write autograd refuses is a TaylorRefused, see Jet.)
    target._v.copy_(v)
    target._d = d
    return target


def _setitem(target: Jet, index, value):
    v = target._v.clone()
    v[_values(index)] = value._v if isinstance(value, Jet) else value
    d = target._d.clone()
    idx = _values(index)
    idx = (slice(None), *(idx if isinstance(idx, tuple) else (idx,)))
    if isinstance(value, Jet):
        dv = value._d
        # The written value broadcasts into the indexed region as its stack does behind the leading dim.
        d[idx] = dv.reshape(dv.shape[0], *([1] * max(0, d[idx].dim() - dv.dim())), *dv.shape[1:])
    else:
        d[idx] = 0
    return Jet.of(v, d, target._lay)


# ---------------------------------------------------------------------------------------------------
# Rules

def _wrap_like(out, make):
    """out's structure with every float tensor leaf replaced by make(index, leaf)."""
    flat, spec = tree_flatten(out)
    k = 0
    res = []
    for leaf in flat:
        if _floating(leaf):
            res.append(make(k, leaf))
            k += 1
        else:
            res.append(leaf)
    return tree_unflatten(res, spec)


def _check_leaves(func, out) -> None:
    for leaf in tree_flatten(out)[0]:
        if not isinstance(leaf, _SAFE_LEAVES):
            raise TaylorRefused(f"{_name(func)} returned a {type(leaf).__name__}, which Taylor mode cannot see into")


def _lead(d: torch.Tensor, rank: int) -> torch.Tensor:
    """A stack (C, *shape) with ones inserted after C so that it broadcasts against rank-``rank`` tensors."""
    missing = rank - (d.dim() - 1)
    return d.reshape(d.shape[0], *([1] * missing), *d.shape[1:]) if missing > 0 else d


def _alias_of(out_v: torch.Tensor, jets: list[Jet]) -> bool:
    try:
        p = out_v.untyped_storage().data_ptr()
        return any(j._v.untyped_storage().data_ptr() == p for j in jets)
    except (RuntimeError, NotImplementedError):
        return True


def _mark(out, jets: list[Jet]):
    """Results that share memory with an input jet (views) are linked to the jet whose memory it is
    (the root of views of views): while a view lives, neither it nor its root may be written in
    place (see _inplace), since their stacks are not shared."""
    for j in tree_flatten(out)[0]:
        if isinstance(j, Jet) and _alias_of(j._v, jets):
            base = next(i for i in jets if _alias_of(j._v, [i]))
            root = base._root() if base._root is not None and base._root() is not None else base
            j._root = weakref.ref(root)
            root._views.append(weakref.ref(j))
    return out


def _same(out_v, jets):
    for j in jets:
        if out_v is j._v:
            return j
    return None


class _FusedSquares(torch.autograd.Function):
    """(y, out) = (g(v), [g1 J; g1 S + g2 q]) for an elementwise g with derivatives g1, g2, g3, where the
    second-order terms are squares of directions: q = sum_k J_k^2 over the directions ``sel`` (a
    Laplacian, ``summed``) or q_t = J_sel[t]^2 (u_xx and u_yy of a heat residual), recorded as one node.
    Backward, for output gradients Gy, GJ, GS:
        dJ_k = g1 GJ_k + 2 g2 J_k GS_t(k),   dS = g1 GS,
        dv   = Gy g1 + (sum_k GJ_k J_k + sum_t GS_t S_t) g2 + sum_t GS_t q_t g3.
    Written with torch ops, so it can be differentiated again."""

    @staticmethod
    def forward(ctx, v, y, d, g1, g2, third, sel, summed):
        ds = d[sel]
        q = torch.linalg.vecdot(ds, ds, dim=0).unsqueeze(0) if summed else ds * ds
        k = d.shape[0] - q.shape[0]
        out = d * g1
        out[k:].addcmul_(g2, q)
        ctx.save_for_backward(v, y, d, g1, g2)
        ctx.third, ctx.sel, ctx.summed = third, sel, summed
        return y, out

    @staticmethod
    def backward(ctx, gy, gout):
        v, y, d, g1, g2 = ctx.saved_tensors
        ds = d[ctx.sel]  # again here, on the graph: a gradient penalty differentiates it
        q = torch.linalg.vecdot(ds, ds, dim=0).unsqueeze(0) if ctx.summed else ds * ds
        k = d.shape[0] - q.shape[0]
        gs = gout[k:]
        gd = gout * g1
        gd[ctx.sel] += ds * (2 * g2 * gs)
        gv = torch.linalg.vecdot(gout, d, dim=0) * g2
        gv = gv.addcmul_((gs * q).sum(0), ctx.third(v, y, g1, g2))
        if gy is not None:
            gv = gv.addcmul_(gy, g1)
        return gv, None, gd, None, None, None, None, None


_THIRD = {  # the third derivative from (v, y, g1, g2), for the fused training path
    "tanh": lambda v, y, g1, g2: -2 * (g1 * g1 + y * g2),
    "sin": lambda v, y, g1, g2: -g1,
    "cos": lambda v, y, g1, g2: -g1,
    "exp": lambda v, y, g1, g2: y,
    "sigmoid": lambda v, y, g1, g2: g2 * (1 - 2 * y) - 2 * g1 * g1,
}


def _unary(derivs: Callable, name: str = ""):
    """An elementwise function of its first argument: derivs(v, y) -> (g', g'') (g'' may be None: zero)."""

    def rule(func, args, kwargs):
        x = args[0]
        if not isinstance(x, Jet) or len(_jets(args[1:], kwargs)):
            return _generic(func, args, kwargs)
        v, d, lay = x._v, x._d, x._lay
        if isinstance(lay, Layout4):
            return _taylor4.unary(func, name, x, _values(args[1:]), _values(kwargs), Jet.of,
                                  lambda y: _generic(func, args, kwargs, y))
        y = func(v, *_values(args[1:]), **_values(kwargs))
        if not _floating(y) or y.shape != v.shape:
            return _generic(func, args, kwargs, y)
        g1, g2 = derivs(v, y, args[1:], kwargs)
        k = lay.dims
        record = torch.is_grad_enabled() and (d.requires_grad or y.requires_grad)  # for a backward pass
        if g2 is None or lay.part == "first":
            out = d * g1
        elif record and name in _THIRD and lay.squares is not None and d.dtype == y.dtype:
            # A training step's hot path: one node with its backward written out, instead of the
            # elementwise passes autograd would record for the rule below (whose slices cost the
            # backward a zero-filled gradient each: measured, half of a heat-equation step).
            y, out = _FusedSquares.apply(v, y, d, g1, g2, _THIRD[name], *lay.squares)
            return Jet.of(y, out, lay)
        elif record:
            # Recorded for a backward pass (create_graph): a write into a slice would cost the backward
            # a zero-filled gradient per slice (measured: a quarter of a PINN training step); cat's
            # backward is views.
            out = torch.cat([d[:k] * g1, torch.addcmul(d[k:] * g1, g2, lay.pair(d[:k], d[:k]))])
        else:
            out = d * g1
            out[k:].addcmul_(g2, lay.pair(d[:k], d[:k]))
        return Jet.of(y, out.to(y.dtype), lay)

    return rule


def _sig(v):
    return torch.sigmoid(v)


def _softplus(v, y, rest, kw):
    beta = kw.get("beta", rest[0] if len(rest) > 0 else 1.0)
    threshold = kw.get("threshold", rest[1] if len(rest) > 1 else 20.0)
    s = torch.sigmoid(v * beta)
    linear = v * beta > threshold
    return torch.where(linear, 1.0, s), torch.where(linear, 0.0, beta * s * (1 - s))


def _silu(v, y, rest, kw):
    s = torch.sigmoid(v)
    return s * (1 + v * (1 - s)), s * (1 - s) * (2 + v * (1 - 2 * s))


def _gelu(v, y, rest, kw):
    if kw.get("approximate", rest[0] if rest else "none") != "none":
        raise _UseGeneric
    phi = torch.exp(-0.5 * v * v) * (1 / math.sqrt(2 * math.pi))
    cdf = 0.5 * (1 + torch.erf(v * (1 / math.sqrt(2))))
    return cdf + v * phi, phi * (2 - v * v)


def _leaky(v, y, rest, kw):
    slope = kw.get("negative_slope", rest[0] if rest else 0.01)
    return torch.where(v > 0, 1.0, slope).to(v.dtype), None


def _pow_scalar(v, y, rest, kw):
    p = kw.get("exponent", rest[0] if rest else None)
    if isinstance(p, torch.Tensor) or not isinstance(p, (int, float)) or isinstance(p, bool):
        raise _UseGeneric
    if p == 0:
        return torch.zeros_like(v), None
    g1 = p * v.pow(p - 1) if p != 1 else torch.ones_like(v)
    g2 = p * (p - 1) * v.pow(p - 2) if p not in (1, 2) else (None if p == 1 else torch.full_like(v, 2.0))
    return g1, g2


def _clamp(v, y, rest, kw):
    lo = kw.get("min", rest[0] if len(rest) > 0 else None)
    hi = kw.get("max", rest[1] if len(rest) > 1 else None)
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        raise _UseGeneric
    keep = torch.ones_like(v, dtype=torch.bool)
    if lo is not None:
        keep &= v >= lo
    if hi is not None:
        keep &= v <= hi
    return keep.to(v.dtype), None


class _UseGeneric(Exception):
    pass


_ELEMENTWISE: dict[str, Callable] = {
    "tanh": lambda v, y, r, k: (1 - y * y, -2 * y * (1 - y * y)),
    "sin": lambda v, y, r, k: (torch.cos(v), -y),
    "cos": lambda v, y, r, k: (-torch.sin(v), -y),
    "exp": lambda v, y, r, k: (y, y),
    "log": lambda v, y, r, k: (1 / v, -1 / (v * v)),
    "sigmoid": lambda v, y, r, k: (y * (1 - y), y * (1 - y) * (1 - 2 * y)),
    "softplus": _softplus,
    "silu": _silu,
    "gelu": _gelu,
    "relu": lambda v, y, r, k: ((y > 0).to(v.dtype), None),
    "leaky_relu": _leaky,
    "pow": _pow_scalar,
    "__pow__": _pow_scalar,
    "square": lambda v, y, r, k: (2 * v, torch.full_like(v, 2.0)),
    "sqrt": lambda v, y, r, k: (0.5 / y, -0.25 / (y * y * y)),
    "rsqrt": lambda v, y, r, k: (-0.5 * y * y * y, 0.75 * y ** 5),
    "reciprocal": lambda v, y, r, k: (-y * y, 2 * y * y * y),
    "abs": lambda v, y, r, k: (torch.sign(v), None),
    "erf": lambda v, y, r, k: ((2 / math.sqrt(math.pi)) * torch.exp(-v * v),
                               (-4 / math.sqrt(math.pi)) * v * torch.exp(-v * v)),
    "atan": lambda v, y, r, k: (1 / (1 + v * v), -2 * v / (1 + v * v) ** 2),
    "sinh": lambda v, y, r, k: (torch.cosh(v), y),
    "cosh": lambda v, y, r, k: (torch.sinh(v), y),
    "tan": lambda v, y, r, k: (1 + y * y, 2 * y * (1 + y * y)),
    "log1p": lambda v, y, r, k: (1 / (1 + v), -1 / ((1 + v) * (1 + v))),
    "expm1": lambda v, y, r, k: (y + 1, y + 1),
    "clamp": _clamp,
    "clip": _clamp,
}


def _unary_rule(name):
    inner = _unary(_ELEMENTWISE[name], name)

    def rule(func, args, kwargs):
        try:
            return inner(func, args, kwargs)
        except _UseGeneric:
            return _generic(func, args, kwargs)

    return rule


def _linear_layer(func, args, kwargs):
    """F.linear(x, W, b) with only x a jet: the stack goes through W in one matmul, the bias to the value."""
    x = args[0]
    w = kwargs.get("weight", args[1] if len(args) > 1 else None)
    b = kwargs.get("bias", args[2] if len(args) > 2 else None)
    if not isinstance(x, Jet) or isinstance(w, Jet) or isinstance(b, Jet):
        return _generic(func, args, kwargs)
    y = F.linear(x._v, w, b)
    return Jet.of(y, torch.matmul(x._d, w.t()), x._lay)


def _affine(bias_at: int):
    """conv*: linear in the input plus a bias: the stack goes through the op without its bias."""

    def rule(func, args, kwargs):
        x = args[0]
        if not isinstance(x, Jet) or _jets(args[1:], kwargs):
            return _generic(func, args, kwargs)
        rest, kw = list(_values(args[1:])), dict(_values(kwargs))
        y = func(x._v, *rest, **kw)
        if len(rest) >= bias_at:
            rest[bias_at - 1] = None
        kw.pop("bias", None)
        d = _over_stack(lambda c: func(c, *rest, **kw), x._d)
        return Jet.of(y, d, x._lay)

    return rule


def _over_stack(f, *stacks, in_dims=0):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        return vmap(f, in_dims=in_dims)(*stacks)


def _linear(summands):
    """An op linear in its jet arguments: the value through the op, the stack through the op too.
    ``summands``: which positional arguments are summands (add's two, where's last two, the list
    given to cat): plain ones among them contribute zero derivatives (a constant's, a number's).
    None: only the first argument may carry a jet; the others are coefficients or structure."""

    def rule(func, args, kwargs):
        jets = _jets(args, kwargs)
        if not summands and (not isinstance(args[0] if args else None, Jet) or len(jets) > 1):
            return _generic(func, args, kwargs)
        out = func(*_values(args), **_values(kwargs))
        _check_leaves(func, out)
        if not any(_floating(t) for t in tree_flatten(out)[0]):
            return out
        same = _same(out, jets) if isinstance(out, torch.Tensor) else None
        if same is not None:
            return same
        lay = _layout(jets)
        flat, spec = tree_flatten((args, kwargs))
        pos = [i for i, a in enumerate(flat) if isinstance(a, Jet)]
        zero_at = _summand_leaves(args, kwargs, summands, flat) if summands else set()
        base = [a._v if isinstance(a, Jet) else (_zero(a) if i in zero_at else a) for i, a in enumerate(flat)]

        def on_stack(*cs):
            f2 = list(base)
            for i, c in zip(pos, cs):
                f2[i] = c
            a, k = tree_unflatten(f2, spec)
            return func(*a, **k)

        d = _reshape_fast(func, args, out, jets) if not summands else None
        if d is None:
            d = _over_stack(on_stack, *[flat[i]._d for i in pos])
        flat_d = [t for t in tree_flatten(d)[0] if isinstance(t, torch.Tensor)] if not isinstance(d, torch.Tensor) else [d]
        res = _wrap_like(out, lambda k, leaf: Jet.of(leaf, flat_d[k].to(leaf.dtype), lay))
        return _mark(res, jets)

    return rule


def _zero(a):
    """A summand's derivative: zero, whatever its type (an int or bool tensor, True, 3.0)."""
    if isinstance(a, torch.Tensor):
        return torch.zeros_like(a)
    return 0 if isinstance(a, (int, float, complex, bool)) else a


def _summand_leaves(args, kwargs, which, flat) -> set:
    """Indices into the flattened (args, kwargs) of the summands."""
    tags = []
    for i, a in enumerate(args):
        tags.append(i in which)
    tagged = ([(_Tag(a) if t and not isinstance(a, (list, tuple)) else
                ([_Tag(e) for e in a] if t else a)) for a, t in zip(args, tags)],
              {k: (_Tag(v) if k in ("other", "input") else [_Tag(e) for e in v] if k == "tensors" else v)
               for k, v in kwargs.items()})
    leaves = tree_flatten(tagged)[0]
    return {i for i, leaf in enumerate(leaves) if isinstance(leaf, _Tag)}


class _Tag:
    __slots__ = ("a",)

    def __init__(self, a):
        self.a = a


_RESHAPES = {"reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "ravel"}


def _reshape_fast(func, args, out, jets):
    """Reshape-like ops keep the element order: the stack is reshaped to (C, *out.shape) directly."""
    if getattr(func, "__name__", "") in _RESHAPES and isinstance(out, torch.Tensor) and isinstance(args[0], Jet):
        if len(jets) == 1:
            d = args[0]._d
            return d.reshape(d.shape[0], *out.shape)
    return None


def _mul(func, args, kwargs):
    a, b = args[0], args[1]
    if kwargs or not (isinstance(a, (Jet, torch.Tensor, int, float, bool))
                      and isinstance(b, (Jet, torch.Tensor, int, float, bool))):
        return _generic(func, args, kwargs)
    name = getattr(func, "__name__", "")
    if name == "__rmul__":
        a, b = b, a
    va, vb = _values(a), _values(b)
    y = torch.mul(va, vb)
    if not _floating(y):
        return y
    r = y.dim()
    if isinstance(a, Jet) and isinstance(b, Jet):
        lay = a._lay
        k = lay.dims
        da, db = _lead(a._d, r), _lead(b._d, r)
        if isinstance(lay, Layout4):
            d = _taylor4.product(da, va, db, vb, lay, torch.mul, lambda f, *xs, in_dims=None: f(*xs))
            return Jet.of(y, d.expand(d.shape[0], *y.shape).to(y.dtype), lay)
        d = da * vb + va * db  # (C, *y.shape): both stacks lead with C and broadcast behind it
        if lay.terms:
            d[k:] += 2 * lay.pair(da[:k], db[:k]).expand(lay.terms, *y.shape)
        return Jet.of(y, d, lay)
    j, other = (a, vb) if isinstance(a, Jet) else (b, va)
    d = _lead(j._d, r) * other
    if d.shape[1:] != y.shape:
        d = d.expand(d.shape[0], *y.shape)
    return Jet.of(y, d.to(y.dtype), j._lay)


def _div(func, args, kwargs):
    a, b = args[0], args[1]
    name = getattr(func, "__name__", "")
    if name in ("__rtruediv__", "__rdiv__"):  # (Tensor.__rtruediv__ is named __rdiv__)
        a, b = b, a
    rounding = kwargs.get("rounding_mode", args[2] if len(args) > 2 else None)
    if rounding is not None or len(args) > 3:
        return _generic(func, args, kwargs)
    if not isinstance(b, Jet):
        vb = b._v if isinstance(b, Jet) else b
        return _mul(torch.mul, (a, 1 / vb if not isinstance(vb, torch.Tensor) else vb.reciprocal()), {})
    return _mul(torch.mul, (a, _dispatch(torch.reciprocal, (b,), {})), {})


def _bilinear(func, args, kwargs):
    """matmul-like ops, linear in each of their two tensor arguments (no bias): the product rule."""
    a, b = args[0], args[1]
    name = getattr(func, "__name__", "")
    if name == "__rmatmul__":
        a, b = b, a
        func = torch.matmul
    if len(args) > 2 or kwargs:
        return _generic(func, args, kwargs)
    va, vb = _values(a), _values(b)
    y = func(va, vb)
    if isinstance(a, Jet) and isinstance(b, Jet):
        lay = a._lay
        k = lay.dims
        if isinstance(lay, Layout4):
            return Jet.of(y, _taylor4.product(a._d, va, b._d, vb, lay, func, _over_stack), lay)
        first = _over_stack(func, a._d, vb, in_dims=(0, None)) + _over_stack(func, va, b._d, in_dims=(None, 0))
        if lay.part == "full":
            x = _over_stack(lambda p: _over_stack(lambda q: func(p, q), b._d[:k]), a._d[:k])  # (D, D, *y)
            pair = ((x + x.transpose(0, 1)) / 2).reshape(k * k, *y.shape)
        else:  # from (P, *y): B(Ja_k, Jb_l) per pair
            pair = lay.bilinear(lambda p, q: _over_stack(func, p, q), a._d[:k], b._d[:k])
        if pair is not None:
            first[k:] += 2 * pair
        return Jet.of(y, first, lay)
    if isinstance(a, Jet):
        if vb.dim() == 2 and va.dim() >= 1:
            d = torch.matmul(a._d, vb) if func in _MATMULS else _over_stack(func, a._d, vb, in_dims=(0, None))
        else:
            d = _over_stack(func, a._d, vb, in_dims=(0, None))
        return Jet.of(y, d, a._lay)
    return Jet.of(y, _over_stack(func, va, b._d, in_dims=(None, 0)), b._lay)


def _detach(func, args, kwargs):
    return func(*_values(args), **_values(kwargs))


def _same_object(func, args, kwargs):
    """Ops that return their input (requires_grad_, retain_grad): the jet itself."""
    func(*_values(args), **_values(kwargs))
    return args[0]


# ---------------------------------------------------------------------------------------------------
# The generic rule: nested forward-mode derivatives of the op alone

def _generic(func, args, kwargs, out=None):
    jets = _jets(args, kwargs)
    if out is None:
        out = func(*_values(args), **_values(kwargs))
    _check_leaves(func, out)
    if not any(_floating(t) for t in tree_flatten(out)[0]):
        return out
    if isinstance(out, torch.Tensor):
        same = _same(out, jets)
        if same is not None:
            return same
    lay = _layout(jets)
    if isinstance(lay, Layout4):
        load_forward_decompositions()
        try:
            result = _taylor4.generic(func, args, kwargs, jets, lay, out, Jet.of,
                                      lambda a: a._v if isinstance(a, Jet) else a)
        except Exception as e:
            if _is_oom(e):
                raise
            raise TaylorRefused(f"the generic fourth-order rule failed on {_name(func)}: "
                                f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from e
        return _mark(result, jets)
    k = lay.dims
    flat, spec = tree_flatten((args, kwargs))
    pos = [i for i, a in enumerate(flat) if isinstance(a, Jet)]
    base = [a._v if isinstance(a, Jet) else a for a in flat]
    prims = tuple(flat[i]._v for i in pos)
    out_flat = tree_flatten(out)[0]
    float_at = [i for i, leaf in enumerate(out_flat) if _floating(leaf)]

    def g(*xs):
        f2 = list(base)
        for i, x in zip(pos, xs):
            f2[i] = x
        a, kw = tree_unflatten(f2, spec)
        o = tree_flatten(func(*a, **kw))[0]
        return tuple(o[i] for i in float_at)

    def nested(ta, tb):
        (_, first), (_, second) = jvp(lambda *xs: jvp(g, xs, ta), prims, tb)
        return first, second

    firsts = tuple(flat[i]._d[:k] for i in pos)
    seconds = tuple(flat[i]._d[k:] for i in pos)
    load_forward_decompositions()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*")
            along = lay.generic_pairs()
            if lay.part == "first":
                first, quad = vmap(lambda *t: jvp(g, prims, t)[1])(*firsts), None
            elif along is not None:
                ia, ib = along
                along_a, quad = vmap(nested)(tuple(f[ia] for f in firsts), tuple(f[ib] for f in firsts))
                if lay.part == "full":
                    first = tuple(f[::k] for f in along_a)   # pairs (a, 0): the direction a alone
                else:
                    first = vmap(lambda *t: jvp(g, prims, t)[1])(*firsts)
            else:
                first, quad = vmap(nested)(firsts, firsts)
            lin = vmap(lambda *s: jvp(g, prims, s)[1])(*seconds) if lay.terms else None
    except TaylorRefused:
        raise
    except Exception as e:  # no forward-mode formula, a random op under vmap, an op vmap cannot batch
        if _is_oom(e):
            raise
        raise TaylorRefused(f"the generic second-order rule failed on {_name(func)}: "
                            f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from e
    res = {}
    for m, i in enumerate(float_at):
        leaf = out_flat[i]
        stack = first[m] if lin is None else torch.cat([first[m], lin[m] + lay.collapse(quad[m])])
        res[i] = Jet.of(leaf, stack.to(leaf.dtype), lay)
    result = tree_unflatten([res.get(i, leaf) for i, leaf in enumerate(out_flat)], tree_flatten(out)[1])
    return _mark(result, jets)


def _is_oom(e: BaseException) -> bool:
    from ._errors import is_out_of_memory
    return is_out_of_memory(e)


# ---------------------------------------------------------------------------------------------------
# The tables

_META = set()
for _n in ("shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "layout", "grad_fn", "is_leaf",
           "names", "is_sparse", "is_quantized", "is_meta", "data_ptr"):
    _attr = getattr(torch.Tensor, _n, None)
    if isinstance(_attr, property) or hasattr(_attr, "__get__"):
        _META.add(getattr(_attr, "__get__", _attr))
for _n in ("size", "dim", "numel", "nelement", "is_floating_point", "is_complex", "element_size", "stride",
           "is_contiguous", "get_device", "__len__", "data_ptr", "storage_offset", "ndimension", "__format__",
           "__repr__", "__hash__", "type"):
    if hasattr(torch.Tensor, _n) and _n != "type":
        _META.add(getattr(torch.Tensor, _n))
_META.discard(None)

_REFUSED = {torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward}
# Measured against finite differences and reverse over reverse: their second derivatives by nested
# forward mode are wrong (or follow another convention for a symmetric input than reverse mode's).
# (The normalisations among them are taken by definition when called through torch.nn.functional.)
_WRONG_FORWARD_OVER_FORWARD = {f for f in (
    getattr(torch.linalg, "det", None), torch.det, torch.Tensor.det, torch.logdet, torch.Tensor.logdet,
    torch.slogdet, torch.Tensor.slogdet, getattr(torch.linalg, "slogdet", None), torch.linalg.solve,
    torch.linalg.solve_ex, torch.cholesky_inverse, torch.Tensor.cholesky_inverse, torch.layer_norm,
    torch.group_norm, torch.batch_norm, torch.instance_norm, getattr(torch, "rms_norm", None),
    torch.native_layer_norm,
    # These two differ from reverse over reverse (the catalogue sweep, rows of one matrix as samples):
    torch.linalg.cholesky, torch.cholesky, torch.Tensor.cholesky, torch.linalg.householder_product,
    torch.orgqr, torch.Tensor.orgqr) if f is not None}

_RULES: dict[Any, Callable] = {}


def _register(names, rule, spaces=(torch, torch.Tensor, F, torch.special)):
    for name in names:
        for space in spaces:
            f = getattr(space, name, None)
            if f is not None and callable(f):
                _RULES[f] = rule


for _n in _ELEMENTWISE:
    _register([_n], _unary_rule(_n))
_register(["expit"], _unary_rule("sigmoid"), (torch.special,))
_register(["linear"], _linear_layer, (F,))
for _n in ("conv1d", "conv2d", "conv3d"):
    _register([_n], _affine(2), (F, torch))
_register(["mul", "multiply", "__mul__", "__rmul__"], _mul)
_register(["div", "divide", "true_divide", "__truediv__", "__rtruediv__", "__div__", "__rdiv__"], _div)
_register(["matmul", "mm", "bmm", "__matmul__", "__rmatmul__", "mv", "outer", "dot", "inner", "ger"], _bilinear)
_register(["add", "sub", "subtract", "__add__", "__radd__", "__sub__", "__rsub__"], _linear({0, 1}))
_register(["neg", "negative", "__neg__", "__pos__", "positive"], _linear({0}))
_register(["cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "column_stack"], _linear({0}))
_register(["where"], _linear({1, 2}), (torch,))
_RULES[torch.Tensor.where] = _linear({0, 2})  # self.where(condition, other)
_register(["sum", "mean", "reshape", "view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
           "reshape_as", "ravel", "permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t",
           "__getitem__", "select", "narrow", "index_select", "gather", "take_along_dim", "split", "chunk",
           "unbind", "tensor_split", "expand", "expand_as", "broadcast_to", "repeat", "tile", "flip", "fliplr",
           "flipud", "roll", "rot90", "diagonal", "diag", "diag_embed", "tril", "triu", "trace", "cumsum",
           "contiguous", "clone", "to", "double", "float", "half", "bfloat16", "cpu", "cuda", "type_as",
           "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
           "adaptive_avg_pool3d", "pixel_shuffle", "pixel_unshuffle", "unfold", "fold"], _linear(None))
_register(["detach", "numpy", "tolist", "item"], _detach, (torch, torch.Tensor))
_register(["requires_grad_", "retain_grad"], _same_object, (torch.Tensor,))
for _n in ("mT", "T"):
    _RULES[getattr(torch.Tensor, _n).__get__] = _linear(None)
_RULES[torch.Tensor.__iter__] = lambda func, args, kwargs: iter(_dispatch(torch.Tensor.unbind, (args[0],), {}))


def _constant(func, args, kwargs):
    """*_like and new_* factories: a fresh tensor whose value does not depend on the input's."""
    return func(*_values(args), **_values(kwargs))


_register(["zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "randint_like",
           "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"], _constant, (torch, torch.Tensor))
_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}


def _inplace_positions() -> dict:
    """F functions with an ``inplace`` flag, and its position (F.relu(x, True) writes into x)."""
    import inspect
    found = {}
    for name in dir(F):
        f = getattr(F, name)
        if not callable(f):
            continue
        try:
            names = list(inspect.signature(f).parameters)
        except (TypeError, ValueError):
            continue
        if "inplace" in names:
            found[f] = names.index("inplace")
    return found


_INPLACE_AT = _inplace_positions()


# ---------------------------------------------------------------------------------------------------
# Composites: ops whose derivatives are taken through their definition in simpler ops. PyTorch's
# forward-over-forward derivative of native layer_norm is wrong (Laplacians off by O(1), measured
# against double backward and vmap(hessian)), so the generic rule cannot serve the normalisations;
# through their definitions every step has an exact rule. The value is the op's own (bit-identical
# to fn's); the composite gives the stack.

def _composite(definition, func, args, kwargs):
    try:
        out = definition(*args, **kwargs)
    except _UseGeneric:
        with torch._C.DisableTorchFunctionSubclass():
            return _generic(func, args, kwargs)
    with torch._C.DisableTorchFunctionSubclass():
        value = func(*_values(args), **_values(kwargs))
        if not isinstance(out, Jet):
            return value
        return Jet.of(value, out._d.to(value.dtype), out._lay)


def _normalise(x, dims, eps):
    m = x.mean(dims, keepdim=True)
    c = x - m
    return c * torch.rsqrt((c * c).mean(dims, keepdim=True) + eps)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    y = _normalise(input, dims, eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _rms_norm(input, normalized_shape, weight=None, eps=None):
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    y = input * torch.rsqrt((input * input).mean(dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


def _channels(x) -> tuple:
    """The shape that broadcasts a (C,) vector along dim 1 of x (N, C, ...)."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def _per_channel(y, weight, bias):
    if weight is not None:
        y = y * weight.reshape(_channels(y))
    if bias is not None:
        y = y + bias.reshape(_channels(y))
    return y


def _with_running(x, mean, var, eps):
    return (x - mean.reshape(_channels(x))) * torch.rsqrt(var.reshape(_channels(x)) + eps)


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    shape = input.shape
    return _per_channel(_normalise(input.reshape(shape[0], num_groups, -1), (-1,), eps).reshape(shape), weight, bias)


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                eps=1e-5):
    if any(isinstance(t, Jet) for t in (running_mean, running_var)):
        raise _UseGeneric
    if training or running_mean is None:
        y = _normalise(input, (0,) + tuple(range(2, input.dim())), eps)
    else:
        y = _with_running(input, running_mean, running_var, eps)
    return _per_channel(y, weight, bias)


def _instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                   momentum=0.1, eps=1e-5):
    if any(isinstance(t, Jet) for t in (running_mean, running_var)):
        raise _UseGeneric
    if use_input_stats or running_mean is None:
        y = _normalise(input, tuple(range(2, input.dim())), eps)
    else:
        y = _with_running(input, running_mean, running_var, eps)
    return _per_channel(y, weight, bias)


def _attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention by its definition (its fused CPU kernels have no second
    derivatives by either mode)."""
    if dropout_p or enable_gqa or isinstance(attn_mask, Jet):
        raise _UseGeneric
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    if is_causal:
        lq, lk = query.shape[-2], key.shape[-2]
        keep = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores, -1) @ value


_COMPOSITES = {F.scaled_dot_product_attention: _attention, F.layer_norm: _layer_norm, F.instance_norm: _instance_norm, F.group_norm: _group_norm, F.batch_norm: _batch_norm}
if hasattr(F, "rms_norm"):
    _COMPOSITES[F.rms_norm] = _rms_norm


class _ByDefinition(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        definition = _COMPOSITES.get(func)
        if definition is not None:
            try:
                return definition(*args, **kwargs)
            except _UseGeneric:
                pass
        return func(*args, **kwargs)


def by_definition():
    """A scope in which the normalisations (and attention) run by their definitions in simpler ops, as
    Taylor mode takes them: reverse mode to the third and fourth order through native layer_norm is
    wrong (measured: a bi-Laplacian through F.layer_norm off by 140%), through its definition exact."""
    return _ByDefinition()
