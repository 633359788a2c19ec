"""Sinks: where finished chunks go: memory, tensors the caller allocated (out=), a .npy file."""
from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from . import _manifest


class MemorySink:
    """Collects chunk results into (B, *out, *in) tensors.

    A single-chunk run returns the strategy's tensors as they are (no copy). Several chunks are
    copied into tensors allocated at the first chunk; with ``create_graph`` they are concatenated
    instead, so the result stays differentiable.
    """

    def __init__(self, batch_size: int, differentiable: bool, keep_outputs: bool, device: torch.device):
        self.batch_size = batch_size
        self.device = device
        self.differentiable = differentiable
        self.keep_outputs = keep_outputs
        self._jacs: list | None = None
        self._parts: list[list[torch.Tensor]] = []
        self._outputs: list[Any] = []

    def write(self, start: int, stop: int, jacs: list[torch.Tensor], outputs: Any) -> None:
        jacs = [j.to(self.device) for j in jacs]
        if self.keep_outputs:
            self._outputs.append(tree_map(lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v, outputs))
        if start == 0 and stop == self.batch_size:
            self._jacs = [_own_memory(j) for j in jacs]
        elif self.differentiable:
            self._parts.append(list(jacs))
        else:
            if self._jacs is None:
                self._jacs = [j.new_empty((self.batch_size, *j.shape[1:]), device=self.device) for j in jacs]
            for dst, j in zip(self._jacs, jacs):
                dst[start:stop].copy_(j)

    def done(self, unit: int) -> None:
        """Unit ``unit`` of the run is written (a dump records it; memory has nothing to do)."""

    def close(self) -> None:
        """The run is over, finished or not (a dump releases its lock)."""

    def jacobians(self) -> list[torch.Tensor]:
        if self._parts:
            return [torch.cat(p, 0) for p in zip(*self._parts)]
        return self._jacs

    def outputs(self) -> Any:
        """fn's outputs for the whole batch: tensors that carry the batch in their leading dim are
        concatenated; anything else is taken from the first chunk (the planner refuses several chunks
        where a tensor output does not carry the batch, see ``batched_outputs`` in the probe)."""
        if len(self._outputs) == 1:
            return self._outputs[0]
        flat = [tree_flatten(o)[0] for o in self._outputs]
        leaves0, spec = tree_flatten(self._outputs[0])
        merged = []
        for k, leaf in enumerate(leaves0):
            if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
                merged.append(torch.cat([leaves[k] for leaves in flat], 0))
            else:
                merged.append(leaf)
        return tree_unflatten(merged, spec)


def _own_memory(j: torch.Tensor) -> torch.Tensor:
    """A broadcast Jacobian (y = x + 1 gives the same block for every sample, stride 0) would make
    samples share memory; give them their own, as every other result has."""
    if any(st == 0 and sz > 1 for st, sz in zip(j.stride(), j.shape)):
        return j.contiguous()
    return j


class _Staging:
    """Copies of finished chunks from the GPU to host memory that overlap the next chunk's compute:
    into a pinned staging buffer without blocking, then into the destination once the copy's event
    has completed (at the next write, after the next chunk's work was queued). Elsewhere: a copy."""

    def __init__(self):
        self.pending: list = []
        self.buffers: dict = {}

    def copy(self, dst: torch.Tensor, src: torch.Tensor, k: int = 0) -> None:
        """Copy ``src`` into ``dst``; ``k`` numbers the outputs of one write (each its own buffer)."""
        if src.device.type != "cuda" or dst.device.type != "cpu":
            dst.copy_(src)
            return
        key = (tuple(src.shape), dst.dtype, k)  # pending copies are drained before the next write
        stage = self.buffers.get(key)
        if stage is None:
            stage = self.buffers[key] = torch.empty(src.shape, dtype=dst.dtype, pin_memory=True)
        stage.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(src.device))
        self.pending.append((event, stage, dst))

    def drain(self) -> None:
        for event, stage, dst in self.pending:
            event.synchronize()
            dst.copy_(stage)
        self.pending = []


class TensorSink(MemorySink):
    """Writes chunk results into tensors the caller allocated (``out=``), and returns them."""

    def __init__(self, outs: list[torch.Tensor], batch_size: int, keep_outputs: bool, device: torch.device):
        super().__init__(batch_size, differentiable=False, keep_outputs=keep_outputs, device=device)
        self.outs = outs
        self.staging = _Staging()

    def write(self, start: int, stop: int, jacs: list[torch.Tensor], outputs: Any) -> None:
        self.staging.drain()
        if self.keep_outputs:
            self._outputs.append(tree_map(lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v, outputs))
        for k, (dst, j) in enumerate(zip(self.outs, jacs)):
            self.staging.copy(dst[start:stop], j.detach(), k)

    def jacobians(self) -> list[torch.Tensor]:
        self.staging.drain()
        return self.outs


class NpySink(TensorSink):
    """Writes into memory-mapped ``.npy`` files (one per result: a folder dump has several) and keeps their manifest (see [Resuming a dump] in
    _manifest): a chunk is listed as done only after its rows are flushed to the file."""

    COMMIT_SECONDS = 1.0  # list finished chunks at most this often: a crash recomputes at most ~1 s

    def __init__(self, path: str, arrays: list, manifest: dict, batch_size: int, lock=None):
        super().__init__([torch.from_numpy(a) for a in arrays], batch_size, keep_outputs=False,
                         device=torch.device("cpu"))
        self.path, self.arrays, self.manifest, self.lock = path, arrays, manifest, lock
        self.ready: list[int] = []  # chunks written, waiting for their copies to land or the next commit
        self.last = time.monotonic()

    def write(self, start, stop, jacs, outputs) -> None:
        self.staging.drain()  # the previous chunk's rows have landed: list its unit as done
        self._commit()
        super().write(start, stop, jacs, outputs)

    def done(self, unit: int) -> None:
        self.ready.append(unit)
        if not self.staging.pending:
            self._commit()

    def _commit(self, force: bool = False) -> None:
        if not self.ready or self.staging.pending:
            return
        if not force and time.monotonic() - self.last < self.COMMIT_SECONDS:
            return  # an msync and an fsync per small chunk would cost more than the chunk
        for a in self.arrays:
            a.flush()  # msync: the rows are on disk before the manifest says so
        self.manifest["done"].update(self.ready)
        try:
            _manifest.save(self.path, self.manifest)
        except OSError as e:
            self.manifest["done"].difference_update(self.ready)
            raise OSError(
                f"chunkjac: cannot update the manifest of {self.path} ({e.strerror or e}); it still lists only the "
                "chunks written before. Free disk space and run again: the dump resumes from there.") from None
        self.ready = []
        self.last = time.monotonic()

    def saved(self) -> int:
        """After an interruption: the chunks written whole listed too; how many are on disk."""
        self.staging.drain()
        self._commit(force=True)
        return len(self.manifest["done"])

    def jacobians(self) -> list[torch.Tensor]:
        self.staging.drain()
        self._commit(force=True)
        self.manifest["complete"] = len(self.manifest["done"]) == len(self.manifest["chunks"])
        try:
            _manifest.save(self.path, self.manifest)
        except OSError as e:
            raise OSError(f"chunkjac: every chunk of {self.path} is written, but its manifest cannot say so "
                          f"({e.strerror or e}); run again to mark it complete.") from None
        finally:
            self.close()
        return self.outs

    def close(self) -> None:
        """Release the dump's lock (the file stays mapped: the returned tensor shares its memory)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None


class ShardSink(NpySink):
    """One process's part of a sharded dump (see [Sharded dumps] in _distributed): its rows go into
    the shared files with pwrite (byte ranges, never another process's bytes), its finished chunks
    into its own record (see [Records of a shared dump] in _manifest); the manifest is rank 0's, at
    the end."""

    def __init__(self, path: str, arrays: list, manifest: dict, batch_size: int, lock, token: str):
        super().__init__(path, arrays, manifest, batch_size, lock)
        self.token = token
        self.mine: set[int] = set()
        self.fds = [os.open(a.filename, os.O_WRONLY) for a in arrays]
        self.rows = [(a.offset, a.dtype.itemsize * int(a[0].size) if len(a) else 0) for a in arrays]

    def write(self, start, stop, jacs, outputs) -> None:
        self._commit()
        for fd, (offset, row), j in zip(self.fds, self.rows, jacs):
            data = memoryview(j.detach().to("cpu").contiguous().numpy()).cast("B")
            at, done = offset + start * row, 0
            while done < len(data):  # pwrite may write less than asked (2 GB at most on Linux)
                done += os.pwrite(fd, data[done:], at + done)

    def done(self, unit: int) -> None:
        self.ready.append(unit)
        self._commit()

    def _commit(self, force: bool = False) -> None:
        if not self.ready or (not force and time.monotonic() - self.last < self.COMMIT_SECONDS):
            return
        for fd in self.fds:
            os.fsync(fd)  # the rows are on disk before the record says so
        self.mine.update(self.ready)
        try:
            _manifest.save_record(self.path, self.token, self.mine)
        except OSError as e:
            self.mine.difference_update(self.ready)
            raise OSError(f"chunkjac: cannot update this process's record of {self.path} ({e.strerror or e}); it "
                          "still lists only the chunks written before. Free disk space and run again: the dump "
                          "resumes from there.") from None
        self.ready = []
        self.last = time.monotonic()

    def jacobians(self) -> list[torch.Tensor]:
        self._commit(force=True)
        return self.outs

    def saved(self) -> int:
        self._commit(force=True)
        return len(self.manifest["done"] | self.mine)

    def close(self) -> None:
        if self.fds:
            try:  # chunks already written whole (a failure elsewhere stops this rank between chunks)
                self._commit(force=True)
            except OSError:
                pass
        for fd in self.fds:
            os.close(fd)
        self.fds = []
        super().close()
