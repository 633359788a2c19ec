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
    rows.update(operator_workloads())
    return rows


# The operators' rows (PDE terms beyond the Laplacian): each with its target, "x chunkjac's time" of
# the named peer that the target reads against.
TARGETS = {}


def nested_laplacian(u, x, dims=None, create_graph=True):
    """sum_k d^2 u / dx_k^2 by nested autograd.grad, the way PINN codes write it (u: (B, 1))."""
    (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    lap = 0
    for k in (range(x.shape[1]) if dims is None else dims):
        lap = lap + torch.autograd.grad(g[:, k].sum(), x, retain_graph=True, create_graph=create_graph)[0][:, k:k + 1]
    return lap


def jet_bilaplacian(f, x):
    return vmap(jet.bilaplacian(f, (torch.zeros(x.shape[1]),)))(x)


def jet_weighted(f, x, w):
    def apply_s(z, v):  # C = diag(w) = S S^T, S = diag(sqrt(w))
        return (v @ w.sqrt().diag().T).reshape(v.shape[0], *z.shape)
    return vmap(jet.laplacian(f, (torch.zeros(x.shape[1]),), weighting=(apply_s, x.shape[1])))(x)


def operator_workloads():
    rows = {}
    torch.manual_seed(3)
    pinn = mlp(3, 128, 128, 128, 1)
    for p in pinn.parameters():
        p.requires_grad_(False)
    x2k = torch.rand(2000, 3) * 2 - 1

    def bilap_nested():
        x = x2k.clone().requires_grad_(True)
        return nested_laplacian(nested_laplacian(pinn(x), x), x, create_graph=False)

    name = "bi-Laplacian, PINN 3->128x3->1, 2,000 points"
    rows[name] = {"chunkjac": lambda: chunkjac.bilaplacian(pinn, x2k), "nested autograd.grad": bilap_nested}
    if jet is not None:
        rows[name]["vmap(jet.bilaplacian) (collapsed)"] = lambda: jet_bilaplacian(pinn, x2k)
    TARGETS[name] = ("<= 1.00 x the fastest peer", lambda r: min(v for k, v in r.items() if k != "chunkjac"), 1.0)

    torch.manual_seed(4)
    m10 = mlp(10, 128, 128, 128, 1)
    for p in m10.parameters():
        p.requires_grad_(False)
    x10 = torch.randn(10_000, 10)
    w = torch.arange(1.0, 11.0)

    def contracted_hessian():
        h = vmap(hessian(m10), chunk_size=2048)(x10)  # (B, 1, 10, 10)
        return (h.diagonal(dim1=-2, dim2=-1) * w).sum(-1)

    name = "weighted Laplacian C = diag(1..10), MLP 10->128x3->1, 10^4 points"
    rows[name] = {"chunkjac": lambda: chunkjac.laplacian(m10, x10, weights=torch.diag(w)),
                  "contracted vmap(hessian) chunks of 2048": contracted_hessian}
    if jet is not None:
        rows[name]["jet.laplacian weighted (collapsed)"] = lambda: jet_weighted(m10, x10, w)
    TARGETS[name] = ("<= 1.00 x the fastest peer", lambda r: min(v for k, v in r.items() if k != "chunkjac"), 1.0)

    torch.manual_seed(5)
    heat = mlp(3, 64, 64, 64, 1)
    xh = torch.rand(4096, 3)
    params = list(heat.parameters())
    opt = torch.optim.SGD(params, lr=0.0)  # a step that leaves the model as it was: every round the same work

    def heat_chunkjac():
        d = chunkjac.derivatives(heat, xh, {"u_t": (2,), "u_xx": (0, 0), "u_yy": (1, 1)}, create_graph=True)
        loss = ((d["u_t"] - d["u_xx"] - d["u_yy"]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return torch.stack([p.grad.norm() for p in params if p.grad is not None])

    def heat_nested():
        x = xh.clone().requires_grad_(True)
        u = heat(x)
        (g,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        u_xx = torch.autograd.grad(g[:, 0].sum(), x, create_graph=True)[0][:, 0:1]
        u_yy = torch.autograd.grad(g[:, 1].sum(), x, create_graph=True)[0][:, 1:2]
        loss = ((g[:, 2:3] - u_xx - u_yy) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return torch.stack([p.grad.norm() for p in params if p.grad is not None])

    name = "heat-equation training step u_t - u_xx - u_yy, 3->64x3->1, 4,096 points"
    rows[name] = {"chunkjac": heat_chunkjac, "nested autograd.grad": heat_nested}
    TARGETS[name] = (">= 2x faster than nested autograd.grad", lambda r: r["nested autograd.grad"], 2.0)

    torch.manual_seed(6)
    m100 = mlp(100, 128, 128, 1)
    for p in m100.parameters():
        p.requires_grad_(False)
    x100 = torch.randn(2000, 100)
    name = "randomized Laplacian (16 Rademacher directions), MLP 100->128x2->1, 2,000 points"
    rows[name] = {"chunkjac": lambda: chunkjac.laplacian(m100, x100, samples=16, seed=0),
                  "chunkjac, exact": lambda: chunkjac.laplacian(m100, x100)}
    if jet is not None:
        rows[name]["jet.laplacian randomized (16, collapsed)"] = lambda: vmap(jet.laplacian(
            m100, (torch.zeros(100),), randomization=("rademacher", 16)), randomness="different")(x100)
    TARGETS[name] = ("<= 0.35 x the exact Laplacian's time", lambda r: r["chunkjac, exact"], 1 / 0.35)
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
            if "randomized" in name:  # estimates: each method its own (checked in tests/test_operators.py)
                break
            got = f()
            err = (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
            assert err < 1e-3, f"{name}: {k} disagrees with chunkjac (relative {err:.2g})"
        medians = interleaved_table(name, methods, a.rounds)
        if name in TARGETS:
            what, peer, factor = TARGETS[name]
            ratio = medians["chunkjac"] / peer(medians)
            print(f"target: chunkjac {what}: chunkjac / that = {ratio:.2f} (needs <= {1 / factor:.2f}): "
                  f"{'met' if ratio <= 1 / factor else 'NOT met'}\n", flush=True)


if __name__ == "__main__":
    main()
