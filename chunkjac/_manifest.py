"""The sidecar manifest of a dump to a ``.npy`` file: what produced it, and which chunks are on disk.

# NOTE: [Resuming a dump]
# ``compute(..., out="jac.npy")`` writes ``jac.npy.chunkjac.json`` next to the file: the chunk
# boundaries and AD plan of the run (modes, rows/columns per product), a fingerprint of what
# produced it, and the indices of the chunks whose data is on disk. A chunk is added only after
# its rows are flushed (msync) to the file, and the manifest is replaced atomically (write a
# temporary file, fsync, rename, fsync the directory), so after a crash at any instant the
# manifest claims nothing that is not on disk. A resumed run reuses the boundaries and the plan,
# so each chunk is computed exactly as an uninterrupted run would, and skips the chunks listed.
# The fingerprint covers chunkjac's version, fn (its qualified name; the parameters, buffers and
# tensors of the modules it is or reaches through closures, defaults, partials and globals), the
# inputs (shapes, dtypes, batch dims; the values of tensors and arrays up to 1 GiB, hashed whole;
# for larger ones and Datasets a hash of 17 evenly spaced samples; a memmap's file size and
# mtime), the call (wrt, output, mode, coupling) and the result's shape and dtype; a
# mismatch is refused with the fields that differ, and nothing is written. Not seen: a Dataset or
# a > 1 GiB tensor changed only between the samples hashed.
#
# NOTE: [Records of a shared dump]
# The processes of a sharded dump (see _distributed) each list their finished chunks in a record
# of their own, ``jac.npy.chunkjac.done-<job>-<rank>.json`` (replaced atomically, like the manifest),
# and never write the manifest while the job runs: no process can overwrite another's progress, and
# no lock has to work across the nodes of a shared filesystem (flock on NFS and Lustre is optional).
# ``load`` merges every record into the manifest's chunks done, so a dump killed anywhere resumes
# with any number of processes. A finished run folds the records into the manifest (saved first,
# then the records deleted: a crash between the two leaves records that merge again harmlessly).
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _version
from ._function import reachable_state
from ._inputs import Source

FORMAT = "chunkjac-manifest/1"
SAMPLES_HASHED = 17
HASH_WHOLE_BYTES = 1 << 30  # in-memory inputs up to 1 GiB are hashed whole (sha256: ~1 s per GB)
HASH_BLOCK_BYTES = 32 << 20  # arrays read from files are hashed in blocks of about this size


class ManifestError(ValueError):
    """A manifest that is corrupt, or written by a different call."""


def manifest_path(path: str) -> str:
    return path + ".chunkjac.json"


def record_path(path: str, token: str) -> str:
    """The record of one process of a shared dump (see [Records of a shared dump])."""
    return f"{path}.chunkjac.done-{token}.json"


def records_of(path: str) -> list[str]:
    return sorted(glob.glob(glob.escape(path) + ".chunkjac.done-*.json"))


def fingerprint(spec, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, Any]:
    """What produced a dump (see [Resuming a dump]); JSON-serialisable, compared field by field."""
    fn = spec.fn
    owner = fn if isinstance(fn, nn.Module) else type(fn) if not hasattr(fn, "__qualname__") else fn
    fp: dict[str, Any] = {"chunkjac": _version.__version__,
                          "fn": f"{getattr(owner, '__module__', '')}.{getattr(owner, '__qualname__', type(fn).__qualname__)}"}
    if isinstance(fn, nn.Module):
        fp["fn"] = f"{type(fn).__module__}.{type(fn).__qualname__}"
    h = hashlib.sha256()
    for name, value in reachable_state(fn):
        h.update(name.encode())
        if isinstance(value, nn.Module):
            for k, v in value.state_dict().items():
                h.update(k.encode())
                _hash_tensor(h, v)
            h.update(str([m.training for m in value.modules()]).encode())
        else:
            _hash_tensor(h, value)
    fp["state"] = h.hexdigest()[:32]  # parameters, buffers and tensors fn holds or reaches
    inputs = []
    for a, d in zip(spec.args, spec.in_dims):
        if isinstance(a, (torch.Tensor, Source)):
            h = hashlib.sha256()
            entry = {}
            array = getattr(a, "_array", None)
            whole = math.prod(a.shape) * a.dtype.itemsize <= HASH_WHOLE_BYTES
            if isinstance(a, torch.Tensor) and (d is None or whole):
                _hash_tensor(h, a)  # in memory and not huge: every value
            elif array is not None and whole:  # an array or memmap up to 1 GiB: every value, in blocks
                # (read whole, a 627 MB memmap would be 627 MB of the process's memory that no budget covers)
                b = a.shape[d]
                step = max(1, HASH_BLOCK_BYTES * b // max(1, math.prod(a.shape) * a.dtype.itemsize))
                h.update(str((tuple(a.shape), a.dtype)).encode())
                for i in range(0, b, step):
                    h.update(a.read(i, min(b, i + step)).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                b = a.shape[d]
                for i in sorted({round(k * (b - 1) / (SAMPLES_HASHED - 1)) for k in range(SAMPLES_HASHED)}):
                    part = a.read(i, i + 1) if isinstance(a, Source) else a.narrow(d, i, 1)
                    _hash_tensor(h, part)
            if isinstance(array, np.memmap) and getattr(array, "filename", None):
                st = os.stat(array.filename)  # a rewritten file changes its size or mtime
                entry = {"file": os.path.abspath(array.filename), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            inputs.append({"shape": list(a.shape), "dtype": str(a.dtype), "batch_dim": d,
                           "content": h.hexdigest()[:32], **entry})
        else:
            simple = isinstance(a, (bool, int, float, str, type(None)))
            inputs.append({"value": repr(a)[:200] if simple else type(a).__qualname__})
    fp["inputs"] = inputs
    fp["wrt"] = [t.label for t in spec.targets]
    fp["output"] = repr(spec.output)
    fp["mode"] = spec.mode
    c = spec.coupling
    fp["coupling"] = c if isinstance(c, str) else {
        "kind": c.kind, "colours": None if c.colours is None else _digest(c.colours),
        "bounds": None if c.bounds is None else _digest(torch.from_numpy(np.asarray(c.bounds)))}
    fp["result"] = {"shape": list(shape), "dtype": str(dtype)}
    if spec.project is not None:  # a resume with another projection would mix two
        fp["result"]["project"] = spec.project.describe()
    if spec.part is not None:  # a Hessian's diagonal has a Jacobian's shape: say which it is
        fp["result"]["part"] = f"{spec.part} ({spec.part.full_digest})"
    return fp


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(str((tuple(t.shape), t.dtype)).encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _digest(t: torch.Tensor) -> str:
    h = hashlib.sha256()
    _hash_tensor(h, t)
    return h.hexdigest()[:32]


def differences(a: dict, b: dict) -> list[str]:
    """The top-level fields in which two fingerprints differ (chunkjac's version is one of them)."""
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def load(path: str) -> dict | None:
    """The manifest of the dump at ``path``, None if there is none; corrupt ones raise ManifestError."""
    mp = manifest_path(path)
    if not os.path.exists(mp):
        return None
    try:
        with open(mp, encoding="utf-8") as f:
            m = json.load(f)
        assert m["format"] == FORMAT
        chunks = [tuple(c) for c in m["chunks"]]
        assert chunks and chunks[0][0] == 0, "no chunks, or not from sample 0"
        assert chunks[-1][1] == m["fingerprint"]["result"]["shape"][0], "chunks do not cover the batch"
        assert all(len(c) == 2 and 0 <= c[0] < c[1] for c in chunks)
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:])), "chunks leave gaps"
        assert all(isinstance(i, int) and 0 <= i < len(chunks) for i in m["done"])
        assert isinstance(m["complete"], bool)
        p = m["plan"]
        assert isinstance(p["modes"], list) and isinstance(p["rows_per_vjp"], int) and isinstance(p["cols_per_jvp"], int)
        from ._strategies import STRATEGIES
        assert p.get("strategy", "coloured") in STRATEGIES, f"unknown strategy {p.get('strategy')!r}"
        m["chunks"] = chunks
        m["done"] = set(m["done"])
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
        raise ManifestError(
            f"chunkjac: the manifest {mp} is corrupt or not chunkjac's ({type(e).__name__}: {e}); it cannot say "
            f"which rows of {path} are written. Delete both files to start the dump over.") from None
    m["records"] = records_of(path)
    for rp in m["records"]:
        try:
            with open(rp, encoding="utf-8") as f:
                r = json.load(f)
            assert r["format"] == FORMAT
            assert all(isinstance(i, int) and 0 <= i < len(chunks) for i in r["done"])
        except FileNotFoundError:
            continue  # folded into the manifest by a run that just finished
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise ManifestError(
                f"chunkjac: the record {rp} of a shared dump of {path} is corrupt ({type(e).__name__}: {e}). Delete "
                "it and run again: its chunks are computed again.") from None
        m["done"].update(r["done"])
    return m


def save(path: str, m: dict) -> None:
    """Replace the manifest atomically: a crash leaves the old manifest or the new one, never half.
    Records of a shared dump that ``m`` has merged are deleted after (see [Records of a shared dump])."""
    data = {k: v for k, v in m.items() if k != "records"}
    data.update(done=sorted(m["done"]), chunks=[list(c) for c in m["chunks"]])
    _write_json(manifest_path(path), data)
    for rp in m.get("records", ()):
        try:
            os.unlink(rp)
        except FileNotFoundError:
            pass
    m["records"] = []


def save_record(path: str, token: str, done) -> None:
    """Replace one process's record of the chunks it has written (atomically, as the manifest)."""
    _write_json(record_path(path, token), {"format": FORMAT, "done": sorted(done)})


def _write_json(mp: str, data: dict) -> None:
    folder = os.path.dirname(os.path.abspath(mp))
    fd, tmp = tempfile.mkstemp(prefix=".chunkjac-", suffix=".tmp", dir=folder)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the .npy next to it is not
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, mp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def new(fp: dict, chunks: list[tuple[int, int]], plan: dict) -> dict:
    return {"format": FORMAT, "chunkjac": _version.__version__, "fingerprint": fp, "chunks": list(chunks),
            "plan": plan, "done": set(), "complete": False}
