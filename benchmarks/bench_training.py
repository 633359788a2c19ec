"""A PINN training step with chunkjac inside, against the hand-written step, in one interleaved run.

PINN MLP 2 -> 64 -> 64 -> 1 (tanh), B = 2,048 collocation points, Adam, loss on the per-sample input
gradient u_x, backward to the parameters, step. Methods, each its own model and optimizer from the
same initialisation, stepped in turn (interleaved), median step time over STEPS steps after WARMUP:

- hand-written: ``autograd.grad(u(x).sum(), x, create_graph=True)`` (the sum trick by hand);
- chunkjac default: ``chunkjac.compute(u, x, create_graph=True)`` (coupling="auto");
- chunkjac pinned: the same with a Plan recorded on the first step and passed back (``plan=``);
- nested second derivative: u_xx by ``compute`` of a ``compute(..., create_graph=True)``.

    python benchmarks/bench_training.py [--steps 200] [--warmup 20]
    python benchmarks/bench_training.py --alarms [--steps 300] [--seeds 6]

``--alarms`` counts false coupling alarms instead: independent models (the PINN MLP, a small CNN, a
LayerNorm net) trained in float32 and bfloat16 with the coupling check run at every step
(``probe_cache.recheck_every = 1``); every CouplingWarning there is a false alarm.
"""
import argparse
import json
import statistics
import time

import torch
from torch import nn

import chunkjac


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


def alarms(steps: int, seeds: int) -> None:
    import warnings
    chunkjac.probe_cache.recheck_every = 1
    nets = {
        "PINN MLP 2-64-64-1": (model, (2048, 2)),
        "CNN 1x8x8": (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(144, 1)),
                      (256, 1, 8, 8)),
        "LayerNorm net": (lambda: nn.Sequential(nn.Linear(4, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 2)),
                          (1024, 4)),
    }
    print("| model | dtype | seeds x steps | false alarms |")
    print("| --- | --- | ---: | ---: |")
    for name, (make, shape) in nets.items():
        for dtype in (torch.float32, torch.bfloat16):
            count = 0
            for seed in range(seeds):
                torch.manual_seed(seed)
                u = make().to(dtype)
                opt = torch.optim.Adam(u.parameters(), lr=1e-2)
                x = torch.randn(shape).to(dtype)
                for _ in range(steps):
                    with warnings.catch_warnings(record=True) as w:
                        warnings.simplefilter("always", chunkjac.CouplingWarning)
                        J = chunkjac.compute(u, x, create_graph=True)
                    count += sum(issubclass(r.category, chunkjac.CouplingWarning) for r in w)
                    opt.zero_grad()
                    J.float().pow(2).mean().backward()
                    opt.step()
            print(f"| {name} | {str(dtype).split('.')[-1]} | {seeds} x {steps} | {count} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--alarms", action="store_true")
    ap.add_argument("--seeds", type=int, default=6)
    a = ap.parse_args()
    torch.set_num_threads(2)
    if a.alarms:
        alarms(a.steps, a.seeds)
        return
    x = torch.rand(a.batch, 2) * 2 - 1
    target = torch.sin(x[:, :1]) * torch.cos(x[:, 1:])

    def hand(u):
        xr = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(u(xr).sum(), xr, create_graph=True)
        return g  # (B, 2)

    def default(u):
        return chunkjac.compute(u, x, create_graph=True)[:, 0]  # (B, 1, 2) -> (B, 2)

    pinned_plan = {}

    def pinned(u):
        if "p" not in pinned_plan:
            pinned_plan["p"] = chunkjac.plan(u, x, create_graph=True)
        return chunkjac.compute(u, x, create_graph=True, plan=pinned_plan["p"])[:, 0]

    def nested(u):
        ux = lambda z: chunkjac.compute(u, z, create_graph=True)[:, 0]  # noqa: E731
        return chunkjac.compute(ux, x, create_graph=True).diagonal(dim1=1, dim2=2)  # u_xx, u_yy

    methods = {"hand-written autograd.grad": hand, "chunkjac default": default, "chunkjac pinned plan": pinned,
               "nested second derivative (chunkjac)": nested}
    state = {}
    for name in methods:
        u = model()
        state[name] = (u, torch.optim.Adam(u.parameters(), lr=1e-3), [])
    for step in range(a.warmup + a.steps):
        for name, fn in methods.items():
            u, opt, times = state[name]
            t = time.perf_counter()
            g = fn(u)
            loss = (g[:, :1] - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step >= a.warmup:
                times.append(time.perf_counter() - t)
    base = statistics.median(state["hand-written autograd.grad"][2])
    print("| step | median (ms) | ratio to hand-written |")
    print("| --- | ---: | ---: |")
    for name, (_, _, times) in state.items():
        m = statistics.median(times)
        print(f"| {name} | {m * 1e3:.2f} | {m / base:.2f} |")
    print(json.dumps({name: statistics.median(t) for name, (_, _, t) in state.items()}))


if __name__ == "__main__":
    main()
