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
