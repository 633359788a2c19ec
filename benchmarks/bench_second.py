"""Second derivatives: chunkjac.hessian / laplacian against what users write today, one interleaved run.

Each workload builds its model and points, runs every method once (warm-up: chunkjac plans then,
and its plan is cached), checks each method's result against chunkjac's, then times ROUNDS rounds
(every method once per round, the order rotating) and reports medians, ratios to chunkjac and the
peak memory of one call (chunkjac's own profiler-based count, see _memory). Only ratios measured side
by side count on a noisy machine. float32, 2 threads, no graph kept unless the row says so.

Peers: chunked ``vmap(torch.func.hessian)`` (the fastest PyTorch route the anchors found), the seed's
grad-of-grad loop (../seeds 002), and, when the ``jet`` package is importable (jet-for-pytorch, Python
>= 3.12; run this file with that environment's python), its collapsed Taylor mode ``jet.laplacian``.

    python benchmarks/bench_second.py [--rounds 3] [WORKLOAD-SUBSTRING ...]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import hessian, vmap  # noqa: E402

import chunkjac  # noqa: E402
from _harness import interleaved_table  # noqa: E402

try:
    import jet  # noqa: E402
except ImportError:
    jet = None


def mlp(*w):
    layers = []
    for a, b in zip(w[:-1], w[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def vmap_hessian(f, x, chunk, part):
    h = vmap(hessian(f), chunk_size=chunk)(x)
    if part == "full":
        return h
    d = h.diagonal(dim1=-2, dim2=-1)
    return d if part == "diagonal" else d.sum(-1)


def seed_loop(f, x, create_graph=False):
    """Seed 002's grad-of-grad loop: per output and input dim, the exact Laplacian of independent samples."""
    xr = x.clone().requires_grad_(True)
    y = f(xr)
    out = []
    for o in range(y.shape[1]):
        (j1,) = torch.autograd.grad(y[:, o].sum(), xr, create_graph=True)
        lap = 0
        for k in range(x.shape[1]):
            lap = lap + torch.autograd.grad(j1[:, k].sum(), xr, retain_graph=True, create_graph=create_graph)[0][:, k]
        out.append(lap)
    return torch.stack(out, 1)


def jet_laplacian(f, x, chunk):
    lap = jet.laplacian(f, (torch.zeros(x.shape[1]),))
    return vmap(lap, chunk_size=chunk)(x)


def workloads():
    torch.manual_seed(0)
    pinn = mlp(3, 128, 128, 128, 3)
    x5 = torch.rand(100_000, 3) * 2 - 1
    for p in pinn.parameters():
        p.requires_grad_(False)  # no graph kept: a Laplacian as a measurement, as the anchors ran it
    rows = {}
    for part in ("laplacian", "diagonal", "full"):
        m = {"chunkjac": lambda part=part: chunkjac.hessian(pinn, x5, part=part, budget="1GB"),
             "vmap(hessian) chunks of 8192": lambda part=part: vmap_hessian(pinn, x5, 8192, part)}
        if part == "laplacian":
            m["seed 002 grad-of-grad loop"] = lambda: seed_loop(pinn, x5)
            if jet is not None:
                m["jet.laplacian (collapsed Taylor)"] = lambda: jet_laplacian(pinn, x5, 8192)
        rows[f"PINN 3->128x3->3, 10^5 points, {part}"] = m

    torch.manual_seed(1)
    train = mlp(3, 128, 128, 128, 1)
    xt = torch.rand(10_000, 3) * 2 - 1
    src = torch.ones(10_000, 1)
    opt_params = list(train.parameters())
    recorded = chunkjac.plan(train, xt, part="laplacian", create_graph=True, return_outputs=True, budget="1GB")

    def step_chunkjac(plan=None):
        lap, u = chunkjac.laplacian(train, xt, create_graph=True, return_outputs=True, budget="1GB", plan=plan)
        loss = ((lap - src) ** 2).mean() + (u ** 2).mean()
        return torch.stack([g.norm() for g in torch.autograd.grad(loss, opt_params)])

    def step_seed():
        xr = xt.clone().requires_grad_(True)
        u = train(xr)
        lap = seed_loop(lambda z: train(z), xt, create_graph=True)
        loss = ((lap - src) ** 2).mean() + (u ** 2).mean()
        return torch.stack([g.norm() for g in torch.autograd.grad(loss, opt_params)])

    rows["training step: loss on the Laplacian, backward to the parameters (PINN 3->128x3->1, 10^4)"] = {
        "chunkjac": step_chunkjac, "chunkjac, recorded plan": lambda: step_chunkjac(recorded),
        "seed 002 grad-of-grad loop": step_seed}

    torch.manual_seed(2)
    wide = mlp(50, 256, 256, 256, 1)
    for p in wide.parameters():
        p.requires_grad_(False)
    x50 = torch.randn(10_000, 50)
    m = {"chunkjac": lambda: chunkjac.laplacian(wide, x50, budget="1GB"),
         "vmap(hessian) chunks of 1024": lambda: vmap_hessian(wide, x50, 1024, "laplacian")}
    if jet is not None:
        m["jet.laplacian (collapsed Taylor)"] = lambda: jet_laplacian(wide, x50, 1024)
    rows["MLP 50->256x3->1, 10^4 points, laplacian"] = m
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("only", nargs="*")
    a = ap.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, jet: {'yes' if jet else 'not installed'}\n")
    for name, methods in workloads().items():
        if a.only and not any(s in name for s in a.only):
            continue
        ref = methods["chunkjac"]()
        for k, f in methods.items():
            got = f()
            err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
            assert err < 1e-3, f"{name}: {k} disagrees with chunkjac (relative {err:.2g})"
        interleaved_table(name, methods, a.rounds)


if __name__ == "__main__":
    main()
