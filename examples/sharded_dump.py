"""One dump filled by several processes: torchrun launches them, chunkjac shares the chunks out.

Every process runs the same code and makes the same call; under torchrun chunkjac makes one plan
(rank 0), gives each process a contiguous share of the chunks (on GPU LOCAL_RANK where there are
GPUs) and writes one .npy, identical to a single-process dump. Kill it and run it again with any
number of processes: it resumes. The command line does the same:

    torchrun --nproc-per-node 4 -m chunkjac dump model.py:make x.npy jacobians.npy

Run this file as it is: it launches itself with `torchrun --nproc-per-node 2` (here on the CPU, gloo),
then checks the file against an in-memory computation.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from torch import nn

import chunkjac


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))


def worker(folder: str) -> None:
    """What each torchrun process runs: the ordinary call."""
    x = np.load(os.path.join(folder, "x.npy"), mmap_mode="r")
    J = chunkjac.compute(make(), x, out=os.path.join(folder, "jacobians.npy"), chunk_size=10_000)
    if int(os.environ["RANK"]) == 0:
        print(f"rank 0 of {os.environ['WORLD_SIZE']}: {tuple(J.shape)} written")


if __name__ == "__main__":
    if "RANK" in os.environ:  # launched by torchrun
        worker(sys.argv[1])
        sys.exit(0)
    folder = tempfile.mkdtemp()
    np.save(os.path.join(folder, "x.npy"), np.random.default_rng(0).random((100_000, 3), dtype=np.float32))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__, folder]
    print("$ torchrun --standalone --nproc-per-node=2 sharded_dump.py", folder)
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(r.stdout.strip())
    assert r.returncode == 0, r.stderr[-2000:]
    J = np.load(os.path.join(folder, "jacobians.npy"))
    ref = chunkjac.compute(make(), torch.from_numpy(np.load(os.path.join(folder, "x.npy"))))
    print(f"file {J.shape}, max difference to one process in memory: {np.abs(J - ref.numpy()).max():.1e}")
