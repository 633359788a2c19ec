"""The plan cache: what a run decided, kept on disk for the next process.

# NOTE: [A plan that survives the process]
# A script run every morning, or ``chunkjac dump`` run again, would plan the same call again: the
# planning costs little (see [Planning that costs almost nothing] in _planner), but the run's timing
# of candidates (see [Timing on the run's first chunks] in _executor) is paid again too. As FFTW's
# wisdom and cuDNN's and Triton's autotune caches do, chunkjac keeps what a run decided: one small
# JSON file per call in ``$CHUNKJAC_CACHE_DIR`` or ``$XDG_CACHE_HOME/chunkjac`` (``~/.cache/chunkjac``),
# named by a digest of everything the choice depends on:
#  - fn's structure as the call memo keys it (see [What a remembered decision is keyed on] in _memo),
#    made portable: classes and functions by qualified name, code by its bytecode, constants and
#    names, tensors by shape, dtype and device (their values are not in it: an optimizer step or a
#    new checkpoint keeps the plan); the inputs' shapes, dtypes and batch dims; the call's options;
#  - the device (a GPU by its name), its free memory to a factor of two, the budget to two digits,
#    torch's threads; torch's, chunkjac's and Python's versions.
# An entry holds performance choices only: the strategy, the AD modes, rows or columns per product
# and the chunk size. Everything that makes an answer right is decided again in the new process
# (the coupling check, the forward- and Taylor-mode cross-checks), and the remembered choice must be
# one of the planner's own candidates for the call and run on the first samples; a chunk whose
# recorded peak exceeds today's budget is sized again. So a stale or corrupt entry costs at worst a
# replan, never an answer. Writes are atomic (a temporary file renamed over the entry: two
# processes planning at once each leave a whole entry); an unreadable entry is ignored and
# replaced. Runs under torch.use_deterministic_algorithms(True) neither read nor write it (their
# plan is the cost model's, the same in every process). CHUNKJAC_PLAN_CACHE=0 turns it off;
# ``chunkjac.plan_cache.clear()`` empties it.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import types
from typing import Any

import torch

from . import _version
from ._memo import _Same

FORMAT = "chunkjac-plan/1"
MAX_ENTRIES = 4096  # beyond this many files the oldest go (an entry is a few hundred bytes)
_OFF = {"0", "off", "false", "no"}


class PlanCache:
    """Plans decided by earlier runs, on disk (see [A plan that survives the process]).

    ``path``: the folder; ``enabled = False`` (or the environment's ``CHUNKJAC_PLAN_CACHE=0``)
    neither reads nor writes it; ``clear()`` deletes its entries.
    """

    def __init__(self):
        self.enabled = True
        self.hits = 0

    @property
    def path(self) -> str:
        root = os.environ.get("CHUNKJAC_CACHE_DIR")
        if not root:
            root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                                "chunkjac")
        return os.path.join(root, "plans")

    @property
    def active(self) -> bool:
        return (self.enabled and os.environ.get("CHUNKJAC_PLAN_CACHE", "1").strip().lower() not in _OFF
                and not torch.are_deterministic_algorithms_enabled())

    def key(self, guard: tuple | None, call: tuple, device: torch.device, budget_bytes: int,
            free_bytes: int) -> str | None:
        """The entry's name for a call: ``guard`` from _memo.watch (None: fn cannot be guarded, nothing
        kept), ``call`` the options that shape the plan."""
        if guard is None or not self.active:
            return None
        try:
            h = hashlib.sha256()
            h.update(FORMAT.encode())
            for part in (portable(guard), portable(call), _device_name(device), _two_digits(budget_bytes),
                         int(math.log2(max(free_bytes, 1))), torch.get_num_threads(), torch.__version__,
                         _version.__version__, sys.version_info[:2], platform.machine()):
                h.update(repr(part).encode())
                h.update(b"\0")
        except _Unportable:
            return None
        return h.hexdigest()[:40]

    def load(self, key: str | None) -> dict | None:
        """The choice recorded under ``key``, or None (none, unreadable, or from another version)."""
        if key is None or not self.active:
            return None
        try:
            with open(os.path.join(self.path, key + ".json"), encoding="utf-8") as f:
                entry = json.load(f)
            ok = (entry["format"] == FORMAT and entry["key"] == key and entry["torch"] == torch.__version__
                  and entry["chunkjac"] == _version.__version__ and _valid(entry["plan"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not ok:
            return None
        self.hits += 1
        return entry["plan"]

    def store(self, key: str | None, plan) -> None:
        """Record ``plan``'s choices under ``key`` (atomically; a folder that cannot be written is skipped)."""
        if key is None or not self.active or plan.coupling is not None:
            return
        entry = {"format": FORMAT, "key": key, "torch": torch.__version__, "chunkjac": _version.__version__,
                 "plan": {"strategy": plan.strategy, "modes": list(plan.modes), "rows_per_vjp": plan.rows_per_vjp,
                          "cols_per_jvp": plan.cols_per_jvp, "chunk_size": plan.chunk_size,
                          "peak_bytes": plan.peak_bytes,
                          "part": None if plan.part is None else plan.part.digest}}
        folder = self.path
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".plan-", suffix=".tmp", dir=folder)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(entry, f)
                os.replace(tmp, os.path.join(folder, key + ".json"))
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            self._prune(folder)
        except OSError:
            pass  # a read-only home or a full disk: the plan cache is an optimisation

    def clear(self) -> None:
        """Delete every entry."""
        folder = self.path
        if not os.path.isdir(folder):
            return
        for name in os.listdir(folder):
            if name.endswith(".json") or name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(folder, name))
                except OSError:
                    pass
        self.hits = 0

    @staticmethod
    def _prune(folder: str) -> None:
        names = [n for n in os.listdir(folder) if n.endswith(".json")]
        if len(names) <= MAX_ENTRIES:
            return
        by_age = sorted(names, key=lambda n: _mtime(os.path.join(folder, n)))
        for n in by_age[:len(names) - MAX_ENTRIES]:
            try:
                os.unlink(os.path.join(folder, n))
            except OSError:
                pass


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _valid(p: Any) -> bool:
    from ._strategies import STRATEGIES
    modes = p.get("modes") if isinstance(p, dict) else None
    return (p.get("strategy") in STRATEGIES and isinstance(modes, list)
            and all(m in ("forward", "reverse") for m in modes)
            and all(isinstance(p.get(k), int) and not isinstance(p.get(k), bool) and p[k] >= 1
                    for k in ("rows_per_vjp", "cols_per_jvp", "chunk_size"))
            and isinstance(p.get("peak_bytes"), int) and (p.get("part") is None or isinstance(p.get("part"), str)))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{torch.cuda.get_device_name(index)}"
    return f"{device.type}:{platform.processor() or platform.machine()}:{os.cpu_count()}"


def _two_digits(n: int) -> str:
    return f"{n:.2g}"


class _Unportable(Exception):
    """A key part with no meaning in another process."""


def portable(v) -> Any:
    """``v`` (a guard from _memo, or a call's options) with nothing that names this process: objects
    by their class, code by its content, sets in a fixed order."""
    t = type(v)
    if v is None or t in (bool, int, str, bytes):
        return v
    if t is float:
        return repr(v)
    if isinstance(v, (tuple, list)):
        return tuple(portable(x) for x in v)
    if isinstance(v, (frozenset, set)):
        return ("set",) + tuple(sorted(repr(portable(x)) for x in v))
    if isinstance(v, type):
        return ("type", f"{v.__module__}.{v.__qualname__}")
    if isinstance(v, types.CodeType):
        return ("code", v.co_qualname if hasattr(v, "co_qualname") else v.co_name, _code_digest(v))
    if isinstance(v, _Same):
        obj = v.ref()
        return ("object", None if obj is None else f"{type(obj).__module__}.{type(obj).__qualname__}")
    if isinstance(v, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(v)
    if isinstance(v, (int, float, complex, str)):  # enums, numpy scalars
        return (type(v).__qualname__, repr(v))
    if callable(v):  # builtins named in a guard (torch.sin)
        return ("callable", getattr(v, "__module__", None), getattr(v, "__qualname__", getattr(v, "__name__", None)))
    if isinstance(v, (range, slice, type(Ellipsis), complex)):
        return repr(v)
    r = repr(v)
    if " at 0x" in r:
        raise _Unportable(r)
    return (type(v).__qualname__, r)


_code_digests: dict = {}


def _code_digest(code: types.CodeType) -> str:
    hit = _code_digests.get(code)
    if hit is None:
        h = hashlib.sha256(code.co_code)
        h.update(repr(code.co_names).encode())
        for c in code.co_consts:
            h.update((_code_digest(c) if isinstance(c, types.CodeType) else repr(c)).encode())
        hit = _code_digests[code] = h.hexdigest()[:24]
    return hit
