"""The per-call tax: chunkjac.compute with defaults against the fastest hand-written peer, repeated calls.

For each workload, one fresh process builds the model and inputs, makes one warm-up call of every
method (chunkjac plans then, and its plan is cached), then times ROUNDS interleaved rounds (every
method once per round, in an order that rotates from round to round) and reports the median. The ratio is chunkjac's median over the
fastest peer's: only ratios measured side by side count on a noisy machine. Peers are those of the
anchors table (what users write today) and the forward-mode ones (vmap(jacfwd), the jvp sum trick)
where they fit in memory, each checked equal to chunkjac on the first 64 samples.

    python benchmarks/bench_tax.py [--rounds 7] [WORKLOAD-SUBSTRING ...]
"""
import argparse
import json
import sys

from _harness import run_child

WORKLOADS = {  # name: (kind, B)
    "seed000_dydC_1e6": ("dydc", 1_000_000),
    "sin_1e6x3": ("sin", 1_000_000),
    "mlp_784_256_10_1e4": ("wide", 10_000),
    "seq_5_2_10_1e5": ("seq", 100_000),
    "pinn_3_128x3_3_1e5": ("pinn", 100_000),
}

CHILD = r'''
import json, statistics, sys, time
import torch
from torch import nn
from torch.func import jacfwd, jacrev, jvp, vmap
import chunkjac
torch.set_num_threads(2)
torch.manual_seed(0)
kind, B, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def mlp(*w, act=nn.Tanh):
    layers = []
    for a, b in zip(w[:-1], w[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])

def rev_sum(f, x):  # the sum trick, all output rows in one is_grads_batched call
    x = x.detach().requires_grad_(True); y = f(x).sum(0)
    eye = torch.eye(y.numel()).reshape(-1, *y.shape)
    g, = torch.autograd.grad(y, x, eye, is_grads_batched=True)
    return g.reshape(*y.shape, *x.shape).movedim(y.dim(), 0)

def dims_loop(f, x):
    xr = x.clone().requires_grad_(True); y = f(xr)
    cols = [torch.autograd.grad(y[:, o].sum(), xr, retain_graph=True)[0] for o in range(y.shape[1])]
    return torch.stack(cols, 1)

def jvp_sum_trick(f, x):  # forward mode: one JVP per input dim, the tangent e_k in every sample
    cols = []
    for k in range(x.shape[1]):
        e = torch.zeros_like(x); e[:, k] = 1
        cols.append(jvp(f, (x,), (e,))[1])
    return torch.stack(cols, -1)

def functional_vectorize(f, x):
    J = torch.autograd.functional.jacobian(lambda z: f(z).sum(0), x, vectorize=True)
    return J.movedim(-x.dim(), 0)

if kind == "dydc":
    x = torch.linspace(-2, 2, B); C = torch.tensor(-0.5)
    routine = lambda C, x: torch.tanh(C * x) * x + C ** 2
    methods = {
        "chunkjac": lambda: chunkjac.compute(lambda x, C: routine(C, x), (x, C), in_dims=(0, None), wrt=1),
        "vmap(jacfwd)": lambda: vmap(jacfwd(routine), in_dims=(None, 0))(C, x),
        "forward dual": lambda: jvp(lambda c: routine(c, x), (C,), (torch.ones(()),))[1],
    }
else:
    f, x = {
        "sin": lambda: (torch.sin, torch.randn(B, 3)),
        "seq": lambda: (nn.Sequential(nn.Linear(5, 2), nn.Sigmoid(), nn.Linear(2, 10)), torch.randn(B, 5)),
        "pinn": lambda: (mlp(3, 128, 128, 128, 3), torch.randn(B, 3)),
        "wide": lambda: (mlp(784, 256, 10, act=nn.ReLU), torch.randn(B, 784)),
    }[kind]()
    for p in (f.parameters() if isinstance(f, nn.Module) else []):
        p.requires_grad_(False)
    methods = {
        "chunkjac": lambda: chunkjac.compute(f, x),
        "sum trick (is_grads_batched)": lambda: rev_sum(f, x),
        "functional(vectorize)": lambda: functional_vectorize(f, x),
        "dims loop": lambda: dims_loop(f, x),
        "vmap(jacrev)": lambda: vmap(jacrev(f))(x),
    }
    if kind != "wide":  # forward mode over 784 inputs: out of memory at 24 GB (the anchors)
        methods["vmap(jacfwd)"] = lambda: vmap(jacfwd(f))(x)
        methods["jvp sum trick"] = lambda: jvp_sum_trick(f, x)
ref = None
for name, m in methods.items():  # warm-up (chunkjac plans here), and every method checked equal
    r = m()
    r = r[:64].reshape(64, -1).double()
    if ref is None:
        ref = r
    else:
        assert torch.allclose(r, ref, rtol=1e-4, atol=1e-5), (name, (r - ref).abs().max().item())
times = {name: [] for name in methods}
order = list(methods)
for r in range(rounds):  # the order rotates each round: no method always follows the same one
    for name in order[r % len(order):] + order[:r % len(order)]:
        t = time.perf_counter(); methods[name](); times[name].append(time.perf_counter() - t)
med = {name: statistics.median(ts) for name, ts in times.items()}
peers = {k: v for k, v in med.items() if k != "chunkjac"}
best = min(peers, key=peers.get)
print(json.dumps({"chunkjac": med["chunkjac"], "best_peer": best, "best_seconds": peers[best],
                  "ratio": med["chunkjac"] / peers[best], "all": med, "plan": str(chunkjac.plan(*([lambda x, C: routine(C, x), (x, C)] if kind == "dydc" else [f, x]), **({"in_dims": (0, None), "wrt": 1} if kind == "dydc" else {})))}))
'''


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("only", nargs="*")
    a = ap.parse_args()
    print("| workload | chunkjac (s) | fastest peer | peer (s) | ratio |")
    print("| --- | ---: | --- | ---: | ---: |")
    for name, (kind, b) in WORKLOADS.items():
        if a.only and not any(s in name for s in a.only):
            continue
        rec = run_child(CHILD, [kind, b, a.rounds], timeout=1800)
        if rec.get("chunkjac") is None:
            print(f"| {name} | failed: {rec.get('note')} | | | |")
            continue
        print(f"| {name} | {rec['chunkjac']:.4f} | {rec['best_peer']} | {rec['best_seconds']:.4f} | "
              f"{rec['ratio']:.2f} |", flush=True)
        print(json.dumps({"workload": name, **rec}), file=sys.stderr)


if __name__ == "__main__":
    main()
