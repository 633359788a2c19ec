"""The exceptions chunkjac raises besides ValueError/TypeError (exported from chunkjac), and how its
warnings reach the user's line."""
import os
import sys
import warnings

import torch

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the caller of this function point at the
    first frame outside chunkjac: the user's call, however deep inside chunkjac it was issued."""
    level, f = 1, sys._getframe(1)
    while f is not None and f.f_code.co_filename.startswith(_PACKAGE):
        f = f.f_back
        level += 1
    return level


def warn(message: str, category: type[Warning]) -> None:
    """warnings.warn, pointing at the user's line (see user_stacklevel)."""
    warnings.warn(message, category, stacklevel=user_stacklevel())


class BudgetError(MemoryError):
    """The memory budget cannot hold even one sample's work; the message gives the budget that would."""


class RandomFunctionError(RuntimeError):
    """fn draws random numbers, so batched JVPs, one per column, would see different draws."""


def is_out_of_memory(e: BaseException) -> bool:
    """A CUDA out-of-memory error, a MemoryError, or a RuntimeError from a failed CPU allocation."""
    if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def passes_through(e: BaseException) -> bool:
    """Exceptions chunkjac lets go as they are: its own (their message starts "chunkjac:"), out-of-memory
    errors (the executor backs off on them), and those of classes that are neither Python's nor
    PyTorch's: the user's own, which the user's code may be waiting to catch."""
    own = type(e).__module__.split(".")[0] not in ("builtins", "torch")
    return own or str(e).startswith("chunkjac:") or is_out_of_memory(e)


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's first line of text (its class name where it has none), cut at ``limit``."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


def describe(v) -> str:
    """A value as error messages show it: a tensor by dtype and shape, a scalar by its repr."""
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    if type(v).__name__ == "Source":  # an input read chunk by chunk (see _inputs)
        return f"{v.label}, {v.dtype} of shape {tuple(v.shape)}"
    return f"{type(v).__name__} {v!r}" if isinstance(v, (int, float, str, type(None))) else type(v).__name__


class ForwardModeMismatch(ValueError):
    """Forward- and reverse-mode derivatives of fn disagree (see [Why forward mode is cross-checked]);
    ``batched``: every disagreeing target is a batched input, which reverse mode can differentiate."""

    def __init__(self, message: str, batched: bool):
        super().__init__(message)
        self.batched = batched


class CouplingWarning(UserWarning):
    """coupling="auto" found that samples interact and chose a coupled strategy; the message says why
    and how to silence it (name the coupling explicitly)."""


class CouplingError(ValueError):
    """A declared coupling (group ids, a graph) misses interactions between samples: the check found
    two samples that the declaration keeps apart influencing each other; the message says which and
    what to pass instead (``check_coupling=False`` trusts the declaration)."""


class DistributedError(RuntimeError):
    """A sharded dump (torchrun) failed on one of its processes: the message names the rank and its
    error; the chunks every rank finished are on disk, and running again resumes."""


class TooLongError(RuntimeError):
    """A coupled plan is predicted to take longer than ``max_seconds``; the message gives the estimate
    and what would make it faster."""
