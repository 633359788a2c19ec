"""chunkjac.compute against what users write today, on the core workloads, in one interleaved run.

Each (workload, method) runs in a fresh subprocess (so peak memory is its own): one warm-up, then
REPS timed calls; peak = RSS growth over the process's baseline, sampled every 2 ms. Rounds are
interleaved (every method once, then again), and the table reports the median over rounds.
Per-sample loops are timed on a subset and extrapolated to the full batch. The error column is the
max abs difference to vmap(jacrev) on the first 64 samples.

    python benchmarks/bench_core.py [--rounds 3] [--reps 3] [WORKLOAD-SUBSTRING ...]
"""
import argparse
import json
import statistics
import sys

from _harness import run_child

WORKLOADS = {  # name: (kind, B)
    "sin_1e6x3": ("sin", 1_000_000),
    "pinn_3_128x3_3_1e5": ("pinn", 100_000),
    "mlp_784_256_10_1e4": ("wide", 10_000),
}
METHODS = ["chunkjac", "vmap_jacrev", "vmap_jacfwd", "dims_loop", "sample_loop"]

CHILD = r'''
import json, statistics, sys, threading, time
import psutil, torch
from torch import nn
from torch.func import jacfwd, jacrev, vmap
import chunkjac
torch.set_num_threads(2)
torch.manual_seed(0)
kind, B, method, reps = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])

def mlp(*w, act=nn.Tanh):
    layers = []
    for a, b in zip(w[:-1], w[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])

if kind == "sin": f, x = torch.sin, torch.randn(B, 3)
elif kind == "pinn": f, x = mlp(3, 128, 128, 128, 3), torch.randn(B, 3)
elif kind == "wide": f, x = mlp(784, 256, 10, act=nn.ReLU), torch.randn(B, 784)
if isinstance(f, nn.Module):
    f.requires_grad_(False)

def run():
    """Returns (result, seconds extrapolated to B or None)."""
    if method == "chunkjac":
        return chunkjac.compute(f, x), None
    if method == "vmap_jacrev":
        return vmap(jacrev(f))(x), None
    if method == "vmap_jacfwd":
        return vmap(jacfwd(f))(x), None
    if method == "dims_loop":  # seed 002's answer: one backward per output dim, summed over the batch
        xr = x.clone().requires_grad_(True); y = f(xr)
        cols = [torch.autograd.grad(y[:, o].sum(), xr, retain_graph=o < y.shape[1] - 1)[0]
                for o in range(y.shape[1])]
        return torch.stack(cols, 1), None
    if method == "sample_loop":  # the Python loop over samples, timed on n samples
        n = 200
        t = time.perf_counter()
        r = torch.stack([jacrev(f)(x[i]) for i in range(n)])
        return r, (time.perf_counter() - t) * B / n

proc = psutil.Process()
peak = [0]; done = [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.002)
try:
    r, _ = run()  # warm-up and the error check
    ref = vmap(jacrev(f))(x[:64])
    err = (r[:64] - ref).abs().max().item()
    del r
    base = proc.memory_info().rss; peak[0] = base
    th = threading.Thread(target=sample, daemon=True); th.start()
    ts, extrap = [], False
    for _ in range(reps):
        t = time.perf_counter(); r, e = run(); dt = time.perf_counter() - t
        ts.append(e if e is not None else dt); extrap = e is not None
        del r
        if extrap:
            break
    done[0] = True; th.join()
    print(json.dumps({"seconds": statistics.median(ts), "peak_mb": (peak[0] - base) / 1e6, "err": err,
                      "extrapolated": extrap}))
except (RuntimeError, MemoryError) as e:
    print(json.dumps({"seconds": None, "note": f"{type(e).__name__}: {str(e)[:100]}"}))
'''


def run_one(kind, B, method, reps):
    return run_child(CHILD, [kind, B, method, reps], timeout=900)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("only", nargs="*")
    a = ap.parse_args()
    names = [n for n in WORKLOADS if not a.only or any(o in n for o in a.only)]
    results = {(n, m): [] for n in names for m in METHODS}
    for rnd in range(a.rounds):
        for n in names:
            for m in METHODS:
                if m == "sample_loop" and rnd > 0:
                    continue  # extrapolated and slow: once is enough
                rec = run_one(*WORKLOADS[n], m, a.reps)
                results[(n, m)].append(rec)
                print(json.dumps({"round": rnd, "workload": n, "method": m, **rec}), file=sys.stderr, flush=True)
    print("| workload | method | median s | peak MB | max err | vs chunkjac |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for n in names:
        ours = [r["seconds"] for r in results[(n, "chunkjac")] if r.get("seconds")]
        base = statistics.median(ours) if ours else None
        for m in METHODS:
            recs = results[(n, m)]
            secs = [r["seconds"] for r in recs if r.get("seconds")]
            if not secs:
                print(f"| {n} | {m} | {recs[0].get('note', '')[:60]} | | | |")
                continue
            s = statistics.median(secs)
            pk = statistics.median(r["peak_mb"] for r in recs if r.get("seconds"))
            ext = " (extrap.)" if recs[0].get("extrapolated") else ""
            ratio = f"{s / base:.2f}" if base else ""
            print(f"| {n} | {m} | {s:.4g}{ext} | {pk:.0f} | {recs[0]['err']:.0e} | {ratio} |")


if __name__ == "__main__":
    main()
