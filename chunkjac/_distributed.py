"""Sharded dumps: the processes of a ``torch.distributed`` job (torchrun, SLURM) fill one dump together.

# NOTE: [Sharded dumps]
# Under torchrun every process runs the same script, so every process makes the same call
# ``compute(..., out="jac.npy")`` (or ``chunkjac dump``). The call then becomes one job:
#   1. join: each process says which file it dumps; rank 0 decides "shard" when all name the same
#      file, "local" when each names its own (per-rank dumps), an error when some share a file and
#      some do not, and "local" with a warning when not every rank calls within JOIN_SECONDS (a dump
#      made by one rank alone, under ``if rank == 0:``);
#   2. plan: rank 0 plans (coupling check, probes, timings) and publishes the Plan; the others run it
#      as a recorded plan (``plan=``), on their own device, so that every rank has the same chunk
#      boundaries and AD modes, and there is no rank-dependent planning noise;
#   3. open: rank 0 creates the file and its manifest (or loads them to resume), and publishes the
#      chunks and those already done; the others open the same file;
#   4. run: the chunks not done are split into ``world`` contiguous shares, as equal in count as
#      integers allow (no padding, no sample twice); each process writes its rows with pwrite (byte
#      ranges: on a network filesystem a memory-mapped page would carry stale bytes of a neighbour's
#      rows) and lists its finished chunks in its own record (see [Records of a shared dump]);
#   5. end: every process reports success or its error; rank 0 folds the records into the manifest
#      and marks it complete; then every process returns the whole file.
# Coordination goes through the process group's key-value store (the TCPStore that torchrun or
# init_process_group made), not through collectives: it works the same under gloo and NCCL without
# placing objects on devices, it can wait with a timeout (join), look without waiting (a failure on
# another rank stops this one at its next chunk, rather than after its whole share) and count (one
# progress bar for the whole job on rank 0). A process killed outright (SIGKILL, a lost node) cannot
# report: torchrun then stops the others; under a process group made by hand they wait for it until
# WAIT_SECONDS. Either way the chunks on disk stay listed, and a rerun with any number of processes
# finishes only what is missing.
#
# Results in memory (no ``out``, or out=<tensors>) are not sharded: under a process group each rank
# computes its own inputs, as in a data-parallel training loop, where every rank holds its own
# batch. Sharding them would silently change what each rank's call returns.
"""
from __future__ import annotations

import datetime
import os
import pickle
import time
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from ._errors import DistributedError, first_line

JOIN_SECONDS = 120.0    # how long rank 0 waits for every rank's dump call before dumping alone
WAIT_SECONDS = 7 * 24 * 3600.0  # planning and the others' shares take as long as they take
_POLL = 0.02

_calls: dict[tuple, int] = {}  # per process group: the n-th sharded call meets every rank's n-th


@dataclass
class Job:
    """One sharded call: this process's place in it and the store its processes meet in."""

    rank: int
    world: int
    local_rank: int
    store: Any
    prefix: str
    token: str = ""
    todo: list = field(default_factory=list)  # the chunks not done before this run, every rank's

    # -- the store ---------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        return self.prefix + name

    def publish(self, name: str, value: Any) -> None:
        self.store.set(self._key(name), pickle.dumps(value))

    def receive(self, name: str, seconds: float = WAIT_SECONDS, watch: bool = True) -> Any:
        """The value another rank published under ``name``; raises DistributedError when a rank
        fails first (``watch``) and TimeoutError after ``seconds``."""
        key, failed = self._key(name), self._key("failed")
        deadline = time.monotonic() + seconds
        while True:
            if self.store.check([key]):
                return pickle.loads(self.store.get(key))
            if watch and self.store.check([failed]):
                raise self._elsewhere()
            if time.monotonic() > deadline:
                raise TimeoutError(name)
            time.sleep(_POLL)

    # -- failures -------------------------------------------------------------------------------
    def fail(self, e: BaseException) -> None:
        """Tell the other ranks this one failed (the first failure is the one they report)."""
        why = f"rank {self.rank}: {_said(e)}"
        try:
            self.store.compare_set(self._key("failed"), "", why)
            self.store.set(self._key(f"end/{self.rank}"), pickle.dumps(why))
        except Exception:  # noqa: BLE001 - the store itself is gone: the launcher stops the job
            pass

    def check(self) -> None:
        """Between chunks: stop when another rank has failed."""
        if self.store.check([self._key("failed")]):
            raise self._elsewhere()

    def _elsewhere(self) -> DistributedError:
        why = self.store.get(self._key("failed")).decode()
        return DistributedError(
            f"chunkjac: a sharded dump failed on {why}. This process (rank {self.rank} of {self.world}) stopped "
            "after its chunks in flight; the chunks every rank finished are on disk. Fix the cause and run the "
            "same command again (with any number of processes): it resumes.")

    def own_error(self, e: Exception) -> DistributedError:
        return DistributedError(f"chunkjac: rank {self.rank} of {self.world} failed in a sharded dump: {_said(e)}")

    # -- the work -------------------------------------------------------------------------------
    def share(self, todo: list[int]) -> list[int]:
        """This rank's contiguous share of the chunks ``todo`` (see [Sharded dumps], step 4)."""
        return shares(todo, self.world)[self.rank]

    def progress(self, n: int) -> int:
        """Add n samples to the job's count; the samples all ranks have finished so far."""
        return self.store.add(self._key("samples"), n)

    def finish(self, fold) -> None:
        """Every rank reports; rank 0 waits for all, raises the first failure, runs ``fold`` (the
        manifest is complete) and lets the others return."""
        self.store.set(self._key(f"end/{self.rank}"), pickle.dumps(None))
        if self.rank == 0:
            for r in range(1, self.world):
                why = self.receive(f"end/{r}", watch=False)
                if why is not None:
                    raise self._elsewhere()
            fold()
            self.publish("folded", True)
        else:
            self.receive("folded")


def shares(todo: list[int], world: int) -> list[list[int]]:
    """``todo`` cut into ``world`` contiguous runs whose lengths differ by at most one."""
    n = len(todo)
    return [todo[r * n // world:(r + 1) * n // world] for r in range(world)]


def _group():
    """(rank, world, local_rank, store) of this process's group, after initialising it from
    torchrun's environment when the user did not; None for a single process."""
    if not torch.distributed.is_available():
        return None
    dist = torch.distributed
    if not dist.is_initialized():
        env = os.environ
        if int(env.get("WORLD_SIZE", "1")) <= 1 or not all(k in env for k in ("RANK", "MASTER_ADDR", "MASTER_PORT")):
            return None
        # As torchrun's workers do it themselves: NCCL for CUDA tensors, gloo for the rest.
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=WAIT_SECONDS))
    if dist.get_world_size() == 1:
        return None
    from torch.distributed import distributed_c10d
    store = distributed_c10d._get_default_store()
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank() % max(1, torch.cuda.device_count() or 1)))
    return dist.get_rank(), dist.get_world_size(), local, store


def join(out) -> Job | None:
    """The sharded job a dump to ``out`` belongs to, or None (one process, results in memory, or
    each rank dumping its own file): step 1 of [Sharded dumps]."""
    if not isinstance(out, (str, os.PathLike)):
        return None
    g = _group()
    if g is None:
        return None
    rank, world, local, store = g
    n = _calls.get(id(store), 0)
    _calls[id(store)] = n + 1
    job = Job(rank, world, local, store, prefix=f"chunkjac/{n}/")
    path = os.path.abspath(os.fspath(out))
    job.publish(f"hello/{rank}", path)
    if rank == 0:
        decision = _decide(job, path)
        job.publish("decision", decision)
    else:
        try:
            decision = job.receive("decision", JOIN_SECONDS + 60.0, watch=False)
        except TimeoutError:
            decision = ("local", "rank 0 made no dump call")
    kind, detail = decision
    if kind == "error":
        raise ValueError(detail)
    if kind == "local":
        if detail:
            warnings.warn(f"chunkjac: {detail} within {JOIN_SECONDS:.0f} s, so rank {rank} dumps {path} on its own.",
                          RuntimeWarning, stacklevel=4)
        return None
    job.token = detail
    return job


def _decide(job: Job, path: str):
    deadline = time.monotonic() + JOIN_SECONDS
    paths = {0: path}
    for r in range(1, job.world):
        try:
            paths[r] = job.receive(f"hello/{r}", max(0.0, deadline - time.monotonic()), watch=False)
        except TimeoutError:
            missing = [q for q in range(1, job.world) if q not in paths]
            return "local", f"rank{'s' * (len(missing) > 1)} {', '.join(map(str, missing))} made no dump call"
    if len(set(paths.values())) == job.world:
        return "local", ""  # each rank its own file: a per-rank dump, as in data-parallel code
    if len(set(paths.values())) > 1:
        seen = "; ".join(f"rank {r}: {p}" for r, p in paths.items())
        return "error", (f"chunkjac: the ranks of this process group dump to different files, some to the same one "
                         f"({seen}). Every rank calls with the same out= for one sharded dump, or each with its own "
                         "file for per-rank dumps.")
    return "shard", f"{uuid.uuid4().hex[:12]}"


def launch_world() -> int:
    """How many processes a torch.distributed job has (1 outside one)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def launch_rank() -> int:
    """This process's rank in a torch.distributed job (0 outside one): the command line prints on rank 0 only."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def _said(e: BaseException) -> str:
    """An error in one line: fn's own (chunkjac's context, then fn's exception) or any other."""
    cause = e.__cause__
    if type(e).__name__ == "FnError" and cause is not None:  # see _function.FnError
        return f"{first_line(e, 300)} {type(cause).__name__}: {first_line(cause, 300)}"
    return f"{type(e).__name__}: {first_line(e, 300)}"


def device_for(job: Job, device):
    """The device a rank computes on: the one asked for, else GPU LOCAL_RANK when there are GPUs."""
    if device is not None or not torch.cuda.is_available():
        return device
    torch.cuda.set_device(job.local_rank)
    return torch.device("cuda", job.local_rank)
