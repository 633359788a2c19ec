"""Taylor mode to the fourth order: the univariate jets of a bi-Laplacian or a u_xxxx in one pass.

# NOTE: [Fourth-order propagation]
# For orders 3 and 4 (see [Operators as directions and terms] in _operators) every tensor u computed
# from x carries, for each of R directions v_r, its normalised Taylor coefficients
# c_m(v_r) = D^m u[v_r]^m / m! for m = 1 ... K - 1, and the top order K only as T collapsed terms
# sum_r W[t, r] c_K(v_r): the stack is ((K - 1) R + T, *u.shape). Ops map coefficients by Taylor
# arithmetic along each direction (u(t) = u_0 + c_1 t + c_2 t^2 + ...):
#   elementwise g (Faa di Bruno):  z_1 = g' c_1,  z_2 = g' c_2 + g''/2 c_1^2,
#                                  z_3 = g' c_3 + g'' c_1 c_2 + g'''/6 c_1^3,
#                                  z_4 = g' c_4 + g''(c_1 c_3 + c_2^2/2) + g'''/2 c_1^2 c_2 + g''''/24 c_1^4
#   a bilinear op B (mul, matmul): z_m = sum_{i+j=m} B(a_i, b_j)
#   linear and view ops: every coefficient through the op (the rules of _taylor, which do not look
#   at the layout), and the generic rule: the op's Taylor coefficients along each direction by
#   forward mode nested K deep (torch.func.jvp of t -> g(u(t)) at t = 0).
# The top coefficient enters z_K linearly (g' c_K, B(a_0, b_K) + B(a_K, b_0)), which is what lets it
# be carried collapsed: Z_top = g' U_top + sum_r W[:, r] (z_K(v_r) without its top input).
# A pass costs about 1 + (K - 1) R + T forward passes' worth of linear-layer products; the
# bi-Laplacian at D = 3 carries 7 directions: 23 vectors in one pass.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch.func import jvp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten


@dataclass(frozen=True, eq=False)
class Layout4:
    """The stack of a fourth-order jet: K - 1 blocks of R per-direction coefficients, then T terms."""

    dims: int                 # R directions
    order: int                # K: 3 or 4
    terms: int                # T collapsed top-order terms
    weights: torch.Tensor = field(repr=False)  # (T, R) float64: W
    part: str = "high"

    @property
    def size(self) -> int:
        return (self.order - 1) * self.dims + self.terms

    def split(self, d: torch.Tensor) -> tuple[list, torch.Tensor]:
        """([c_1, ..., c_{K-1}] each (R, ...), top (T, ...))."""
        r = self.dims
        return [d[(m - 1) * r:m * r] for m in range(1, self.order)], d[(self.order - 1) * r:]

    def contract(self, z: torch.Tensor) -> torch.Tensor:
        """sum_r W[t, r] z[r]: (R, ...) -> (T, ...)."""
        w = self.weights.to(z.device, z.dtype)
        return torch.tensordot(w, z, dims=([1], [0]))


def seed(x: torch.Tensor, directions: torch.Tensor, lay: Layout4) -> torch.Tensor:
    """The input's stack: c_1 = the directions (R, *x.shape), every other coefficient zero."""
    d = torch.zeros((lay.size, *x.shape), dtype=x.dtype, device=x.device)
    d[:lay.dims] = directions
    return d


# -- elementwise functions: (g', g'', g''', g'''') ---------------------------------------------------

def _sigmoid_derivs(s):
    s1 = s * (1 - s)
    s2 = s1 * (1 - 2 * s)
    s3 = s2 * (1 - 2 * s) - 2 * s1 * s1
    s4 = s3 * (1 - 2 * s) - 6 * s1 * s2
    return s1, s2, s3, s4


def _tanh(v, y, rest, kw):
    g1 = 1 - y * y
    g2 = -2 * y * g1
    g3 = -2 * (g1 * g1 + y * g2)
    g4 = -2 * (3 * g1 * g2 + y * g3)
    return g1, g2, g3, g4


def _sigmoid(v, y, rest, kw):
    return _sigmoid_derivs(y)


def _softplus(v, y, rest, kw):
    beta = kw.get("beta", rest[0] if len(rest) > 0 else 1.0)
    threshold = kw.get("threshold", rest[1] if len(rest) > 1 else 20.0)
    if isinstance(beta, torch.Tensor) or isinstance(threshold, torch.Tensor):
        raise _Generic
    s = torch.sigmoid(v * beta)
    s1, s2, s3, _ = _sigmoid_derivs(s)
    linear = v * beta > threshold
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    return (torch.where(linear, 1.0, s).to(v.dtype), torch.where(linear, zero, beta * s1),
            torch.where(linear, zero, beta ** 2 * s2), torch.where(linear, zero, beta ** 3 * s3))


def _silu(v, y, rest, kw):
    s = torch.sigmoid(v)
    s1, s2, s3, s4 = _sigmoid_derivs(s)
    return s + v * s1, 2 * s1 + v * s2, 3 * s2 + v * s3, 4 * s3 + v * s4


def _gelu(v, y, rest, kw):
    if kw.get("approximate", rest[0] if rest else "none") != "none":
        raise _Generic
    phi = torch.exp(-0.5 * v * v) * (1 / math.sqrt(2 * math.pi))
    cdf = 0.5 * (1 + torch.erf(v * (1 / math.sqrt(2))))
    v2 = v * v
    return cdf + v * phi, phi * (2 - v2), phi * (v2 * v - 4 * v), phi * (-v2 * v2 + 7 * v2 - 4)


def _power(p: float):
    def derivs(v, y, rest, kw):
        gs, c = [], 1.0
        for k in range(1, 5):
            c *= p - k + 1
            gs.append(c * v.pow(p - k) if c != 0 else torch.zeros_like(v))
        return tuple(gs)
    return derivs


def _pow(v, y, rest, kw):
    p = kw.get("exponent", rest[0] if rest else None)
    if isinstance(p, torch.Tensor) or not isinstance(p, (int, float)) or isinstance(p, bool):
        raise _Generic
    if p == 0:
        z = torch.zeros_like(v)
        return z, z, z, z
    if float(p).is_integer() and p > 0:  # v^p with p a positive integer: exact zeros past order p
        gs, c = [], 1.0
        for k in range(1, 5):
            c *= p - k + 1
            gs.append(c * v.pow(p - k) if p - k > 0 else torch.full_like(v, c) if p - k == 0 else torch.zeros_like(v))
        return tuple(gs)
    return _power(float(p))(v, y, rest, kw)


def _piecewise_linear(slope_fn):
    def derivs(v, y, rest, kw):
        z = torch.zeros_like(v)
        return slope_fn(v, y, rest, kw).to(v.dtype), z, z, z
    return derivs


def _clamp(v, y, rest, kw):
    lo = kw.get("min", rest[0] if len(rest) > 0 else None)
    hi = kw.get("max", rest[1] if len(rest) > 1 else None)
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        raise _Generic
    keep = torch.ones_like(v, dtype=torch.bool)
    if lo is not None:
        keep &= v >= lo
    if hi is not None:
        keep &= v <= hi
    z = torch.zeros_like(v)
    return keep.to(v.dtype), z, z, z


def _erf(v, y, rest, kw):
    g1 = (2 / math.sqrt(math.pi)) * torch.exp(-v * v)
    return g1, -2 * v * g1, (4 * v * v - 2) * g1, (-8 * v * v * v + 12 * v) * g1


def _atan(v, y, rest, kw):
    q = 1 / (1 + v * v)
    return q, -2 * v * q * q, (6 * v * v - 2) * q ** 3, 24 * v * (1 - v * v) * q ** 4


def _tan(v, y, rest, kw):
    g1 = 1 + y * y
    g2 = 2 * y * g1
    g3 = 2 * (g1 * g1 + y * g2)
    return g1, g2, g3, 2 * (3 * g1 * g2 + y * g3)


def _log1p(v, y, rest, kw):
    q = 1 / (1 + v)
    return q, -q * q, 2 * q ** 3, -6 * q ** 4


class _Generic(Exception):
    """This call of an elementwise function needs the generic rule (a tensor exponent, say)."""


ELEMENTWISE: dict = {
    "tanh": _tanh,
    "sin": lambda v, y, r, k: (torch.cos(v), -y, -torch.cos(v), y),
    "cos": lambda v, y, r, k: (-torch.sin(v), -y, torch.sin(v), y),
    "exp": lambda v, y, r, k: (y, y, y, y),
    "expm1": lambda v, y, r, k: (y + 1, y + 1, y + 1, y + 1),
    "log": lambda v, y, r, k: (1 / v, -1 / (v * v), 2 / v ** 3, -6 / v ** 4),
    "log1p": _log1p,
    "sigmoid": _sigmoid,
    "softplus": _softplus,
    "silu": _silu,
    "gelu": _gelu,
    "relu": _piecewise_linear(lambda v, y, r, k: y > 0),
    "leaky_relu": _piecewise_linear(lambda v, y, r, k: torch.where(
        v > 0, 1.0, k.get("negative_slope", r[0] if r else 0.01))),
    "abs": _piecewise_linear(lambda v, y, r, k: torch.sign(v)),
    "clamp": _clamp,
    "clip": _clamp,
    "pow": _pow,
    "__pow__": _pow,
    "square": lambda v, y, r, k: (2 * v, torch.full_like(v, 2.0), torch.zeros_like(v), torch.zeros_like(v)),
    "sqrt": _power(0.5),
    "rsqrt": _power(-0.5),
    "reciprocal": _power(-1.0),
    "erf": _erf,
    "atan": _atan,
    "sinh": lambda v, y, r, k: (torch.cosh(v), y, torch.cosh(v), y),
    "cosh": lambda v, y, r, k: (torch.sinh(v), y, torch.sinh(v), y),
    "tan": _tan,
}


def unary(func, name: str, x, rest, kwargs, make, generic):
    """An elementwise function of a fourth-order jet ``x`` (see the NOTE); ``make(v, d, lay)`` builds
    the result jet; ``generic()`` is the generic rule, for calls the table cannot take."""
    v, d, lay = x._v, x._d, x._lay
    y = func(v, *rest, **kwargs)
    if not (isinstance(y, torch.Tensor) and (y.is_floating_point() or y.is_complex())) or y.shape != v.shape:
        return generic(y)
    try:
        g1, g2, g3, g4 = ELEMENTWISE[name](v, y, rest, kwargs)
    except _Generic:
        return generic(None)
    cs, top = lay.split(d)
    c1 = cs[0]
    if lay.order == 4:
        c2, c3 = cs[1], cs[2]
        c1s = c1 * c1
        z1 = g1 * c1
        z2 = g1 * c2 + 0.5 * g2 * c1s
        z3 = g1 * c3 + g2 * c1 * c2 + (g3 / 6) * c1s * c1
        z4 = g2 * (c1 * c3 + 0.5 * c2 * c2) + 0.5 * g3 * c1s * c2 + (g4 / 24) * c1s * c1s
        out = torch.cat([z1, z2, z3, g1 * top + lay.contract(z4)])
    else:
        c2 = cs[1]
        z1 = g1 * c1
        z2 = g1 * c2 + 0.5 * g2 * c1 * c1
        z3 = g2 * c1 * c2 + (g3 / 6) * c1 * c1 * c1
        out = torch.cat([z1, z2, g1 * top + lay.contract(z3)])
    return make(y, out.to(y.dtype), lay)


def product(a_d: torch.Tensor, va, b_d: torch.Tensor, vb, lay: Layout4, op, over) -> torch.Tensor:
    """The stack of B(a, b) for a bilinear B (``op`` on plain tensors, ``over(f, *stacks, in_dims)``
    its vmap over a stack): z_m = sum_{i+j=m} B(a_i, b_j), the top collapsed."""
    ca, ta = lay.split(a_d)
    cb, tb = lay.split(b_d)
    k = lay.order
    a = [va] + ca   # a[m]: coefficient m (a[0] the value)
    b = [vb] + cb

    def both(i, j):  # B(a_i, b_j) per direction: (R, ...)
        if i == 0:
            return over(op, va, b[j], in_dims=(None, 0))
        if j == 0:
            return over(op, a[i], vb, in_dims=(0, None))
        return over(op, a[i], b[j], in_dims=(0, 0))

    blocks = [sum(both(i, m - i) for i in range(m + 1)) for m in range(1, k)]
    inner = sum(both(i, k - i) for i in range(1, k))            # z_K without the top coefficients
    top = over(op, va, tb, in_dims=(None, 0)) + over(op, ta, vb, in_dims=(0, None)) + lay.contract(inner)
    return torch.cat(blocks + [top])


def generic(func, args, kwargs, jets, lay: Layout4, out, make, values):
    """The generic rule: Taylor coefficients of the op along each direction by nested forward mode
    (t -> g(u(t)) differentiated K times at t = 0), the top terms by one more JVP."""
    k = lay.order
    flat, spec = tree_flatten((args, kwargs))
    pos = [i for i, a in enumerate(flat) if any(a is j for j in jets)]
    base = [values(a) for a in flat]
    out_flat = tree_flatten(out)[0]
    float_at = [i for i, leaf in enumerate(out_flat)
                if isinstance(leaf, torch.Tensor) and (leaf.is_floating_point() or leaf.is_complex())]

    def g(*xs):
        f2 = list(base)
        for i, x in zip(pos, xs):
            f2[i] = x
        a, kw = tree_unflatten(f2, spec)
        o = tree_flatten(func(*a, **kw))[0]
        return tuple(o[i] for i in float_at)

    prims = tuple(flat[i]._v for i in pos)
    splits = [lay.split(flat[i]._d) for i in pos]

    def along(*cs):  # cs: for each jet input, its (K - 1) coefficients along one direction
        per = [cs[j * (k - 1):(j + 1) * (k - 1)] for j in range(len(pos))]

        def phi(t):
            xs = []
            for v, c in zip(prims, per):
                x = v
                for m, cm in enumerate(c, start=1):
                    x = x + cm * t ** m
                xs.append(x)
            return g(*xs)

        fun = lambda t: (phi(t),)  # noqa: E731
        for _ in range(k):
            fun = _one_more(fun)
        t0 = torch.zeros((), dtype=prims[0].dtype, device=prims[0].device)
        derivs = fun(t0)             # (phi, phi', ..., phi^(k)), each a tuple over the outputs
        return tuple(tuple(d / math.factorial(m) for d in derivs[m]) for m in range(1, k + 1))

    stacks = [c for cs, _ in splits for c in cs]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        coeffs = vmap(along)(*stacks)  # coeffs[m - 1][o]: (R, *out_o)
        tops = [top for _, top in splits]
        lin = vmap(lambda *ts: jvp(g, prims, ts)[1])(*tops) if lay.terms else None
    res = {}
    for o, i in enumerate(float_at):
        leaf = out_flat[i]
        blocks = [coeffs[m][o] for m in range(k - 1)]
        top = lay.contract(coeffs[k - 1][o].to(leaf.dtype))
        if lin is not None:
            top = top + lin[o]
        res[i] = make(leaf, torch.cat(blocks + [top]).to(leaf.dtype), lay)
    return tree_unflatten([res.get(i, leaf) for i, leaf in enumerate(out_flat)], tree_flatten(out)[1])


def _one_more(fun):
    """t -> (f, f', ..., f^(m)) from t -> (f, ..., f^(m-1)): one more forward-mode derivative."""
    def g(t):
        primal, tangent = jvp(fun, (t,), (torch.ones_like(t),))
        return (*primal, tangent[-1])
    return g


def blocks(y, lay: Layout4, n: int):
    """(by_order {m: (n, n_out, R)}, top (n, n_out, T)) from the output's jet."""
    d = y._d.reshape(lay.size, n, -1)
    cs, top = lay.split(d)
    return {m: c.permute(1, 2, 0) for m, c in enumerate(cs, start=1)}, top.permute(1, 2, 0)
