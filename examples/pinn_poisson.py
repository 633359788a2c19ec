"""A physics-informed net for the Poisson equation  Δu = f  on the unit square, u = 0 on its boundary,
with f = -2π² sin(πx) sin(πy) (so u* = sin(πx) sin(πy)). The residual needs Δu at every collocation
point, inside the loss, at every step: chunkjac.laplacian gives it with its graph (create_graph=True)
and u from the same pass (return_outputs=True), by Taylor mode (one forward pass that carries the
value, the two first-order directions and the summed second derivatives).

The plan is recorded once and passed back with plan=: the training loop pays nothing for planning."""
import math

import torch
from torch import nn

import chunkjac

torch.manual_seed(0)
u = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
opt = torch.optim.Adam(u.parameters(), lr=5e-3)

interior = torch.rand(2048, 2)
t = torch.rand(64)
zeros, ones = torch.zeros(64), torch.ones(64)
boundary = torch.cat([torch.stack(p, 1) for p in ((t, zeros), (t, ones), (zeros, t), (ones, t))])


def source(p):
    return -2 * math.pi ** 2 * torch.sin(math.pi * p[:, :1]) * torch.sin(math.pi * p[:, 1:])


f = source(interior)
plan = chunkjac.plan(u, interior, part="laplacian", create_graph=True, return_outputs=True)
print(f"plan: {plan}")

losses = []
for step in range(301):
    lap_u, _ = chunkjac.laplacian(u, interior, create_graph=True, return_outputs=True, plan=plan)  # (B, 1) each
    loss = ((lap_u - f) ** 2).mean() + 100 * (u(boundary) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if step % 100 == 0:
        print(f"step {step}: loss {loss.item():.4f}")

test = torch.rand(4096, 2)
with torch.no_grad():
    exact = torch.sin(math.pi * test[:, :1]) * torch.sin(math.pi * test[:, 1:])
    err = (u(test) - exact).norm() / exact.norm()
print(f"relative L2 error against u*: {err:.3f}")
assert losses[-1] < 0.1 * losses[0], "the loss should fall"
