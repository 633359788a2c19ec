"""Issue 5's acceptance run: dump 10^6 samples of the PINN MLP 3 -> 256 x 3 -> 3 with a budget far
below the result, SIGKILL the dump in the middle, run the same command again, and compare the file
with an uninterrupted dump of the same command, sample by sample (all with --deterministic, so that
the comparison is bit for bit).

    python benchmarks/dump_resume.py [--samples 1000000] [--budget 8MB] [--kill-after 0.5] [--dir DIR]

``--model mlp784 --wrt 2.weight`` dumps per-sample Jacobians w.r.t. the last layer's weight of an MLP
784 -> 256 -> 10 instead (issue 16's run: (B, 10, 10, 256) float32, 102 kB per sample: 10^6 samples are 102 GB).
``--model mlp784loss --wrt params --project 4096 --projection kronecker --project-dtype float16`` dumps
that MLP's per-sample cross-entropy gradients projected to 4,096 float16 numbers (issue 28's run: 8.2 GB
for 10^6 samples).

Prints each run's time and peak RSS (the dump's own summary), the chunks on disk at the kill, and
whether the files are equal and every sample's block was written.
"""
import argparse
import json
import os
import signal
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
    return nn.Sequential(nn.Linear(3, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                         nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3))

def mlp784():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))

class Loss(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp784()

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.net(x), y, reduction="none")

def mlp784loss():
    return Loss()
'''


MODEL, WRT, EXTRA = "pinn", None, []


def dump(folder, out, budget, quiet=True):
    # --deterministic: no candidate timed on the first chunks, so the comparison can be bit for bit
    # (without it the first chunks of either run may come from another exact candidate: equal to rounding).
    labels = [f"{folder}/y.npy"] if MODEL == "mlp784loss" else []
    return [sys.executable, "-m", "chunkjac", "dump", f"{folder}/model.py:{MODEL}", f"{folder}/x.npy", *labels, out,
            "--budget", budget, "--deterministic"] + (["--quiet"] if quiet else []) + (["--wrt", WRT] if WRT else []) \
        + EXTRA


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--budget", default="8MB")
    ap.add_argument("--kill-after", type=float, default=0.5, help="kill when this fraction of chunks is on disk")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--model", default="pinn", choices=["pinn", "mlp784", "mlp784loss"],
                    help="mlp784loss: the per-sample cross-entropy of the MLP 784 -> 256 -> 10 (labels in y.npy)")
    ap.add_argument("--wrt", default=None, help="a parameter name (e.g. 2.weight), passed to chunkjac dump")
    ap.add_argument("--project", nargs=argparse.REMAINDER, default=[],
                    help="the rest of the line goes to chunkjac dump: --project 4096 --projection kronecker ...")
    a = ap.parse_args()
    global MODEL, WRT, EXTRA
    MODEL, WRT, EXTRA = a.model, a.wrt, (["--project", *a.project] if a.project else [])
    d_in = 3 if a.model == "pinn" else 784
    folder = a.dir or tempfile.mkdtemp(prefix="chunkjac-resume-")
    with open(os.path.join(folder, "model.py"), "w") as f:
        f.write(FACTORY)
    np.save(os.path.join(folder, "x.npy"),
            np.random.default_rng(0).standard_normal((a.samples, d_in)).astype(np.float32))
    if a.model == "mlp784loss":
        np.save(os.path.join(folder, "y.npy"), np.random.default_rng(1).integers(0, 10, a.samples))
        d_in = 784
    per = 9 if a.model == "pinn" and a.wrt is None else 10 * 2560 if a.wrt == "2.weight" else None
    result = f"{a.samples * per * 4 / 1e6:,.0f} MB float32" if per else "as the plan line below says"
    print(f"folder: {folder}\nresult: {result}, budget {a.budget}")

    ref = os.path.join(folder, "uninterrupted.npy")
    t = time.perf_counter()
    r = subprocess.run(dump(folder, ref, a.budget), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    wall = time.perf_counter() - t
    print(f"\nuninterrupted dump: {wall:.1f} s wall, {a.samples / wall:,.0f} samples/s, "
          f"{os.path.getsize(ref) / wall / 1e6:,.0f} MB/s written\n{r.stdout.strip()}")

    out = os.path.join(folder, "jac.npy")
    manifest = out + ".chunkjac.json"
    proc = subprocess.Popen(dump(folder, out, a.budget), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done = total = 0
    while proc.poll() is None:
        try:
            m = json.load(open(manifest))
            done, total = len(m["done"]), len(m["chunks"])
        except (OSError, ValueError):
            pass
        if total and done >= a.kill_after * total:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the dump finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    m = json.load(open(manifest))
    print(f"\nSIGKILL: {len(m['done']):,} of {len(m['chunks']):,} chunks on disk, complete={m['complete']}")

    t = time.perf_counter()
    r = subprocess.run(dump(folder, out, a.budget), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    print(f"\nrerun of the same command: {time.perf_counter() - t:.1f} s wall\n"
          f"{[l for l in r.stderr.splitlines() if 'resuming' in l]}\n{r.stdout.strip()}")
    r = subprocess.run(dump(folder, out, a.budget), capture_output=True, text=True)
    print(f"\nthird run: {[l for l in r.stderr.splitlines() if 'complete' in l]}")

    x, y = np.load(out, mmap_mode="r"), np.load(ref, mmap_mode="r")
    equal, written = x.shape == y.shape, 0
    for i in range(0, len(x), 10_000):  # in blocks: the files may be larger than memory
        a, b = np.asarray(x[i:i + 10_000]), np.asarray(y[i:i + 10_000])
        equal = equal and np.array_equal(a, b)
        written += int((np.abs(a).reshape(len(a), -1).sum(1) > 0).sum())
    print(f"\nresumed file == uninterrupted file: {equal}; samples with a written block: "
          f"{written:,} of {len(x):,}")


if __name__ == "__main__":
    main()
