"""Differential operators: which derivatives a pass carries, and how they make the results.

An :class:`Operator` describes a linear differential operator of fn's per-sample output u with
respect to the per-sample input x (D elements, flattened) of ``wrt``, in the terms a Taylor pass
needs (see _taylor and _taylor4) and a reverse-mode pass can reproduce (_strategies/double_backward):

- **directions** v_1 ... v_K: the first-order directions the pass carries. Either fixed vectors (K, D)
  shared by every sample (coordinate axes, the eigenvectors of a weights matrix, polarisation
  directions), or drawn per sample (random directions, the factors of per-sample weights) by
  ``seeds(start, n)`` from the sample's index in the batch, so that a chunk computes what the whole
  batch would.
- **order 2** (``order <= 2``, the multivariate engine of _taylor): second-order terms
  t = sum_p coef_p D^2u[v_k(p), v_l(p)] over a list of pairs (k, l, t, coef); first-order terms are
  read off the directions (D u[v_k] = J v_k).
- **order 4** (``order in (3, 4)``, the univariate engine of _taylor4): every direction carries its
  Taylor coefficients c_m(v) = D^m u[v, ..., v] / m! up to order - 1, and the top order is carried
  collapsed: terms t = sum_r top[t, r] c_order(v_r). Lower-order terms are read off the directions.
- **results**: how the terms make what the call returns (``assemble``), and their shapes.

NOTE: [Operators as directions and terms]
A Laplacian over coordinates S sums D^2u[e_k, e_k] over k in S: directions e_k, one term. A weighted
Laplacian tr(C H) with a symmetric C = Q diag(lam) Q^T is sum_k lam_k D^2u[q_k, q_k]: the r = rank(C)
eigenvectors as directions, one term; for a positive semi-definite C the directions are scaled by
sqrt(lam) and the pass is the forward Laplacian's own (per-sample C: its factor per sample; an
indefinite per-sample C gives the positive and the negative part their own directions and terms,
twice the directions). A randomized Laplacian is the mean of D^2u[v, v] over k random directions
with E[v v^T] = I (Rademacher or Gaussian): unbiased, k directions whatever D. Mixed partials come
from pairs (e_i, e_j). The bi-Laplacian sum_ij u_iijj needs fourth derivatives: with Rademacher
vectors v, E[D^4u[v]^4] = sum_i u_iiii + 3 sum_{i!=j} u_iijj, so averaging over all 2^(D-1) sign
patterns (exact) and adding (2/3) sum_i u_iiii gives it from 2^(D-1) + D directions (D <= 5; above, the
pairs e_i +- e_j give it from D^2 directions, fewer than the 12 of jet-for-pytorch's three passes at
D = 3); a Gaussian v gives E[D^4u[v]^4] = 3 Delta^2 u (unbiased). A single partial of order m is the
polarisation sum_S (-1)^(m-|S|) c_m(sum_{i in S} e_(alpha_i)) over the subsets S of its multi-index,
its directions reduced to the distinct primitive ones (c_m(s w) = s^m c_m(w)).
"""
from __future__ import annotations

import hashlib
import itertools
import math
import numbers
from dataclasses import dataclass, field
from fractions import Fraction

import torch

from ._errors import describe

DISTRIBUTIONS = ("rademacher", "gaussian")
MAX_ORDER = 4
SIGN_PATTERNS_MAX_DIM = 5  # the bi-Laplacian by sign patterns up to this D (2^(D-1) + D <= D^2 directions)


@dataclass(frozen=True, eq=False, repr=False)
class Operator:
    """What a second- or higher-order call computes (see the module docstring). Compared and hashed by
    ``key``, its structure (two operators of one key share plans; a run always uses its call's own
    operator, seed and per-sample weights, see _call.prepare); printed by ``label``."""

    name: str                       # full, diagonal, laplacian, bilaplacian, divergence, derivatives
    dims: int                       # D: per-sample input elements
    in_shape: tuple                 # the per-sample input's shape
    order: int                      # the highest derivative order: 1, 2 (engine _taylor) or 3, 4 (_taylor4)
    num_directions: int             # K
    directions: torch.Tensor | None = field(default=None, repr=False)  # (K, D) float64, or None: per sample
    pairs: tuple = ()               # order <= 2: ((k, l, term, coef), ...)
    num_terms: int = 0              # second-order (order <= 2) or top-order (order >= 3) terms carried
    top: torch.Tensor | None = field(default=None, repr=False)  # order >= 3: (terms, K) weights of c_order
    reads: tuple = ()               # per result: (kind, data), see assemble
    names: tuple | None = None      # derivatives: the result names (a dict result)
    random: tuple | None = None     # (samples, seed, distribution)
    weights: torch.Tensor | None = field(default=None, repr=False)  # per-sample weights (B, d, d)
    select: tuple | None = None     # the coordinates (dims=) the operator acts on; None: all
    label: str = ""
    key: tuple = ()
    eye: bool = False               # directions are the D coordinate axes in order (Jacobians available)

    def __eq__(self, other) -> bool:
        return isinstance(other, Operator) and self.key == other.key

    def __hash__(self) -> int:
        return hash(self.key)

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return f"Operator({self.label!r}, {self.digest})"

    @property
    def digest(self) -> str:
        """The key (what a plan depends on: the operator's structure, not its seed or per-sample weights)
        as a short string that means the same in every process (plan cache, plans)."""
        return hashlib.sha256(repr(self.key).encode()).hexdigest()[:16]

    @property
    def full_digest(self) -> str:
        """The digest of everything the results depend on, the seed and per-sample weights included (a
        dump's manifest: a resume with another seed would mix two estimates)."""
        h = hashlib.sha256(repr((self.key, self.random)).encode())
        if self.weights is not None:
            h.update(repr(_digest(self.weights)).encode())
        return h.hexdigest()[:16]

    def check_output(self, out_shape: tuple) -> None:
        """Refuse an fn whose per-sample output this operator cannot take (the probe's shape)."""
        if self.name == "divergence" and tuple(out_shape) != tuple(self.in_shape):
            raise ValueError(f"chunkjac: divergence needs fn's per-sample output shaped like its per-sample input "
                             f"(the trace of a square Jacobian): the input is {tuple(self.in_shape)}, the output "
                             f"{tuple(out_shape)}. For another operator of a vector output, pass output= or use "
                             "chunkjac.compute for its Jacobian.")

    # -- what the engines read ------------------------------------------------------------------

    @property
    def engine(self) -> str:
        """The Taylor layout (see _taylor.Layout): "laplacian" (one term, the directions' squares summed),
        "diagonal", "full", "first" (no second-order term), "pairs", or "high" (orders 3-4, _taylor4)."""
        return self.__dict__.get("_engine", "high")

    @property
    def reverse_name(self) -> str:
        """hessian's parts keep their own reverse-over-reverse path (the full Hessian, reduced)."""
        return self.name if self.eye and self.name in ("full", "diagonal", "laplacian") else "directional"

    @property
    def stack(self) -> int:
        """Vectors a Taylor pass carries per tensor (the value included): its cost in forward passes."""
        if self.order <= 2:
            return 1 + self.num_directions + self.num_terms
        return 1 + (self.order - 1) * self.num_directions + self.num_terms

    def seeds(self, start: int, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """(K, D) directions shared by the samples, or (K, n, D) for samples start ... start + n - 1."""
        if self.directions is not None:
            return self.directions.to(device, dtype)
        return _drawn(self, start, n, dtype).to(device)

    def result_shapes(self, batch: int, out_shape: tuple) -> list[tuple]:
        return [(batch,) if kind == "trace" else (batch, *out_shape, *_extra(self, kind, data))
                for kind, data in self.reads]

    def assemble(self, first: torch.Tensor | None, terms: torch.Tensor | None, n: int, out_shape: tuple,
                 by_order: dict | None = None, seeds: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The results from a pass's output: ``first`` (n, n_out, K) first-order terms D u[v_k],
        ``terms`` (n, n_out, T) the carried terms, ``by_order[m]`` (n, n_out, K) the c_m of each
        direction (order >= 3)."""
        res = []
        for kind, data in self.reads:
            if kind == "terms":      # the carried terms, reshaped: (n, *out[, *in[, *in]])
                r = terms.reshape(n, *out_shape, *_extra(self, kind, data))
            elif kind == "term":     # one carried term
                r = terms[..., data].reshape(n, *out_shape)
            elif kind == "first":    # a combination of first-order terms: data = ((k, coef), ...)
                r = sum(first[..., k] * c for k, c in data).reshape(n, *out_shape)
            elif kind == "jacobian":  # the first-order stack of eye directions: (n, *out, *in)
                r = first.reshape(n, *out_shape, *self.in_shape)
            elif kind == "coef":     # order m coefficients of the directions: data = (m, ((k, coef), ...))
                m, comb = data
                r = sum(by_order[m][..., k] * c for k, c in comb).reshape(n, *out_shape)
            elif kind == "trace":    # divergence: sum_k (J v_k) . v_k, v the directions (mean if random)
                r = _trace(self, first, n, seeds)
            elif kind == "difference":  # indefinite per-sample weights: term 0 - term 1
                r = (terms[..., 0] - terms[..., 1]).reshape(n, *out_shape)
            else:  # pragma: no cover - the builders make no other kind
                raise AssertionError(kind)
            res.append(r)
        return res


def _extra(op: Operator, kind: str, data) -> tuple:
    if kind == "terms":
        return {"full": (*op.in_shape, *op.in_shape), "diagonal": op.in_shape}.get(data, ())
    if kind == "jacobian":
        return op.in_shape
    return ()


def _trace(op: Operator, first: torch.Tensor, n: int, v: torch.Tensor) -> torch.Tensor:
    """sum_k v_k^T (J v_k), divided by K for random directions: first is (n, D, K) (output = input),
    v the chunk's directions (K, n, D) or (K, D)."""
    k = op.num_directions
    if op.eye:
        return first.diagonal(dim1=1, dim2=2).sum(-1)
    v = v if v.dim() == 3 else v.unsqueeze(1).expand(k, n, v.shape[-1])
    return torch.einsum("nrk,knr->n", first, v.to(first.dtype)) / k


# -- builders -------------------------------------------------------------------------------------

def hessian_part(part: str, in_shape: tuple, return_jacobian: bool) -> Operator:
    """hessian(part=...): "full", "diagonal" or "laplacian" over every element of the input."""
    d = math.prod(in_shape)
    pairs = {"full": tuple((k, l, k * d + l, 1.0) for k in range(d) for l in range(d)),
             "diagonal": tuple((k, k, k, 1.0) for k in range(d)),
             "laplacian": tuple((k, k, 0, 1.0) for k in range(d))}[part]
    terms = {"full": d * d, "diagonal": d, "laplacian": 1}[part]
    reads = (("terms", part),) + ((("jacobian", None),) if return_jacobian else ())
    op = Operator(name=part, dims=d, in_shape=tuple(in_shape), order=2, num_directions=d,
                  directions=torch.eye(d, dtype=torch.float64), pairs=pairs, num_terms=terms, reads=reads,
                  label=part, key=("hessian", part, tuple(in_shape), return_jacobian), eye=True)
    object.__setattr__(op, "_engine", part)
    return op


def laplacian(in_shape: tuple, *, dims=None, weights=None, samples=None, seed=None, distribution="rademacher",
              return_jacobian: bool = False, batch: int | None = None) -> Operator:
    """chunkjac.laplacian's operator (see [Operators as directions and terms])."""
    d = math.prod(in_shape)
    sel = _coordinates(dims, d, "dims")
    coords = list(range(d)) if sel is None else list(sel)
    m = len(coords)
    rand = _random(samples, seed, distribution)
    if weights is None and rand is None and sel is None:
        return hessian_part("laplacian", in_shape, return_jacobian)
    if return_jacobian:
        raise ValueError("chunkjac: return_jacobian=True needs the Laplacian over every coordinate, unweighted and "
                         "exact (its directions are then the coordinate axes); with dims=, weights= or samples= ask "
                         "chunkjac.derivatives(...) or chunkjac.compute(...) for the first derivatives.")
    w_shared, w_batch = _weights(weights, m, batch)
    label = "laplacian"
    key: tuple = ("laplacian", tuple(in_shape), sel)
    if sel is not None:
        label += f" over dims {list(sel)}"
    if rand is not None:
        k, s, dist = rand
        key += (("random", k, dist),)  # the seed is data, not structure (see Operator.full_digest)
        if w_shared is not None:
            vals, vecs = _eigh(w_shared)
            if (vals < -1e-12 * max(1.0, float(vals.abs().max()))).any():
                raise ValueError("chunkjac: weights= with samples= must be positive semi-definite (the random "
                                 "directions are C^(1/2) v); pass samples=None for the exact weighted Laplacian "
                                 "of an indefinite C.")
            key += (("weights",) + _digest(w_shared),)
            label += " weighted"
        if w_batch is not None:
            raise ValueError("chunkjac: per-sample weights= (B, d, d) with samples= is not supported: pass "
                             "samples=None (exact), or one (d, d) weights shared by the samples.")
        label += f", randomized: {k:,} {dist} direction{'s' * (k != 1)} (seed {s})"
        op = Operator(name="laplacian", dims=d, in_shape=tuple(in_shape), order=2, num_directions=k,
                      pairs=tuple((j, j, 0, 1.0) for j in range(k)), num_terms=1, reads=(("term", 0),),
                      random=rand, select=sel, label=label, key=key + (("shared", _digest(w_shared)) if w_shared
                                                                      is not None else ()),
                      weights=None)
        # The mean of D^2u[v, v] over k directions is the sum over v / sqrt(k): the forward Laplacian's pass.
        object.__setattr__(op, "_engine", "laplacian")
        object.__setattr__(op, "_scale", 1 / math.sqrt(k))
        object.__setattr__(op, "_root", None if w_shared is None else _root_psd(w_shared))
        object.__setattr__(op, "_coords", coords)
        return op
    if w_batch is not None:  # per-sample weights: factors drawn per chunk (see _drawn)
        label += " weighted per sample"
        op = Operator(name="laplacian", dims=d, in_shape=tuple(in_shape), order=2, num_directions=2 * m,
                      pairs=tuple((j, j, 0 if j < m else 1, 1.0) for j in range(2 * m)), num_terms=2,
                      reads=(("difference", None),), weights=w_batch, select=sel, label=label,
                      key=key + (("per-sample weights", tuple(w_batch.shape)),))
        object.__setattr__(op, "_engine", "pairs")
        object.__setattr__(op, "_coords", coords)
        return op
    if w_shared is not None:
        vals, vecs = _eigh(w_shared)
        scale = float(vals.abs().max()) if len(vals) else 0.0
        keep = vals.abs() > 1e-12 * max(scale, 1e-300)
        vals, vecs = vals[keep], vecs[:, keep]
        dirs = torch.zeros((max(len(vals), 1), d), dtype=torch.float64)
        label += " weighted"
        key += (("weights",) + _digest(w_shared),)
        if (vals >= 0).all():  # C = S S^T: the forward Laplacian along the columns of S
            s = vecs * vals.sqrt()
            dirs[: len(vals), coords] = s.T
            pairs = tuple((j, j, 0, 1.0) for j in range(len(vals)))
            part = "laplacian"
        else:                  # indefinite: each eigenvector with its signed eigenvalue
            dirs[: len(vals), coords] = vecs.T
            pairs = tuple((j, j, 0, float(vals[j])) for j in range(len(vals)))
            part = "pairs"
        if not len(vals):      # C = 0: one zero direction, a zero result
            pairs = ((0, 0, 0, 0.0),)
            part = "pairs"
        op = Operator(name="laplacian", dims=d, in_shape=tuple(in_shape), order=2, num_directions=dirs.shape[0],
                      directions=dirs, pairs=pairs, num_terms=1, reads=(("term", 0),), select=sel, label=label,
                      key=key)
        object.__setattr__(op, "_engine", part)
        return op
    dirs = torch.zeros((m, d), dtype=torch.float64)
    dirs[torch.arange(m), coords] = 1
    op = Operator(name="laplacian", dims=d, in_shape=tuple(in_shape), order=2, num_directions=m, directions=dirs,
                  pairs=tuple((j, j, 0, 1.0) for j in range(m)), num_terms=1, reads=(("term", 0),), select=sel,
                  label=label, key=key)
    object.__setattr__(op, "_engine", "laplacian")
    return op


def divergence(in_shape: tuple, out_shape: tuple | None = None, *, samples=None, seed=None,
               distribution="rademacher") -> Operator:
    """chunkjac.divergence's operator: the trace of each sample's Jacobian (output shaped like input)."""
    d = math.prod(in_shape)
    rand = _random(samples, seed, distribution)
    if rand is None:
        op = Operator(name="divergence", dims=d, in_shape=tuple(in_shape), order=1, num_directions=d,
                      directions=torch.eye(d, dtype=torch.float64), num_terms=0, reads=(("trace", None),),
                      label="divergence", key=("divergence", tuple(in_shape)), eye=True)
    else:
        k, s, dist = rand
        op = Operator(name="divergence", dims=d, in_shape=tuple(in_shape), order=1, num_directions=k,
                      num_terms=0, reads=(("trace", None),), random=rand,
                      label=f"divergence, Hutchinson: {k:,} {dist} direction{'s' * (k != 1)} (seed {s})",
                      key=("divergence", tuple(in_shape), k, dist))
    object.__setattr__(op, "_engine", "first")
    object.__setattr__(op, "_coords", list(range(d)))
    return op


def bilaplacian(in_shape: tuple, *, dims=None, samples=None, seed=None, distribution="rademacher") -> Operator:
    """chunkjac.bilaplacian's operator: sum_ij u_iijj over the selected coordinates."""
    d = math.prod(in_shape)
    sel = _coordinates(dims, d, "dims")
    coords = list(range(d)) if sel is None else list(sel)
    m = len(coords)
    rand = _random(samples, seed, distribution)
    label = "bilaplacian" + (f" over dims {list(sel)}" if sel is not None else "")
    key: tuple = ("bilaplacian", tuple(in_shape), sel)
    c4 = 24.0  # D^4 u[v]^4 = 4! c_4(v)
    if rand is not None:
        k, s, dist = rand
        # Gaussian: E[D^4u[v]^4] = 3 Delta^2 u. Rademacher: E = sum_i u_iiii + 3 sum_{i!=j} u_iijj, so
        # the m axes' u_iiii are carried too (their (2/3) sum completes it).
        axes = m if dist == "rademacher" else 0
        top = [c4 / (3 * k)] * k + [2 / 3 * c4] * axes
        label += f", randomized: {k:,} {dist} direction{'s' * (k != 1)} (seed {s})"
        op = Operator(name="bilaplacian", dims=d, in_shape=tuple(in_shape), order=4, num_directions=k + axes,
                      num_terms=1, top=torch.tensor([top], dtype=torch.float64), reads=(("term", 0),),
                      random=rand, select=sel, label=label, key=key + (k, dist))
        object.__setattr__(op, "_coords", coords)
        object.__setattr__(op, "_axes", axes)
        return op
    rows, top = [], []
    if m == 0:  # no coordinate: one zero direction, a zero result
        rows, top = [()], [0.0]
    elif m <= SIGN_PATTERNS_MAX_DIM:
        for signs in itertools.product((1.0, -1.0), repeat=m - 1):
            rows.append((1.0,) + signs)
            top.append(c4 / (3 * 2 ** (m - 1)))
        for i in range(m):
            rows.append(tuple(1.0 if j == i else 0.0 for j in range(m)))
            top.append(2 / 3 * c4)
    else:
        for i in range(m):
            rows.append(tuple(1.0 if j == i else 0.0 for j in range(m)))
            top.append(c4 * (1 - (m - 1) / 3))
        for i, j in itertools.combinations(range(m), 2):
            for sgn in (1.0, -1.0):
                rows.append(tuple(1.0 if q == i else sgn if q == j else 0.0 for q in range(m)))
                top.append(c4 / 6)
    dirs = torch.zeros((len(rows), d), dtype=torch.float64)
    if m:
        dirs[:, coords] = torch.tensor(rows, dtype=torch.float64)
    return Operator(name="bilaplacian", dims=d, in_shape=tuple(in_shape), order=4, num_directions=len(rows),
                    directions=dirs, num_terms=1, top=torch.tensor([top], dtype=torch.float64),
                    reads=(("term", 0),), select=sel, label=label, key=key)


def derivatives(in_shape: tuple, terms) -> Operator:
    """chunkjac.derivatives's operator: named partial derivatives of orders 1 to 4 (see the NOTE)."""
    d = math.prod(in_shape)
    if not isinstance(terms, dict) or not terms:
        raise TypeError(f"chunkjac: terms must be a non-empty dict mapping a name to a multi-index of input "
                        f"coordinates, e.g. {{'u_t': (2,), 'u_xx': (0, 0)}}; got {describe(terms)}.")
    parsed = {}
    for name, idx in terms.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"chunkjac: terms: each name must be a non-empty str, got {describe(name)}.")
        if isinstance(idx, numbers.Integral) and not isinstance(idx, bool):
            idx = (idx,)
        if not isinstance(idx, (tuple, list)) or not idx or not all(
                isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in idx):
            raise TypeError(f"chunkjac: terms[{name!r}] must be a tuple of input coordinates (ints), e.g. (0, 0) for "
                            f"the second derivative along coordinate 0; got {describe(idx)}.")
        if len(idx) > MAX_ORDER:
            raise ValueError(f"chunkjac: terms[{name!r}] = {tuple(idx)} is of order {len(idx)}; chunkjac computes "
                             f"orders 1 to {MAX_ORDER}.")
        for i in idx:
            if not 0 <= int(i) < d:
                raise ValueError(f"chunkjac: terms[{name!r}] = {tuple(idx)}: coordinate {int(i)} is outside the "
                                 f"per-sample input, which has {d} element{'s' * (d != 1)} (indices 0 to {d - 1} into "
                                 "its flattened shape; no negative indices).")
        parsed[name] = tuple(sorted(int(i) for i in idx))
    order = max(len(i) for i in parsed.values())
    key = ("derivatives", tuple(in_shape), tuple(parsed.items()))
    label = "derivatives " + ", ".join(parsed)
    names = tuple(parsed)
    if order <= 2:
        coords = sorted({i for idx in parsed.values() for i in idx})
        at = {c: j for j, c in enumerate(coords)}
        dirs = torch.zeros((len(coords), d), dtype=torch.float64)
        dirs[torch.arange(len(coords)), coords] = 1
        pairs, reads, t = [], [], 0
        for name, idx in parsed.items():
            if len(idx) == 1:
                reads.append(("first", ((at[idx[0]], 1.0),)))
            else:
                pairs.append((at[idx[0]], at[idx[1]], t, 1.0))
                reads.append(("term", t))
                t += 1
        op = Operator(name="derivatives", dims=d, in_shape=tuple(in_shape), order=2 if pairs else 1,
                      num_directions=len(coords), directions=dirs, pairs=tuple(pairs), num_terms=t,
                      reads=tuple(reads), names=names, label=label, key=key)
        object.__setattr__(op, "_engine", "pairs" if pairs else "first")
        return op
    # Orders 3-4: polarisation over primitive directions (see the NOTE); the top order collapsed.
    found: dict = {}        # primitive direction (tuple over coords) -> index
    weights: list = []      # per term: {direction index: coef of c_m}
    for name, idx in parsed.items():
        m = len(idx)
        comb: dict = {}
        for size in range(1, m + 1):
            for subset in itertools.combinations(range(m), size):
                w = [0] * d
                for p in subset:
                    w[idx[p]] += 1
                g = math.gcd(*[abs(c) for c in w if c])
                prim = tuple(c // g for c in w)
                j = found.setdefault(prim, len(found))
                comb[j] = comb.get(j, Fraction(0)) + Fraction((-1) ** (m - size) * g ** m)
        weights.append((m, {j: c for j, c in comb.items() if c}))
    dirs = torch.tensor(list(found), dtype=torch.float64).reshape(len(found), d)
    n_top = sum(1 for m, _ in weights if m == order)
    top = torch.zeros((n_top, len(found)), dtype=torch.float64)
    reads, t = [], 0
    for m, comb in weights:
        if m == order:
            for j, c in comb.items():
                top[t, j] = float(c)
            reads.append(("term", t))
            t += 1
        else:
            reads.append(("coef", (m, tuple((j, float(c)) for j, c in comb.items()))))
    return Operator(name="derivatives", dims=d, in_shape=tuple(in_shape), order=order, num_directions=len(found),
                    directions=dirs, num_terms=n_top, top=top, reads=tuple(reads), names=names, label=label, key=key)


# -- argument checks ------------------------------------------------------------------------------

def _coordinates(dims, d: int, name: str) -> tuple | None:
    if dims is None:
        return None
    if isinstance(dims, numbers.Integral) and not isinstance(dims, bool):
        dims = (dims,)
    if isinstance(dims, torch.Tensor) and dims.dim() <= 1 and not dims.is_floating_point():
        dims = tuple(int(i) for i in dims.reshape(-1).tolist())
    if not isinstance(dims, (tuple, list, range)) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in dims):
        raise TypeError(f"chunkjac: {name} must be a sequence of input coordinates (ints, indices into the flattened "
                        f"per-sample input), e.g. {name}=(0, 1); got {describe(dims)}.")
    dims = tuple(int(i) for i in dims)
    if not dims:
        raise ValueError(f"chunkjac: {name}=() selects no coordinate; pass None for all of them.")
    bad = [i for i in dims if not 0 <= i < d]
    if bad:
        raise ValueError(f"chunkjac: {name}={list(dims)}: coordinate {bad[0]} is outside the per-sample input, which "
                         f"has {d} element{'s' * (d != 1)} (indices 0 to {d - 1} into its flattened shape; no negative "
                         "indices).")
    if len(set(dims)) != len(dims):
        raise ValueError(f"chunkjac: {name}={list(dims)} repeats a coordinate; name each once.")
    return dims


def _random(samples, seed, distribution) -> tuple | None:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"chunkjac: distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
    if samples is None:
        if seed is not None:
            raise ValueError("chunkjac: seed= is given without samples=; pass samples=k for a randomized estimate "
                             "from k random directions per sample (seed=None with samples=None is exact).")
        return None
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral) or samples < 1:
        raise ValueError(f"chunkjac: samples must be a positive int (random directions per sample) or None for "
                         f"the exact operator; got {samples!r}.")
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"chunkjac: seed must be a non-negative int, got {seed!r}.")
    return int(samples), int(seed), distribution


def _weights(weights, m: int, batch: int | None):
    """(shared (m, m) float64, per-sample (B, m, m)) from weights=; checked symmetric."""
    if weights is None:
        return None, None
    if not isinstance(weights, torch.Tensor):
        try:
            import numpy as np
            if isinstance(weights, np.ndarray):
                weights = torch.from_numpy(weights)
        except ImportError:  # pragma: no cover
            pass
    if not isinstance(weights, torch.Tensor) or not (weights.is_floating_point() or not weights.is_complex()):
        raise TypeError(f"chunkjac: weights must be a real (d, d) tensor (or (B, d, d), one per sample); got "
                        f"{describe(weights)}.")
    w = weights.detach().to("cpu", torch.float64)
    shared = w.dim() == 2 and tuple(w.shape) == (m, m)
    per = w.dim() == 3 and tuple(w.shape[1:]) == (m, m) and (batch is None or w.shape[0] == batch)
    if not (shared or per):
        want = f"({m}, {m})" + (f" or ({batch}, {m}, {m})" if batch is not None else "")
        raise ValueError(f"chunkjac: weights has shape {tuple(weights.shape)}, but the operator acts on {m} "
                         f"coordinate{'s' * (m != 1)} (dims=, else every element of the input): expected {want}.")
    if not torch.isfinite(w).all():
        raise ValueError("chunkjac: weights holds inf or nan.")
    asym = (w - w.transpose(-1, -2)).abs().max().item() if w.numel() else 0.0
    if asym > 1e-10 * max(1.0, w.abs().max().item() if w.numel() else 0.0):
        raise ValueError(f"chunkjac: weights must be symmetric (sum_jk C_jk d2u/dx_j dx_k only sees (C + C^T) / 2); "
                         f"it differs from its transpose by {asym:.3g}. Pass (C + C.T) / 2.")
    return (w, None) if shared else (None, w)


def _eigh(w: torch.Tensor):
    vals, vecs = torch.linalg.eigh(w)
    return vals, vecs


def _root_psd(w: torch.Tensor) -> torch.Tensor:
    vals, vecs = _eigh(w)
    return vecs * vals.clamp_min(0).sqrt()


def _digest(t: torch.Tensor | None) -> tuple:
    if t is None:
        return ()
    a = t.detach().to("cpu", torch.float64).contiguous()
    return (tuple(a.shape), hashlib.sha256(a.numpy().tobytes()).hexdigest()[:24])


# -- directions drawn per sample ---------------------------------------------------------------------

def _drawn(op: Operator, start: int, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(K, n, D) directions of samples start ... start + n - 1: depend on the sample's index in the
    batch only (never on the chunking, the budget or the process), drawn on the CPU."""
    d = op.dims
    coords = op.__dict__.get("_coords", list(range(d)))
    every = len(coords) == d
    coords = torch.tensor(coords, dtype=torch.long)
    m = len(coords)
    if op.weights is not None:  # per-sample weights: positive and negative factors
        out = torch.zeros((op.num_directions, n, d), dtype=torch.float64)
        w = op.weights[start:start + n]
        vals, vecs = torch.linalg.eigh(w)                       # (n, m), (n, m, m)
        pos = vecs * vals.clamp_min(0).sqrt().unsqueeze(1)      # columns scaled
        neg = vecs * (-vals).clamp_min(0).sqrt().unsqueeze(1)
        out[:m, :, coords] = pos.permute(2, 0, 1)
        out[m:, :, coords] = neg.permute(2, 0, 1)
        return out.to(dtype)
    k, seed, dist = op.random
    root = op.__dict__.get("_root")
    axes = op.__dict__.get("_axes", 0)
    v = random_directions(seed, start, n, k, m, dist, torch.float64 if root is not None else dtype)  # (k, n, m)
    if root is not None:                                        # weights C = R R^T: directions R v
        v = torch.einsum("ij,knj->kni", root, v).to(dtype)
    scale = op.__dict__.get("_scale", 1.0)
    if scale != 1.0:
        v = v.mul_(scale)
    if every and not axes:
        return v
    out = torch.zeros((op.num_directions, n, d), dtype=dtype)
    out[:k, :, coords] = v
    if axes:
        out[k:, :, coords] = torch.eye(m, dtype=dtype).unsqueeze(1).expand(m, n, m)
    return out


_MASK = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32), on int64 tensors holding 32-bit values: products wrap, and
    only their low 32 bits are kept, so the result is the same on every device."""
    x = x & _MASK
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def _stream(seed: int, start: int, n: int, k: int, words: int) -> torch.Tensor:
    """(k, n, words) 32-bit words for samples start ... start + n - 1, directions 0 ... k - 1."""
    i = torch.arange(start, start + n, dtype=torch.int64)
    h = _mix(torch.tensor(seed & _MASK, dtype=torch.int64) ^ _mix(torch.tensor((seed >> 32) & _MASK)))
    h = _mix(h ^ (i & _MASK))
    h = _mix(h ^ ((i >> 32) & _MASK) ^ 0x5BD1E995)                       # (n,)
    h = _mix(h.unsqueeze(0) ^ torch.arange(k, dtype=torch.int64).unsqueeze(1) * 0x9E3779B1)  # (k, n)
    return _mix(h.unsqueeze(-1) ^ (torch.arange(words, dtype=torch.int64) * 0x85EBCA6B + 0x27D4EB2F))


_SIGNS = 1.0 - 2.0 * ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.float64)  # byte -> 8 signs


def random_directions(seed: int, start: int, n: int, k: int, m: int, distribution: str,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(k, n, m): Rademacher (+-1) or standard Gaussian entries, a function of (seed, sample index,
    direction, coordinate) only (the Gaussian ones computed in float64, then rounded to ``dtype``)."""
    if m == 0:
        return torch.zeros((k, n, 0), dtype=dtype)
    if distribution == "rademacher":
        words = _stream(seed, start, n, k, -(-m // 32))            # (k, n, w): coordinate 32 w + bit
        octets = torch.stack([(words >> (8 * i)) & 255 for i in range(4)], -1)  # (k, n, w, 4)
        return _SIGNS.to(dtype)[octets].reshape(k, n, -1)[..., :m]
    words = _stream(seed, start, n, k, 2 * (-(-m // 2)))                # two words per pair of entries
    u = (words.to(torch.float64) + 0.5) / 2.0 ** 32                   # (0, 1)
    u1, u2 = u[..., 0::2], u[..., 1::2]
    r = torch.sqrt(-2.0 * torch.log(u1))
    z = torch.stack([r * torch.cos(2 * math.pi * u2), r * torch.sin(2 * math.pi * u2)], -1)
    return z.reshape(k, n, -1)[..., :m].to(dtype)


# -- what a call names ----------------------------------------------------------------------------

BUILDERS = {"laplacian": laplacian, "bilaplacian": bilaplacian, "divergence": divergence, "derivatives": derivatives}


@dataclass(frozen=True, eq=False)
class Builder:
    """An operator named by a call (``chunkjac.laplacian(..., dims=...)``, or ``chunkjac.operator``
    for ``chunkjac.plan(part=...)``), made once the per-sample input's shape is known."""

    name: str
    options: tuple  # ((keyword, value), ...)

    def __call__(self, in_shape: tuple, batch: int) -> Operator:
        kw = dict(self.options)
        if self.name == "laplacian":
            return laplacian(tuple(in_shape), batch=batch, **kw)
        return BUILDERS[self.name](tuple(in_shape), **kw)

    def __repr__(self) -> str:
        return f"chunkjac.operator({self.name!r}, {', '.join(f'{k}={v!r}' for k, v in self.options)})"


def operator(name: str, **options) -> Builder:
    """The operator of ``chunkjac.<name>(fn, x, **options)``, to pass as ``chunkjac.plan(fn, x, part=...)``."""
    if name not in BUILDERS:
        raise ValueError(f"chunkjac: operator name must be one of {tuple(BUILDERS)}, got {name!r}; hessian's parts "
                         "are passed to chunkjac.plan as part='full', 'diagonal' or 'laplacian'.")
    import inspect
    allowed = [p for p in inspect.signature(BUILDERS[name]).parameters if p not in ("in_shape", "batch", "out_shape")]
    bad = [k for k in options if k not in allowed]
    if bad:
        raise TypeError(f"chunkjac.operator({name!r}) got an unexpected keyword argument {bad[0]!r}; it takes: "
                        f"{', '.join(allowed)}.")
    return Builder(name, tuple(options.items()))
