"""The exceptions chunkjac raises besides ValueError/TypeError (exported from chunkjac)."""
import torch


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


class DistributedError(RuntimeError):
    """A sharded dump (torchrun) failed on one of its processes: the message names the rank and its
    error; the chunks every rank finished are on disk, and running again resumes."""


class TooLongError(RuntimeError):
    """A coupled plan is predicted to take longer than ``max_seconds``; the message gives the estimate
    and what would make it faster."""
