"""Coupled samples: chunkjac.compute against what users write today, in one interleaved run.

Workloads (float32, 2 threads, the models of the project's reference peer measurements):
  attention_1024x3   attention across a batch of 1024 samples of dim 3 (every sample coupled);
  groups_1e5_of_32   the same attention within contiguous groups of 32, 10^5 samples.
Each (workload, method) runs in a fresh subprocess: one warm-up (and the error check against a
reference; its time is the "first call" column: chunkjac probes and plans there, later calls reuse
the probe cache), then REPS timed calls; peak = RSS growth over the process's baseline, sampled every
2 ms. Methods given a budget run under RLIMIT_AS = baseline + BUDGET, so a method that needs more
fails as it would on a machine with that much memory. ``independent_cost`` is the sum trick (one
forward, 3 VJPs): wrong on coupled samples, the floor the issue measures groups against.

    python benchmarks/bench_coupled.py [--rounds 1] [--reps 1] [--budget 2GB] [WORKLOAD-SUBSTRING ...]
"""
import argparse
import json
import os
import statistics
import sys

from _harness import run_child

WORKLOADS = {  # name: (kind, B)
    "attention_1024x3": ("attn", 1024),
    "groups_1e5_of_32": ("groups", 100_000),
}
METHODS = {
    "attn": ["chunkjac", "row_loop", "full_eye_batched", "jacrev_full_diag"],
    "groups": ["chunkjac", "independent_cost", "vmap_jacrev_per_group", "row_loop_per_group"],
}
LIMITED = {"chunkjac", "full_eye_batched", "jacrev_full_diag"}  # run under the budget's RLIMIT_AS

CHILD = r'''
import json, resource, statistics, sys, threading, time, warnings
import psutil, torch
from torch import nn
from torch.func import jacrev, vmap
import chunkjac
torch.set_num_threads(2)
torch.manual_seed(0)
kind, B, method, reps, budget, limited = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6] == "1"
warnings.simplefilter("ignore")

class Attn(nn.Module):  # the reference measurements' attention model; g: attention within contiguous groups of g
    def __init__(s, d=3, h=8, g=None):
        super().__init__(); s.g = g; s.q, s.k, s.v = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(d, d)
    def forward(s, x):
        z = x if s.g is None else x.reshape(-1, s.g, x.shape[-1])
        a = torch.softmax(s.q(z) @ s.k(z).transpose(-1, -2) / 8 ** 0.5, dim=-1)
        return (a @ s.v(z) + torch.tanh(z)).reshape(x.shape)

G = 32
f = Attn(g=G if kind == "groups" else None)
f.requires_grad_(False)
x = torch.randn(B, 3)
ids = torch.arange(B) // G

def diag_blocks(J, n):  # (n, 3, n, 3) -> (n, 3, 3)
    return J.diagonal(dim1=0, dim2=2).permute(2, 0, 1)

def run():
    """(result or None, seconds extrapolated to the whole batch or None)."""
    if method == "chunkjac":
        return chunkjac.compute(f, x, coupling=ids if kind == "groups" else "auto", budget=budget), None
    if method == "row_loop":  # one VJP per (sample, output) row over the whole graph
        xr = x.clone().requires_grad_(True); y = f(xr); rows = torch.empty(B, 3, 3)
        for i in range(B):
            for o in range(3):
                rows[i, o] = torch.autograd.grad(y[i, o], xr, retain_graph=True)[0][i]
        return rows, None
    if method == "full_eye_batched":  # the forum answer: is_grads_batched with eye(B*3)
        xr = x.clone().requires_grad_(True); y = f(xr)
        eye = torch.eye(B * 3).reshape(B * 3, B, 3)
        g, = torch.autograd.grad(y, xr, eye, is_grads_batched=True)
        return diag_blocks(g.reshape(B, 3, B, 3), B), None
    if method == "jacrev_full_diag":
        return diag_blocks(jacrev(f)(x), B), None
    if method == "independent_cost":  # the sum trick: wrong here, the floor for groups
        xr = x.clone().requires_grad_(True); y = f(xr).sum(0)
        g, = torch.autograd.grad(y, xr, torch.eye(3), is_grads_batched=True)
        return g.movedim(0, 1), None
    if method == "vmap_jacrev_per_group":  # full Jacobian of every group, then its diagonal blocks
        h = Attn(); h.load_state_dict(f.state_dict()); h.requires_grad_(False)
        J = vmap(jacrev(h))(x.reshape(-1, G, 3))  # (B/G, G, 3, G, 3)
        return J.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).reshape(B, 3, 3), None
    if method == "row_loop_per_group":  # the row loop inside each group, timed on 20 groups
        n = 20; t = time.perf_counter(); out = []
        for gi in range(n):
            xr = x[gi * G:(gi + 1) * G].clone().requires_grad_(True); y = f(xr)
            for i in range(G):
                out.append(torch.stack([torch.autograd.grad(y[i, o], xr, retain_graph=True)[0][i] for o in range(3)]))
        return None, (time.perf_counter() - t) * (B // G) / n

def reference():  # exact blocks of the first samples in float64: rows of the full Jacobian
    n = 64 if kind == "attn" else 128
    h = Attn(g=f.g).double(); h.load_state_dict(f.state_dict())
    xr = (x if kind == "attn" else x[:n]).double().requires_grad_(True); y = h(xr)
    return torch.stack([torch.stack([torch.autograd.grad(y[i, o], xr, retain_graph=True)[0][i] for o in range(3)])
                        for i in range(n)])

proc = psutil.Process()
peak = [0]; done = [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.002)
try:
    ref = reference()
    if limited:
        cap = proc.memory_info().vms + chunkjac._budget.parse_budget(budget, 1 << 60)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    t = time.perf_counter(); r, e = run(); first = time.perf_counter() - t  # warm-up (probe, plan), error check
    err = None if r is None else (r[:ref.shape[0]].double() - ref).abs().max().item()
    del r
    base = proc.memory_info().rss; peak[0] = base
    th = threading.Thread(target=sample, daemon=True); th.start()
    ts = []
    for _ in range(reps if e is None else 1):
        t = time.perf_counter(); r, e = run(); dt = time.perf_counter() - t
        ts.append(e if e is not None else dt)
        del r
    done[0] = True; th.join()
    print(json.dumps({"seconds": statistics.median(ts), "peak_mb": (peak[0] - base) / 1e6, "err": err,
                      "extrapolated": e is not None, "first": first}))
except (RuntimeError, MemoryError) as ex:
    oom = "can't allocate memory" in str(ex) or isinstance(ex, MemoryError)
    note = f"out of memory under the {budget} limit" if oom else f"{type(ex).__name__}: {str(ex)[:90]}"
    print(json.dumps({"seconds": None, "note": note}))
'''


def run_one(kind, B, method, reps, budget):
    limited = "1" if method in LIMITED else "0"
    # RLIMIT_AS caps address space, not memory: glibc's per-thread arenas reserve 64 MB each
    # without touching it, so two arenas keep the cap about the memory actually used.
    env = dict(os.environ, MALLOC_ARENA_MAX="2")
    return run_child(CHILD, [kind, B, method, reps, budget, limited], timeout=1800, env=env)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--budget", default="2GB", help="memory for chunkjac and the vectorised peers")
    ap.add_argument("only", nargs="*")
    a = ap.parse_args()
    names = [n for n in WORKLOADS if not a.only or any(o in n for o in a.only)]
    results = {(n, m): [] for n in names for m in METHODS[WORKLOADS[n][0]]}
    for rnd in range(a.rounds):
        for n in names:
            for m in METHODS[WORKLOADS[n][0]]:
                rec = run_one(*WORKLOADS[n], m, a.reps, a.budget)
                results[(n, m)].append(rec)
                print(json.dumps({"round": rnd, "workload": n, "method": m, **rec}), file=sys.stderr, flush=True)
    print(f"budget {a.budget} (RLIMIT_AS for: {', '.join(sorted(LIMITED))})\n")
    print("| workload | method | median s | first call s | peak MB | max err | vs chunkjac |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in names:
        ours = [r["seconds"] for r in results[(n, "chunkjac")] if r.get("seconds")]
        base = statistics.median(ours) if ours else None
        for m in METHODS[WORKLOADS[n][0]]:
            recs = results[(n, m)]
            secs = [r["seconds"] for r in recs if r.get("seconds")]
            if not secs:
                print(f"| {n} | {m} | {recs[0].get('note', '')[:70]} | | | | |")
                continue
            s = statistics.median(secs)
            pk = statistics.median(r["peak_mb"] for r in recs if r.get("seconds"))
            ext = " (extrap.)" if recs[0].get("extrapolated") else ""
            err = "" if recs[0].get("err") is None else f"{recs[0]['err']:.0e}"
            ratio = f"{s / base:.2f}" if base else ""
            first = "" if recs[0].get("extrapolated") else f"{recs[0]['first']:.4g}"
            print(f"| {n} | {m} | {s:.4g}{ext} | {first} | {pk:.0f} | {err} | {ratio} |")


if __name__ == "__main__":
    main()
