"""The exceptions chunkjac raises besides ValueError/TypeError (exported from chunkjac)."""


class BudgetError(MemoryError):
    """The memory budget cannot hold even one sample's work; the message gives the budget that would."""
