"""Issue 17's timing: one dump of the PINN MLP 3 -> 128 x 3 -> 3 (Jacobians (B, 3, 3) to a .npy) by
one process and by torchrun with N processes, interleaved rounds, wall time of the whole command
(interpreter start, torch import, rendezvous and planning included), medians, and a byte-for-byte
comparison of the files.

    python benchmarks/sharded_dump.py [--samples 1000000] [--procs 1 2] [--rounds 3] [--device cpu|cuda]

On a machine with C cores, the single process uses C threads and each of N processes C/N threads
(torchrun sets OMP_NUM_THREADS=1 unless told otherwise; here it is set to C/N for both).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

FACTORY = '''
import torch
from torch import nn

def pinn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                         nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 3))
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    folder = a.dir or tempfile.mkdtemp(prefix="chunkjac-sharded-")
    with open(os.path.join(folder, "model.py"), "w") as f:
        f.write(FACTORY)
    np.save(os.path.join(folder, "x.npy"), np.random.default_rng(0).random((a.samples, 3), dtype=np.float32))
    cores = os.cpu_count() or 1
    times = {n: [] for n in a.procs}
    for r in range(a.rounds):
        for n in a.procs[r % len(a.procs):] + a.procs[:r % len(a.procs)]:
            out = os.path.join(folder, f"jac{n}.npy")
            for p in (out, out + ".chunkjac.json"):
                if os.path.exists(p):
                    os.unlink(p)
            cmd = ["-m", "chunkjac", "dump", f"{folder}/model.py:pinn", f"{folder}/x.npy", out, "--quiet",
                   "--mode", "reverse", "--chunk-size", "50000"] + (["--device", a.device] if a.device else [])
            if n > 1:
                cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", *cmd]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n))}
            t = time.perf_counter()
            p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env)
            times[n].append(time.perf_counter() - t)
            assert p.returncode == 0, p.stderr[-2000:]
    files = {n: np.load(os.path.join(folder, f"jac{n}.npy")).tobytes() for n in a.procs}
    same = all(files[n] == files[a.procs[0]] for n in a.procs)
    print(f"{a.samples:,} samples of the PINN MLP 3 -> 128 x 3 -> 3, chunks of 50,000, {cores} cores, "
          f"{a.rounds} interleaved rounds; files identical byte for byte: {same}\n")
    print("| processes | median wall s (whole command) | samples/s | x one process's time |")
    print("| ---: | ---: | ---: | ---: |")
    base = statistics.median(times[a.procs[0]])
    for n in a.procs:
        t = statistics.median(times[n])
        print(f"| {n} | {t:.2f} | {a.samples / t:,.0f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()
