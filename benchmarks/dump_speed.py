"""Dumps at disk speed: `chunkjac dump` of a 10^6 x 512 float32 memmap through an MLP 512 -> 64 -> 2
(tanh) to (10^6, 2, 512) float32 (4.1 GB) with --budget 256MB, against the time to write the same
bytes with `dd conv=fsync` and the in-memory compute time of the same Jacobians (compute() into
memory), in one run, rounds interleaved. Issue 26's target: dump <= 1.25 x max(dd, compute).

    python benchmarks/dump_speed.py [--samples 1000000] [--rounds 2] [--dir DIR]

Each measurement is a fresh process. The dump's time is the command's own "time:" line (the run,
after the model and inputs are loaded and the plan printed); dd's is its wall time; the in-memory
compute's is the compute() call in a process that loaded the same memmap.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

FACTORY = '''
import torch
from torch import nn

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 64), nn.Tanh(), nn.Linear(64, 2)).requires_grad_(False)
'''

COMPUTE = r'''
import json, sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import chunkjac, model
torch.set_num_threads(2)
x = torch.from_numpy(np.load(sys.argv[2], mmap_mode="r"))
f = model.mlp()
t = time.perf_counter()
J = chunkjac.compute(f, x)
print(json.dumps({"seconds": time.perf_counter() - t, "shape": list(J.shape)}))
'''


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where the files go (default: a temporary folder)")
    a = ap.parse_args(argv)
    folder = a.dir or tempfile.mkdtemp(prefix="chunkjac-dumpspeed-")
    with open(os.path.join(folder, "model.py"), "w") as f:
        f.write(FACTORY)
    xpath = os.path.join(folder, "x.npy")
    x = np.lib.format.open_memmap(xpath, mode="w+", dtype=np.float32, shape=(a.samples, 512))
    rng = np.random.default_rng(0)
    for i in range(0, a.samples, 100_000):
        x[i:i + 100_000] = rng.standard_normal((min(100_000, a.samples - i), 512), dtype=np.float32)
    x.flush()
    del x
    nbytes = a.samples * 2 * 512 * 4
    blocks = -(-nbytes // (16 << 20))
    env = {**os.environ, "CHUNKJAC_CACHE_DIR": os.path.join(folder, "cache")}
    times: dict = {"dd": [], "compute": [], "dump": []}
    try:
        for r in range(a.rounds):
            order = ["dd", "compute", "dump"][r % 3:] + ["dd", "compute", "dump"][:r % 3]
            for m in order:
                out = os.path.join(folder, "out.npy")
                for p in (out, out + ".chunkjac.json"):
                    if os.path.exists(p):
                        os.unlink(p)
                subprocess.run(["sync"])
                if m == "dd":
                    t = time.perf_counter()
                    subprocess.run(["dd", "if=/dev/zero", f"of={out}", "bs=16M", f"count={blocks}", "conv=fsync"],
                                   check=True, capture_output=True)
                    times["dd"].append(time.perf_counter() - t)
                elif m == "compute":
                    p = subprocess.run([sys.executable, "-c", COMPUTE, folder, xpath], capture_output=True, text=True,
                                       env=env)
                    rec = json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])
                    times["compute"].append(rec["seconds"])
                else:
                    p = subprocess.run([sys.executable, "-m", "chunkjac", "dump", f"{folder}/model.py:mlp", xpath, out,
                                        "--budget", "256MB", "--quiet"], capture_output=True, text=True, env=env)
                    assert p.returncode == 0, p.stderr
                    if r == 0:
                        print(p.stdout.strip())
                    times["dump"].append(float(re.search(r"^time: ([\d.]+) s", p.stdout, re.M).group(1)))
                print(f"# round {r + 1} {m}: {times[m][-1]:.2f} s", file=sys.stderr, flush=True)
    finally:
        if a.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nresult: ({a.samples:,}, 2, 512) float32, {nbytes / 1e9:.2f} GB; medians of {a.rounds} rounds")
    print("| what | seconds |")
    print("| --- | ---: |")
    print(f"| dd of the same bytes (conv=fsync) | {med['dd']:.2f} |")
    print(f"| compute() into memory | {med['compute']:.2f} |")
    print(f"| chunkjac dump --budget 256MB | {med['dump']:.2f} |")
    floor = max(med["dd"], med["compute"])
    print(f"\ndump / max(dd, compute) = {med['dump'] / floor:.2f} (target ≤ 1.25: "
          f"{'met' if med['dump'] <= 1.25 * floor else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
