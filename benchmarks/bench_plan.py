"""The planner's predictions against measurements, and its chunk against a sweep of fixed chunks.

For each budget: the plan's predicted peak per chunk and total seconds, against the measured peak
(CUDA: torch.cuda.max_memory_allocated; CPU: the live tensor bytes counted at every operator) and
the measured seconds. Then a sweep of fixed chunk sizes, interleaved with the planned one over
--rounds rounds; the table gives the median seconds and the planned chunk's ratio to the best fixed
chunk (the target is <= 1.15).

    python benchmarks/bench_plan.py [--model pinn128|pinn256] [--samples 200000] [--device cpu|cuda]
"""
import argparse
import statistics
import time

import torch
from torch import nn

import chunkjac
from chunkjac._budget import format_bytes
from chunkjac._memory import measure_peak


def mlp(*w, act=nn.Tanh):
    layers = []
    for a, b in zip(w[:-1], w[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pinn256", choices=["pinn128", "pinn256"])
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budgets", default="16MB,64MB,256MB,1GB")
    ap.add_argument("--chunks", default="1024,2048,4096,8192,16384,32768,65536")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.device == "cpu":
        torch.set_num_threads(2)
    device = torch.device(a.device)
    width = 128 if a.model == "pinn128" else 256
    model = mlp(3, width, width, width, 3).to(device).requires_grad_(False)
    x = torch.randn(a.samples, 3, device=device)
    chunkjac.compute(model, x[:4096])  # PyTorch's one-time set-up, outside the figures

    print(f"## {a.model}, {a.samples:,} samples on {device}\n")
    print("| budget | plan | predicted peak | measured peak | predicted s | measured s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    planned = {}
    for b in a.budgets.split(","):
        plan = chunkjac.plan(model, x, budget=b)
        planned[b] = plan.chunk_size
        # Measure one chunk's peak (the planner's claim), then time the whole run.
        peak, _ = measure_peak(lambda: chunkjac.compute(model, x[:plan.chunk_size], chunk_size=plan.chunk_size,
                                                        budget=b), device)
        secs = timed(lambda: chunkjac.compute(model, x, budget=b), device)
        pred_s = f"{plan.seconds:.2f}" if plan.seconds is not None else "–"
        print(f"| {b} | {plan.num_chunks} × {plan.chunk_size:,}, {plan.mode}, {plan.rows_per_vjp} rows/call | "
              f"{format_bytes(plan.peak_bytes)} | {format_bytes(peak)} | {pred_s} | {secs:.2f} |")

    default = chunkjac.plan(model, x)
    sizes = sorted({int(c) for c in a.chunks.split(",")} | {default.chunk_size})
    runs = {c: [] for c in sizes}
    for _ in range(a.rounds):
        for c in sizes:
            runs[c].append(timed(lambda: chunkjac.compute(model, x, chunk_size=c), device))
    med = {c: statistics.median(v) for c, v in runs.items()}
    best = min(med.values())
    print(f"\nSweep of fixed chunk sizes (median of {a.rounds} interleaved rounds); the default plan "
          f"chooses {default.chunk_size:,}:\n")
    print("| chunk | seconds | samples/s | vs best |")
    print("| ---: | ---: | ---: | ---: |")
    for c in sizes:
        mark = " (planned)" if c == default.chunk_size else ""
        print(f"| {c:,}{mark} | {med[c]:.3f} | {a.samples / med[c]:,.0f} | {med[c] / best:.2f} |")


if __name__ == "__main__":
    main()
