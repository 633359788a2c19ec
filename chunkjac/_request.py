"""One validated call: every argument of ``compute``, ``plan``, ``hessian`` and ``laplacian`` checked in
one place, before any work, into a frozen :class:`Request` that the rest of the pipeline reads.

What fn and the inputs are (the batch, the targets, the device) is normalised into a ``Spec`` by
``_spec.normalize``; the options of the run (budget, chunks, time limit, where the result goes, a
recorded plan) are checked here. What can only be checked against fn's output (``out=`` tensors of
the result's shape, a dump's disk space) is checked right after the first probe, still before any
planning (see ``_call``). Errors name the argument, what was expected, what was got, what to do.
"""
from __future__ import annotations

import dataclasses
import numbers
import os
from dataclasses import dataclass
from typing import Any

import torch

from ._budget import check_budget
from ._errors import describe
from ._plan import Plan
from ._spec import Spec, normalize


@dataclass(frozen=True, eq=False)
class Request:
    """A validated call. ``spec``: fn, the inputs, what to differentiate; the rest: the run's options
    as given (``budget`` and ``coupling`` as the user wrote them: they key remembered decisions)."""

    api: str                    # "compute", "plan", "hessian" or "laplacian": for messages
    spec: Spec
    coupling: Any               # as given (the Coupling itself is spec.coupling)
    budget: Any                 # as given; bytes are decided with the free memory at planning time
    chunk_size: int | None
    progress: bool | None
    max_seconds: float | None
    out: Any                    # None, a path (str), a tensor, or a tuple/dict of tensors
    resume: bool
    plan: Plan | None
    check_coupling: bool
    given: dict = dataclasses.field(default_factory=dict, repr=False)  # the arguments as passed, for remake

    @property
    def dump(self) -> bool:
        """The result goes to a file or folder on disk."""
        return isinstance(self.out, str)

    def with_plan(self, plan: Plan) -> "Request":
        return dataclasses.replace(self, plan=plan)

    def remake(self, **changes) -> "Request":
        """The same call with some arguments changed, validated again."""
        return make(self.api, **{**self.given, **changes})


def make(api: str, fn, inputs, *, wrt=0, output=None, in_dims=0, mode="auto", coupling="auto",
         create_graph=False, return_outputs=False, budget=None, device=None, chunk_size=None, progress=None,
         max_seconds=None, out=None, resume=True, plan=None, flat=False, part=None, return_jacobian=False,
         check_coupling=True, project=None) -> Request:
    """The call as a :class:`Request`, or the first thing wrong with it (TypeError, ValueError)."""
    given = dict(fn=fn, inputs=inputs, wrt=wrt, output=output, in_dims=in_dims, mode=mode, coupling=coupling,
                 create_graph=create_graph, return_outputs=return_outputs, budget=budget, device=device,
                 chunk_size=chunk_size, progress=progress, max_seconds=max_seconds, out=out, resume=resume, plan=plan,
                 flat=flat, part=part, return_jacobian=return_jacobian, check_coupling=check_coupling, project=project)
    if budget is not None:
        check_budget(budget)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
                                   or chunk_size < 1):
        raise ValueError(f"chunkjac: chunk_size must be a positive int or None, got {chunk_size!r}.")
    if max_seconds is not None and not _positive_number(max_seconds):
        raise ValueError(f"chunkjac: max_seconds must be a positive number or None, got {max_seconds!r}.")
    for name, v in (("create_graph", create_graph), ("return_outputs", return_outputs), ("resume", resume),
                    ("flat", flat), ("return_jacobian", return_jacobian), ("check_coupling", check_coupling)):
        if type(v) is not bool and (not isinstance(v, numbers.Integral) or v not in (0, 1)):
            raise TypeError(f"chunkjac: {name} must be True or False, got {describe(v)}.")
    if progress is not None and (not isinstance(progress, (bool, numbers.Integral)) or progress not in (0, 1)):
        raise TypeError(f"chunkjac: progress must be True, False or None, got {describe(progress)}.")
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"chunkjac: plan must be a chunkjac.Plan (from chunkjac.plan(...)) or None, got "
                        f"{describe(plan)}.")
    out = _check_out_kind(out)
    spec = normalize(fn, inputs, wrt=wrt, output=output, in_dims=in_dims, mode=mode, coupling=coupling,
                     create_graph=create_graph, return_outputs=return_outputs, device=device, part=part,
                     return_jacobian=return_jacobian, flat=flat, to_memory=out is None, project=project)
    _check_out(spec, out)
    return Request(api=api, spec=spec, coupling=coupling, budget=budget,
                   chunk_size=None if chunk_size is None else int(chunk_size), progress=progress,
                   max_seconds=max_seconds, out=out, resume=bool(resume), plan=plan, check_coupling=bool(check_coupling),
                   given=given)


def _positive_number(v) -> bool:
    real = type(v) in (int, float) or isinstance(v, numbers.Real) and not isinstance(v, bool)
    return real and v > 0


def _check_out_kind(out):
    """out=: None, a path (str or os.PathLike, returned as str), a tensor, or a tuple/list/dict of tensors."""
    if out is None or isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (str, os.PathLike)):
        return os.fspath(out)
    if isinstance(out, (tuple, list)) and out and all(isinstance(o, torch.Tensor) for o in out):
        return tuple(out)
    if isinstance(out, dict) and out and all(isinstance(o, torch.Tensor) for o in out.values()):
        return out
    raise TypeError(f"chunkjac: out must be None, a path to a .npy file (or a folder, for a dict result), a "
                    f"preallocated tensor, or a tuple/dict of them; got {describe(out)}.")


def _check_out(spec: Spec, out) -> None:
    """What out= can be checked for before fn runs: how it fits the call, where it goes, and tensors
    PyTorch could not write into."""
    if out is None:
        return
    if spec.create_graph:
        raise ValueError("chunkjac: out= cannot hold Jacobians on the autograd graph; leave out=None with "
                         "create_graph=True.")
    if spec.flat:
        raise ValueError("chunkjac: flat=True with out=: dump the dict instead (out='folder/' writes one .npy per "
                         "parameter) and concatenate afterwards, or leave out=None.")
    if isinstance(out, str):
        _check_path(spec, out)
        return
    tensors = out if isinstance(out, tuple) else tuple(out.values()) if isinstance(out, dict) else (out,)
    if isinstance(out, dict) and spec.keys is None:
        raise TypeError(f"chunkjac: out is a dict, but the result is {'a tensor' if spec.single else 'a tuple'}; "
                        "pass a tensor (or a tuple of them, one per wrt).")
    if isinstance(out, dict) and set(out) != set(spec.keys):
        raise ValueError(f"chunkjac: out is a dict with keys {sorted(map(str, out))}, but the result's keys are "
                         f"{list(spec.keys)}; give one preallocated tensor per key.")
    if len(tensors) != (1 if spec.single else spec.results):
        want = "a tensor" if spec.single else (f"a tuple of {spec.results} tensors (one per wrt)" if spec.part is None
                                               else "a tuple of 2 tensors (the second derivatives, the Jacobian)")
        raise TypeError(f"chunkjac: out must be {want} or a path to a .npy file, got {describe(out)}.")
    for k, o in enumerate(tensors):
        name = "out" if len(tensors) == 1 else f"out[{k}]"
        if o.requires_grad:
            raise ValueError(f"chunkjac: {name} requires grad; out= takes plain tensors (use .detach()).")
        if o.layout != torch.strided:
            raise TypeError(f"chunkjac: {name} is a {o.layout} tensor; out= takes dense tensors.")
        if torch._debug_has_internal_overlap(o) != 0:  # 1: overlaps, 2: too complex to tell
            raise ValueError(
                f"chunkjac: {name} has elements that share memory (strides {tuple(o.stride())}, e.g. made by "
                "expand()), so one result entry would overwrite another. Pass a tensor with memory of its own, "
                "e.g. torch.empty(shape, dtype=...).")


def _check_path(spec: Spec, path: str) -> None:
    if spec.return_outputs:
        raise ValueError("chunkjac: return_outputs=True with a dump: the outputs are not stored in the file, "
                         "and a resumed dump does not recompute them. Compute them separately.")
    if spec.keys is not None:  # a dict result: a folder, one .npy per key
        if path.endswith(".npy"):
            raise ValueError(f"chunkjac: out={path!r} names a .npy file, but the result is a dict (one array per "
                             "parameter): pass a folder (out='jacobians/'), which gets one .npy per key and a "
                             "manifest.")
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"chunkjac: out={path!r} is a file; a dict result (one array per parameter) is dumped "
                             "into a folder: pass a folder path (it is created if missing).")
        parent = os.path.dirname(os.path.abspath(path.rstrip("/\\")))
        if not os.path.isdir(parent):
            raise FileNotFoundError(f"chunkjac: cannot create {path}: the directory {parent} does not exist.")
        where = path if os.path.isdir(path) else parent
        if not os.access(where, os.W_OK):
            raise PermissionError(f"chunkjac: cannot write into {where}: it is not writable.")
        return
    if not path.endswith(".npy"):
        raise ValueError(f"chunkjac: out={path!r} is a path but not to a .npy file; end it with .npy.")
    if not spec.single:
        raise ValueError("chunkjac: out='….npy' holds one result; with several wrt (or return_jacobian=True), dump "
                         "each to its own file (one call each), or pass out=<a tuple of tensors>.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"chunkjac: cannot write {path}: the directory {folder} does not exist.")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"chunkjac: cannot write {path}: the directory {folder} is not writable.")
