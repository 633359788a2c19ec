"""Peak RSS growth of one chunkjac.compute call in a fresh process, against the budget.

    python benchmarks/rss_check.py MODEL SAMPLES BUDGET [--cold]

MODEL: pinn256 (3 -> 256x3 -> 3, tanh) or wide (784 -> 256 -> 10, ReLU). Prints one JSON line: the
plan, the peak RSS growth during the call (sampled every 0.5 ms), the result's size, and the slack
``peak - budget - result``. Unless --cold, a tiny call first loads the code paths chunkjac uses
(PyTorch's vmap, forward-AD and profiler machinery, ~100 MB of code and metadata loaded once per process),
so that the figure is what the call itself allocates.
"""
import json
import sys
import threading
import time

import psutil
import torch
from torch import nn

import chunkjac


def mlp(*w, act=nn.Tanh):
    layers = []
    for a, b in zip(w[:-1], w[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])


def main():
    name, B, budget = sys.argv[1], int(float(sys.argv[2])), sys.argv[3]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, d = {"pinn256": (mlp(3, 256, 256, 256, 3), 3), "wide": (mlp(784, 256, 10, act=nn.ReLU), 784)}[name]
    model.requires_grad_(False)
    x = torch.randn(B, d)
    if "--cold" not in sys.argv:
        chunkjac.compute(mlp(2, 4, 2), torch.randn(64, 2), mode="auto")
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = [False]

    def sample():
        while not done[0]:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t = time.perf_counter()
    plan = chunkjac.plan(model, x, budget=budget)
    J = chunkjac.compute(model, x, budget=budget)
    seconds = time.perf_counter() - t
    done[0] = True
    th.join()
    result = J.numel() * J.element_size()
    growth = peak[0] - base
    print(json.dumps({
        "model": name, "samples": B, "budget": plan.budget_bytes, "chunk_size": plan.chunk_size,
        "num_chunks": plan.num_chunks, "predicted_peak": plan.peak_bytes, "rss_growth": growth,
        "result_bytes": result, "slack": growth - plan.budget_bytes - result, "seconds": seconds,
        "plan": str(plan)}))


if __name__ == "__main__":
    main()
