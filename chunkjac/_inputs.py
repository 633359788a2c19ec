"""Inputs too large for memory: numpy memmaps and map-style Datasets, read chunk by chunk.

A :class:`Source` stands in for a batched tensor in ``Spec.args``: it has the tensor's shape and
dtype, and ``read(start, stop)`` returns samples [start, stop) as a fresh CPU tensor (a copy, so
that fn may modify its inputs in place without touching a read-only file). Nothing else is read:
a 10^7-sample memmap costs one chunk of memory at a time.
"""
from __future__ import annotations

import math
import threading

import numpy as np
import torch
from torch.utils.data import Dataset

from ._errors import describe


class Source:
    """A batched input read on demand (see the module docstring). ``dim`` is its batch dim."""

    device = torch.device("cpu")
    _array = None  # the numpy array behind an array source

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, dim: int, reader, label: str):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.batch_dim = dim
        self._reader = reader  # (start, stop) -> tensor with the batch in ``dim``
        self.label = label

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def is_complex(self) -> bool:
        return self.dtype.is_complex

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self._reader(start, stop)

    def read_all(self) -> torch.Tensor:
        return self.read(0, self.shape[self.batch_dim])

    def __repr__(self) -> str:
        return f"Source({self.label}, shape={tuple(self.shape)}, dtype={self.dtype})"


def from_memmap(a: np.ndarray, label: str) -> Source:
    """A numpy memmap (or any read-only array): slices along dim 0 copied as they are needed.

    The batch dim is taken as 0 here; ``in_dims`` may move it (``with_batch_dim``)."""
    dtype = torch.from_numpy(np.empty(0, dtype=a.dtype.newbyteorder("="))).dtype
    return _array_source(a, 0, dtype, label)


def _array_source(a: np.ndarray, dim: int, dtype: torch.dtype, label: str) -> Source:
    def read(start: int, stop: int) -> torch.Tensor:
        index = (slice(None),) * dim + (slice(start, stop),)
        part = np.array(a[index], dtype=a.dtype.newbyteorder("="))  # own, native-order memory
        return torch.from_numpy(part)

    src = Source(tuple(a.shape), dtype, dim, read, label)
    src._array = a
    return src


def with_batch_dim(s: Source, dim: int) -> Source:
    """The same source read along another dim (``in_dims``); only arrays can do so."""
    if dim == s.batch_dim:
        return s
    if getattr(s, "_array", None) is None:
        raise ValueError(f"chunkjac: {s.label} is read sample by sample, so its batch dim must be 0; got in_dims {dim}.")
    return _array_source(s._array, dim, s.dtype, s.label)


def is_lazy_array(a) -> bool:
    """numpy arrays chunkjac reads chunk by chunk instead of wrapping: memmaps, and read-only arrays
    (torch.from_numpy would share memory fn must not write to)."""
    return isinstance(a, np.memmap) or (isinstance(a, np.ndarray) and not a.flags.writeable)


def from_dataset(ds: Dataset) -> tuple[Source, ...]:
    """One Source per position of the Dataset's items (a tensor, or a tuple/list of tensors or
    numbers). Items [start, stop) are read once per chunk, whichever column asks first."""
    try:
        n = len(ds)
    except TypeError:
        raise TypeError(
            f"chunkjac: inputs is a {type(ds).__name__} without __len__; chunkjac reads map-style Datasets "
            "(len(ds) and ds[i]). Materialise an IterableDataset into a tensor or a .npy file first.") from None
    if n == 0:
        raise ValueError("chunkjac: inputs is an empty Dataset; there is nothing to differentiate.")
    first = ds[0]
    single = not isinstance(first, (tuple, list))
    items = [first] if single else list(first)
    cols = []
    for k, v in enumerate(items):
        try:
            cols.append(torch.as_tensor(v))
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"chunkjac: item 0 of the Dataset holds {describe(v)} at position {k}; Dataset items must be "
                "tensors, numpy arrays or numbers (or a tuple of those), one per positional input of fn.") from None
    cache = _ChunkCache(ds, single, len(items))
    return tuple(Source((n, *c.shape), c.dtype, 0, (lambda a, b, k=k: cache.column(a, b, k)),
                        f"Dataset item [{k}]" if not single else "Dataset item") for k, c in enumerate(cols))


class _ChunkCache:
    """The last chunk of items read from a Dataset, stacked per column (a lock: the executor reads
    the next chunk in a background thread while the probe or the current chunk may ask too)."""

    def __init__(self, ds, single: bool, width: int):
        self.ds, self.single, self.width = ds, single, width
        self.key = None
        self.cols: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def column(self, start: int, stop: int, k: int) -> torch.Tensor:
        with self.lock:
            if self.key != (start, stop):
                rows = [self.ds[i] for i in range(start, stop)]
                if self.single:
                    rows = [(r,) for r in rows]
                self.cols = []
                for j in range(self.width):
                    try:
                        self.cols.append(torch.stack([torch.as_tensor(r[j]) for r in rows]))
                    except RuntimeError as e:
                        raise ValueError(
                            f"chunkjac: Dataset items {start}..{stop - 1} disagree in shape at position {j} "
                            f"({e}); every item must have the same shapes.") from None
                self.key = (start, stop)
            return self.cols[k].clone()  # the caller's own: fn may write to its inputs
