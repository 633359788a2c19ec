"""Device memory: where to compute, how much is free there, and how much a piece of work peaks at."""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
import warnings

import psutil
import torch


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


FREE_TTL = 1.0  # seconds a reading of free memory is reused (see free_bytes)
_free_readings: dict[str, tuple[float, int]] = {}  # device -> (monotonic time, bytes): an explicit cache


def free_bytes(device: torch.device) -> int:
    """Memory chunkjac may use on ``device`` now: the host's available RAM, or the GPU's free memory
    plus what PyTorch's caching allocator holds but does not use. A reading is reused for FREE_TTL
    seconds: reading /proc/meminfo (or NVML) costs about a millisecond, a tax on every call of a
    training loop, while the budget it feeds only needs to be right to the second."""
    now = time.monotonic()
    last = _free_readings.get(str(device))
    if last is not None and now - last[0] < FREE_TTL:
        return last[1]
    free = _read_free(device)
    _free_readings[str(device)] = (now, free)
    return free


def _read_free(device: torch.device) -> int:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        nvml = _nvml_free(index)  # NVML sees other processes' use too; take the stricter figure
        if nvml is not None:
            free = min(free, nvml)
        return int(free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index))
    return int(psutil.virtual_memory().available)


# NOTE: [Counting CPU memory without the dispatcher]
# The CPU peak is counted from the allocator's own reports: PyTorch's (legacy, CPU-only) profiler with
# profile_memory records every allocation and free of the CPU allocator with its size, and the
# running sum of those records peaks where the work's live bytes peak. The profiler observes
# allocations below every dispatch key, so it sees inside torch.func.jvp and vmap without taking part
# in them. An earlier TorchDispatchMode did take part, and PyTorch segfaults for some ops under a
# dispatch mode inside functorch transforms (addr/addcmul/addcdiv with a scalar, ldexp: see
# tests/test_memory.py); a measurement must never be able to take the user's process down. The same
# figure as the dispatch mode on the probes measured here (5,644,036 bytes for a PINN MLP's batched
# VJP, both ways), at about 1.4x the work's time on small ops. Where the profiler cannot start (the
# user is profiling already), the figure is the growth of the process's resident memory instead.
# The allocator logs "Memory block of unknown size was allocated before the profiling started" to
# the process's stderr (C++, not a Python warning) when a tensor made before the window is freed
# inside it; that line is PyTorch's business, not the user's, so stderr is held during the window
# and passed on without it.


class _HeldStderr:
    """File descriptor 2, held in a temp file while any thread measures (the profiler is per thread,
    fd 2 is per process): the first to enter holds it, the last to leave puts it back and passes on
    what was written, less lines with ``needle``. A lock orders the swaps: two threads saving and
    restoring fd 2 each on their own left it pointing at a deleted temp file."""

    def __init__(self):
        self.lock = threading.Lock()
        self.depth = 0
        self.saved: int | None = None
        self.held = None

    @contextlib.contextmanager
    def without(self, needle: bytes):
        with self.lock:
            if self.depth == 0:
                try:
                    sys.stderr.flush()
                    saved = os.dup(2)
                except (OSError, ValueError, AttributeError):  # no real stderr: nothing to hold
                    saved = None
                if saved is not None:
                    self.held = tempfile.TemporaryFile()
                    os.dup2(self.held.fileno(), 2)
                self.saved = saved
            self.depth += 1
        try:
            yield
        finally:
            with self.lock:
                self.depth -= 1
                if self.depth == 0 and self.saved is not None:
                    with contextlib.suppress(Exception):
                        sys.stderr.flush()
                    os.dup2(self.saved, 2)
                    os.close(self.saved)
                    self.held.seek(0)
                    kept = b"".join(line for line in self.held if needle not in line)
                    self.held.close()
                    self.saved = self.held = None
                    if kept:
                        os.write(2, kept)


_held_stderr = _HeldStderr()  # one per process, as fd 2 is


def _profiled_peak(work) -> tuple[int, object] | None:
    from torch.autograd import ProfilerConfig, ProfilerState, _disable_profiler_legacy, _enable_profiler_legacy
    from torch._C._profiler import _ExperimentalConfig
    config = ProfilerConfig(ProfilerState.CPU, False, True, False, False, False, _ExperimentalConfig())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _enable_profiler_legacy(config)
    except RuntimeError:  # a profiler is running already: PyTorch allows one at a time
        return None
    try:
        with _held_stderr.without(b"allocated before the profiling started"):
            result = work()
    finally:
        records = _disable_profiler_legacy()
    current = peak = 0
    for thread in records:
        for e in thread:
            if e.kind() == "memory_alloc":  # frees are negative
                current += e.cpu_memory_usage()
                peak = max(peak, current)
    return peak, result


def measure_peak(work, device: torch.device) -> tuple[int, object]:
    """(peak bytes allocated while ``work()`` runs, its result). CUDA: the allocator's own peak.

    On the CPU, bytes the work allocates (see [Counting CPU memory without the dispatcher]): tensors
    that exist before (inputs, weights) and views of them cost nothing.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = work()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, result
    measured = _profiled_peak(work)
    if measured is not None:
        return measured
    process = psutil.Process()
    before = process.memory_info().rss
    result = work()
    return max(process.memory_info().rss - before, 0), result
