"""Device memory: where to compute, how much is free there, and how much a piece of work peaks at."""
from __future__ import annotations

import contextlib

import psutil
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _nvml_free(index: int) -> int | None:
    """Free bytes on GPU ``index`` by NVML, or None where pynvml or the NVIDIA driver is missing."""
    try:
        import pynvml
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).free)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # ImportError, NVMLError (no driver), anything else: "no GPU" as far as NVML knows
        return None


def free_bytes(device: torch.device) -> int:
    """Memory chunkjac may use on ``device`` now: the host's available RAM, or the GPU's free memory
    plus what PyTorch's caching allocator holds but does not use."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        nvml = _nvml_free(index)  # NVML sees other processes' use too; take the stricter figure
        if nvml is not None:
            free = min(free, nvml)
        return int(free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index))
    return int(psutil.virtual_memory().available)


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once, counted at every operator (forward and backward).

    Storages that exist when tracking starts (inputs, weights) are not counted: the figure is what
    the tracked work allocates. Freed storages are noticed through weak references.
    """

    def __init__(self, existing=()):
        super().__init__()
        self.existing = {_storage_key(t) for t in existing}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        known = set(self.existing)
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                with contextlib.suppress(RuntimeError):
                    known.add(t.untyped_storage().data_ptr())
        out = func(*args, **(kwargs or {}))
        for k in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(k)[1]
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            try:  # functorch wrappers (jvp duals, vmap batches) have no storage of their own
                st = t.untyped_storage()
                key = st.data_ptr()
            except RuntimeError:
                continue
            if key and key not in known and key not in self.live:
                self.live[key] = (StorageWeakRef(st), st.nbytes())
                self.current += st.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def _storage_key(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except RuntimeError:
        return 0


def measure_peak(work, device: torch.device, existing=()) -> tuple[int, object]:
    """(peak bytes allocated while ``work()`` runs, its result). CUDA: the allocator's own peak.

    On the CPU, storages of the ``existing`` tensors (inputs, weights) are not counted even where the
    work makes new views of them.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, result
    with _LiveBytes(existing) as tracker:
        result = work()
    return tracker.peak, result
