"""Sharded dumps (see [Sharded dumps] in chunkjac/_distributed.py): processes launched by torchrun
(gloo, this CPU) fill one .npy that equals a single-process dump byte for byte, survive a rank
killed mid-run, resume with another number of processes, and stop together when one rank fails."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import chunkjac
from chunkjac import _manifest
from chunkjac._distributed import shares

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                reason="torch.distributed with gloo")

N, CHUNK = 200_000, 15_000  # 14 chunks: 7 + 7 on two ranks, 4 + 5 + 5 on three

FACTORY = '''
import os, signal
import torch
from torch import nn
import chunkjac._sinks

chunkjac._sinks.NpySink.COMMIT_SECONDS = 0.0  # list every chunk at once: the kill tests count them

class PINN(nn.Module):
    """3 -> 128 x 3 -> 3, tanh; KILL_AT="rank:k" makes that rank die (SIGKILL) at its k-th chunk,
    FAIL_AT="rank:k" raise there."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                                 nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 3))
        self.calls = 0

    def forward(self, x):
        if x.shape[0] >= 1000 and os.path.exists(os.environ.get("DUMP_OUT", "") + ".chunkjac.json"):
            self.calls += 1  # a chunk of the dump (the planner's probes and timings come before its manifest)
            for var, act in (("KILL_AT", "kill"), ("FAIL_AT", "fail")):
                rank, _, k = os.environ.get(var, "-:-").partition(":")
                if rank == os.environ.get("RANK", "0") and str(self.calls) == k:
                    if act == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise ValueError("an error in the model on purpose")
        return self.net(x)

def make():
    return PINN()
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    (d / "model.py").write_text(FACTORY)
    np.save(d / "x.npy", np.random.default_rng(0).random((N, 3), dtype=np.float32))
    ref = d / "ref.npy"
    r = _dump(d, ref, procs=1)
    assert r.returncode == 0, r.stderr
    return d, np.load(ref)


def _dump(d, out, procs: int, env=None, extra=(), quiet=True):
    cmd = ["-m", "chunkjac", "dump", f"{d}/model.py:make", f"{d}/x.npy", str(out), "--mode", "reverse",
           "--chunk-size", str(CHUNK), *(["--quiet"] if quiet else []), *extra]
    if procs > 1:
        cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *cmd]
    # One thread per process, as torchrun sets it: a single-process run the same, so that every chunk
    # is computed the same way and the files can be compared byte for byte.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DUMP_OUT": str(out), **(env or {})}
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=300, env=env)


def _manifest_of(out):
    return json.load(open(str(out) + ".chunkjac.json"))


def test_shares_are_contiguous_disjoint_balanced_and_cover():
    for n in range(0, 30):
        for world in range(1, 7):
            todo = list(range(100, 100 + n))
            s = shares(todo, world)
            assert len(s) == world and sum(s, []) == todo
            assert max(map(len, s)) - min(map(len, s)) <= 1
            assert all(p == todo[todo.index(p[0]):todo.index(p[0]) + len(p)] for p in s if p)


@pytest.mark.parametrize("procs", [2, 3])
def test_torchrun_dump_equals_one_process_byte_for_byte(setup, tmp_path, procs):
    d, ref = setup
    out = tmp_path / "jac.npy"
    r = _dump(d, out, procs, quiet=False)
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.load(out).tobytes() == ref.tobytes()
    bars = [line for line in r.stderr.replace("\r", "\n").splitlines() if line.startswith("chunkjac:") and "|" in line]
    assert bars and "200k/200k" in bars[-1]  # one bar, rank 0's, counting every rank's samples
    assert all("/200k" in b for b in bars)
    m = _manifest_of(out)
    assert m["complete"] and len(m["done"]) == 14 and not list(tmp_path.glob("*.done-*"))
    assert r.stdout.count("wrote:") == 1  # rank 0 reports; the others are quiet
    assert "shared by %d processes" % procs in r.stderr


def test_a_rank_killed_mid_run_then_one_process_finishes(setup, tmp_path):
    d, ref = setup
    out = tmp_path / "jac.npy"
    r = _dump(d, out, 2, env={"KILL_AT": "1:3"})  # rank 1 dies (SIGKILL) at its third chunk
    assert r.returncode != 0
    m = _manifest.load(str(out))  # the records merged: rank 1's two chunks and whatever rank 0 finished
    assert {7, 8} <= m["done"] and 9 not in m["done"] and not m["complete"]
    r = _dump(d, out, 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    assert np.load(out).tobytes() == ref.tobytes()
    assert _manifest_of(out)["complete"] and not list(tmp_path.glob("*.done-*"))


def test_a_one_process_dump_resumed_by_two(setup, tmp_path):
    d, ref = setup
    out = tmp_path / "jac.npy"
    r = _dump(d, out, 1, env={"KILL_AT": "0:6"})  # dies at its sixth chunk: five on disk
    assert r.returncode != 0
    assert len(_manifest_of(out)["done"]) == 5
    r = _dump(d, out, 2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.load(out).tobytes() == ref.tobytes()


def test_an_error_on_one_rank_stops_every_rank_and_names_it(setup, tmp_path):
    d, ref = setup
    out = tmp_path / "jac.npy"
    r = _dump(d, out, 2, env={"FAIL_AT": "1:2"})
    assert r.returncode != 0
    mine = r.stderr.split("rank 1 of 2 failed in a sharded dump: ")[1].splitlines()[0]
    assert "fn raised ValueError" in mine and "an error in the model on purpose" in mine
    assert "a sharded dump failed on rank 1: chunkjac: fn raised ValueError" in r.stderr  # rank 0's own report
    r = _dump(d, out, 1)  # resumed, here by one process
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.load(out).tobytes() == ref.tobytes()


def test_records_merge_on_load_and_a_start_over_drops_them(tmp_path):
    model = torch.nn.Linear(3, 2)
    x = torch.randn(100, 3)
    out = str(tmp_path / "j.npy")
    chunkjac.compute(model, x, out=out, chunk_size=10)
    m = _manifest.load(out)
    m["done"], m["complete"] = {0, 1}, False
    _manifest.save(out, m)
    _manifest.save_record(out, "job-1", {5, 6})
    assert _manifest.load(out)["done"] == {0, 1, 5, 6}
    with open(_manifest.record_path(out, "job-2"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="record .* is corrupt"):
        _manifest.load(out)
    os.unlink(_manifest.record_path(out, "job-2"))
    chunkjac.compute(model, x, out=out, chunk_size=10, resume=False)  # starts over: no stale record counts
    assert not _manifest.records_of(out) and _manifest.load(out)["complete"]
    chunkjac.compute(model, x, out=out, chunk_size=10)


WORKER = '''
import os, sys
import numpy as np, torch, chunkjac
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))
rank, d = int(os.environ["RANK"]), sys.argv[1]
x = torch.rand(5_000, 3, generator=torch.Generator().manual_seed(1))
a = chunkjac.compute(model, x, out=f"{d}/a.npy", chunk_size=700)         # one sharded dump
mine = x[rank::2]
local = chunkjac.compute(model, mine)                                     # in memory: this rank's own batch
b = chunkjac.compute(model, mine, out=f"{d}/b{rank}.npy", chunk_size=300)  # each rank its own file
c = chunkjac.compute(model, x, wrt="params", out=f"{d}/c/", chunk_size=900)  # a sharded folder dump
ref = chunkjac.compute(model, x)
assert torch.allclose(a, ref, atol=1e-6) and local.shape == (len(mine), 2, 3) and torch.allclose(b, local, atol=1e-6), rank
refc = chunkjac.compute(model, x, wrt="params")
assert all(torch.allclose(c[k], refc[k]) for k in refc), rank
print("ok", rank)
'''


def test_several_calls_in_one_job_shard_dumps_only(tmp_path):
    (tmp_path / "w.py").write_text(WORKER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(tmp_path / "w.py"), str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok 0" in r.stdout and "ok 1" in r.stdout
    assert len(_manifest_of(tmp_path / "a.npy")["done"]) == 8 and (tmp_path / "b1.npy").exists()
    assert json.load(open(tmp_path / "c" / "jacobians.chunkjac.json"))["complete"]
