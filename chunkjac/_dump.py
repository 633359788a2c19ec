"""``out=``: where a run's Jacobians go when not into fresh memory — tensors the caller allocated,
or a ``.npy`` file on disk, created at its final shape, resumable (see [Resuming a dump] in _manifest).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from . import _manifest
from ._budget import format_bytes
from ._errors import BudgetError, describe
from ._memory import free_bytes
from ._plan import Plan
from ._sinks import NpySink, ShardSink, TensorSink
from ._spec import Spec

log = logging.getLogger("chunkjac")
HOST_SHARE = 0.9  # of the free memory a result may fill without out=


@dataclass(frozen=True)
class Output:
    """What the executor needs: the sink, the plan to run (a resumed dump's own), the chunks a dump
    records (None: not a dump), those already on disk, and whether the dump was already complete."""

    sink: object
    plan: Plan
    units: list | None = None
    skip: frozenset = frozenset()
    complete: bool = False


def result_shapes(spec: Spec, plan: Plan) -> list[tuple[int, ...]]:
    return spec.result_shapes(plan.out_shape)


def check_fits_in_memory(spec: Spec, plan: Plan) -> None:
    """Without out=, the result must fit where it goes (the inputs' device): refuse, rather than
    swap the machine to death, and point to a file."""
    need = sum(math.prod(s) for s in result_shapes(spec, plan)) * plan.dtype.itemsize
    free = free_bytes(spec.home)
    if need > HOST_SHARE * free:
        shape = " and ".join(str(s) for s in result_shapes(spec, plan))
        raise BudgetError(
            f"chunkjac: the result, {shape} in {plan.dtype}, takes {format_bytes(need)}, but {spec.home} has "
            f"{format_bytes(free)} free. Write it to disk instead: compute(..., out='jacobians.npy') fills a "
            "memory-mapped .npy file chunk by chunk (resumable), or pass out=<a preallocated tensor>.")


def open_output(spec: Spec, plan: Plan, out, resume: bool, job=None) -> Output:
    """Where the run's results go. ``job``: a sharded dump's (see [Sharded dumps] in _distributed):
    rank 0 creates or resumes the files, the others open what rank 0 made."""
    if out is None:  # new memory: the executor makes it (see execute: one chunk needs no sink)
        check_fits_in_memory(spec, plan)
        return Output(None, plan)
    if isinstance(out, str):  # checked by _request: a .npy path, or a folder for a dict result
        if spec.keys is not None:
            return _open_folder(spec, plan, out, resume, job)
        return _open_npy(spec, plan, out, resume, job)
    outs = tuple(out[k] for k in spec.keys) if isinstance(out, dict) else (out,) if spec.single else tuple(out)
    for k, (o, shape) in enumerate(zip(outs, result_shapes(spec, plan))):
        name = "out" if spec.single else f"out[{k}]"
        if tuple(o.shape) != shape or o.dtype != plan.dtype:
            raise ValueError(
                f"chunkjac: {name} is {describe(o)}, but the result is {plan.dtype} of shape {shape}; allocate "
                f"it as torch.empty({shape}, dtype={plan.dtype}).")
    sink = TensorSink(list(outs), spec.batch_size, keep_outputs=spec.return_outputs, device=spec.home)
    return Output(sink, plan)


def _numpy_dtype(dtype: torch.dtype):
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except TypeError:
        raise TypeError(
            f"chunkjac: the Jacobian is {dtype}, which .npy files cannot hold; cast fn's output to float32 "
            "(e.g. lambda x: model(x).float()) or pass out=<a preallocated tensor>.") from None


def result_dtype(spec: Spec, dtype: torch.dtype) -> torch.dtype:
    """The dtype results are stored in: fn's output's, or a projection's own (float16 dumps)."""
    if spec.project is not None and spec.project.projection.dtype is not None:
        return spec.project.projection.dtype
    return dtype


def finished(spec: Spec, out_shape: tuple, dtype: torch.dtype, out: str, coupling_given: bool) -> list | None:
    """The result tensors of a dump to ``out`` that its manifest says is complete and was written by
    this call (fn, inputs, options: the fingerprint), opened without planning anything; None
    otherwise (the usual path then creates, resumes or refuses it). ``coupling_given``: the call
    declared its coupling, which the fingerprint holds; with coupling="auto" the recorded verdict of
    the earlier run stands, as its recorded plan does for a resume (see [Resuming a dump])."""
    base, files = _files(spec, out_shape, out)
    try:
        m = _manifest.load(base)
    except _manifest.ManifestError:
        return None  # the usual path says what is wrong with it
    if m is None or not (m["complete"] or len(m["done"]) == len(m["chunks"])):
        return None
    dtype = result_dtype(spec, dtype)
    fp = _manifest.fingerprint(spec, files[0][1], dtype)
    if len(files) > 1 or base != files[0][0]:
        fp["result"]["files"] = [os.path.basename(p) for p, _ in files]
        fp["result"]["shapes"] = [list(s) for _, s in files]
    diff = _manifest.differences(m["fingerprint"], fp)
    if diff and (coupling_given or diff != ["coupling"]):
        return None
    want = _numpy_dtype(dtype)
    lock = _lock(base)  # (no other process is writing it: that one would be starting it over)
    try:
        arrays = []
        for f, shape in files:
            try:
                a = np.lib.format.open_memmap(f, mode="r+")
            except (ValueError, OSError):
                return None
            if tuple(a.shape) != tuple(shape) or a.dtype != want:
                return None
            arrays.append(torch.from_numpy(a))
    finally:
        if lock is not None:
            lock.close()
    log.warning("chunkjac: %s is complete (%d of %d chunks); nothing to do.", out, len(m["done"]), len(m["chunks"]))
    return arrays


def _open_npy(spec: Spec, plan: Plan, path: str, resume: bool, job=None) -> Output:
    return _open_files(spec, plan, *_files(spec, plan.out_shape, path), resume, job)


def _open_folder(spec: Spec, plan: Plan, folder: str, resume: bool, job=None) -> Output:
    """out='folder/' for a dict result: folder/<key>.npy per key, one manifest (folder/jacobians.chunkjac.json)."""
    if job is None or job.rank == 0:
        os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"chunkjac: cannot write into {folder}: it is not writable.")
    return _open_files(spec, plan, *_files(spec, plan.out_shape, folder), resume, job)


def _open_files(spec: Spec, plan: Plan, base: str, files: list, resume: bool, job=None) -> Output:
    """A dump into the .npy files ``files`` ((path, shape) each), its manifest and lock at ``base``."""
    dtype = _numpy_dtype(result_dtype(spec, plan.dtype))
    shapes = [s for _, s in files]
    fp = _manifest.fingerprint(spec, shapes[0], result_dtype(spec, plan.dtype))
    if len(files) > 1 or base != files[0][0]:
        fp["result"]["files"] = [os.path.basename(p) for p, _ in files]
        fp["result"]["shapes"] = [list(s) for s in shapes]
    # One process holds the lock; a sharded dump's other ranks write beside rank 0, not against it.
    lock = _lock(base) if job is None or job.rank == 0 else None
    try:
        return _open_locked(spec, plan, base, files, resume, dtype, fp, lock, job)
    except BaseException:
        if lock is not None:
            lock.close()
        raise


def _open_locked(spec: Spec, plan: Plan, path: str, files: list, resume: bool, dtype, fp, lock, job=None) -> Output:
    m = _manifest.load(path)
    attach = job is not None and job.rank != 0  # rank 0 has made or resumed the dump
    if attach and m is None:
        raise _manifest.ManifestError(f"chunkjac: rank {job.rank} finds no manifest of {path}, which rank 0 has just "
                                      "created: the ranks do not share one filesystem at this path. Dump to a "
                                      "filesystem every node mounts at the same path.")
    resume = resume or attach
    if m is not None:
        diff = _manifest.differences(m["fingerprint"], fp)
        if diff:
            raise _manifest.ManifestError(
                f"chunkjac: {path} was written by a different call (its manifest differs in: {', '.join(diff)}). "
                "Nothing was overwritten. Pass another out= path, or delete the file and its manifest "
                f"{_manifest.manifest_path(path)} to start over.")
        for f, _ in files:
            if not os.path.exists(f):
                raise _manifest.ManifestError(
                    f"chunkjac: the manifest {_manifest.manifest_path(path)} exists but {f} does not; delete the "
                    "manifest to start the dump over.")
        if resume:
            arrays = []
            for f, shape in files:
                try:
                    array = np.lib.format.open_memmap(f, mode="r+")
                except (ValueError, OSError) as e:
                    raise _manifest.ManifestError(
                        f"chunkjac: {f} cannot be opened as a .npy file ({e}), though its manifest lists written "
                        "chunks; delete both files to start over.") from None
                if tuple(array.shape) != tuple(shape) or array.dtype != dtype:
                    raise _manifest.ManifestError(
                        f"chunkjac: {f} holds {array.dtype} of shape {tuple(array.shape)}, but its manifest describes "
                        f"{dtype} of shape {tuple(shape)}; delete both files to start over.")
                arrays.append(array)
            # The recorded plan as it was, its trials not timed again: each chunk is computed as an
            # uninterrupted run of that plan computes it.
            p = dataclasses.replace(plan, strategy=m["plan"].get("strategy", plan.strategy),
                                    modes=tuple(m["plan"]["modes"]), rows_per_vjp=m["plan"]["rows_per_vjp"],
                                    cols_per_jvp=m["plan"]["cols_per_jvp"],
                                    chunk_size=max(b - a for a, b in m["chunks"]), trials=())
            sink = _sink(path, arrays, m, spec.batch_size, lock, job)
            done, total = len(m["done"]), len(m["chunks"])
            if m["complete"] or done == total:
                log.warning("chunkjac: %s is complete (%d of %d chunks); nothing to do.", path, done, total)
                return Output(sink, p, m["chunks"], frozenset(m["done"]), complete=True)
            if done:
                log.warning("chunkjac: resuming %s: %d of %d chunks already done.", path, done, total)
            return Output(sink, p, m["chunks"], frozenset(m["done"]))
        log.info("chunkjac: resume=False: starting %s over.", path)
    else:
        for f, _ in files:
            if os.path.exists(f):
                raise FileExistsError(
                    f"chunkjac: {f} exists and has no chunkjac manifest, so it was not written by a dump; chunkjac "
                    "does not overwrite it. Delete it or choose another out= path.")
    return _create(spec, plan, path, files, dtype, fp, lock, job)


class _Lock:
    """An exclusive lock on a dump: ``path + ".chunkjac.lock"``, flock'ed, removed when released (a
    finished or refused dump leaves no lock file behind). Taking it checks that the file locked is
    still the one at the path: a process that opened it just before the holder removed it must not
    hold a lock that nobody else sees."""

    def __init__(self, path: str):
        import fcntl
        self.path = path + ".chunkjac.lock"
        for _ in range(8):
            f = open(self.path, "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                raise BlockingIOError(
                    f"chunkjac: another process is writing {path} (it holds {self.path}); wait for it to finish "
                    "or stop it, then run again to resume.") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.file = f
                return
            f.close()  # the holder removed it as we opened it: lock the new one
        raise BlockingIOError(f"chunkjac: cannot take the lock {self.path}: other processes keep replacing it.")

    def close(self) -> None:
        if self.file is not None:
            try:
                os.unlink(self.path)  # before unlocking: nobody can take a lock on a removed file unseen
            except FileNotFoundError:
                pass
            self.file.close()
            self.file = None


def _lock(path: str):
    """An exclusive lock on the dump (released when the process ends, however it ends): two
    processes filling one file would each list chunks the other may be overwriting."""
    try:
        import fcntl  # noqa: F401
    except ImportError:  # not POSIX: no lock
        return None
    return _Lock(path)


def _check_room(path: str, files: list, itemsize: int) -> None:
    """Refuse a dump the disk cannot hold (a memory-mapped write to a full disk is a SIGBUS)."""
    nbytes = sum(math.prod(shape) for _, shape in files) * itemsize
    folder = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(folder).free
    free += sum(os.path.getsize(f) for f, _ in files if os.path.exists(f))  # starting over: blocks reused
    if nbytes + 65536 * len(files) > free:
        where = files[0][0] if len(files) == 1 else f"the {len(files)} files in {folder}"
        raise OSError(
            f"chunkjac: {where} would take {format_bytes(nbytes)}, but {folder} has {format_bytes(free)} free. Free "
            "disk space or write to another disk.")


def _files(spec: Spec, out_shape: tuple, out: str) -> tuple[str, list]:
    """(manifest base, [(file, shape)]) of a dump to ``out``: one .npy, or one per key in a folder."""
    shapes = spec.result_shapes(out_shape)
    if spec.keys is None:
        return out, [(out, shapes[0])]
    names = [str(k) if not isinstance(k, int) else f"input{k}" for k in spec.keys]
    return os.path.join(out, "jacobians"), [(os.path.join(out, f"{n}.npy"), shape) for n, shape in zip(names, shapes)]


def preflight(spec: Spec, out_shape: tuple, dtype: torch.dtype, out: str) -> None:
    """Before any planning: a new dump the disk cannot hold is refused (fn's output shape is known
    from the first probe; a dump to resume is checked against its own manifest when opened)."""
    base, files = _files(spec, out_shape, out)
    if _manifest.load(base) is None and os.path.isdir(os.path.dirname(os.path.abspath(base))):
        _check_room(base, files, _numpy_dtype(dtype).itemsize)


def _create(spec: Spec, plan: Plan, path: str, files: list, dtype, fp, lock, job=None) -> Output:
    _check_room(path, files, dtype.itemsize)
    # First: a crash from here on leaves no manifest (nor a shared dump's record) claiming old rows.
    for stale in [_manifest.manifest_path(path), *_manifest.records_of(path)]:
        if os.path.exists(stale):
            os.unlink(stale)
    arrays = []
    for f, shape in files:
        try:
            arrays.append(np.lib.format.open_memmap(f, mode="w+", dtype=dtype, shape=tuple(shape)))
            # Reserve every block now: a memory-mapped write to a full disk is a SIGBUS, not an error.
            if hasattr(os, "posix_fallocate"):  # (not on macOS or Windows: the free-space check above only)
                with open(f, "r+b") as fh:
                    os.posix_fallocate(fh.fileno(), 0, os.path.getsize(f))
        except OSError as e:
            if os.path.exists(f):
                os.unlink(f)
            raise OSError(f"chunkjac: cannot create {f} ({format_bytes(math.prod(shape) * dtype.itemsize)}): "
                          f"{e.strerror or e}.") from None
    units = list(plan.chunks())
    m = _manifest.new(fp, units, {"modes": list(plan.modes), "rows_per_vjp": plan.rows_per_vjp,
                                  "cols_per_jvp": plan.cols_per_jvp, "strategy": plan.strategy})
    _manifest.save(path, m)
    return Output(_sink(path, arrays, m, spec.batch_size, lock, job), plan, units)


def _sink(path: str, arrays: list, m: dict, batch_size: int, lock, job) -> NpySink:
    if job is None:
        return NpySink(path, arrays, m, batch_size, lock)
    return ShardSink(path, arrays, m, batch_size, lock, f"{job.token}-{job.rank}")
