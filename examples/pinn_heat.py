"""A physics-informed net for the heat equation  u_t = κ (u_xx + u_yy)  on the unit square for
t in [0, 1], with u(x, y, 0) = sin(πx) sin(πy) and u = 0 on the square's edges (so u* = e^(-2κπ²t)
sin(πx) sin(πy)). The residual needs u_t and the Laplacian over the spatial coordinates only: one
chunkjac.derivatives call gives all three terms from one Taylor pass (three directions, two
second-order terms), with their graph for the training step (create_graph=True).

The plan is recorded once and passed back with plan=: the training loop pays nothing for planning."""
import math

import torch
from torch import nn

import chunkjac

torch.manual_seed(0)
kappa = 0.1
u = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
opt = torch.optim.Adam(u.parameters(), lr=5e-3)

inside = torch.rand(2048, 3)                                          # (x, y, t)
xy = torch.rand(256, 2)
start = torch.cat([xy, torch.zeros(256, 1)], 1)                       # t = 0
s, t = torch.rand(64), torch.rand(64)
edges = torch.cat([torch.stack(p, 1) for p in ((s, torch.zeros(64), t), (s, torch.ones(64), t),
                                                  (torch.zeros(64), s, t), (torch.ones(64), s, t))])
u0 = torch.sin(math.pi * start[:, :1]) * torch.sin(math.pi * start[:, 1:2])
terms = {"u_t": (2,), "u_xx": (0, 0), "u_yy": (1, 1)}                # indices into (x, y, t)
plan = chunkjac.plan(u, inside,
                     part=chunkjac.operator("derivatives", terms=terms), create_graph=True)
print(f"plan: {plan}")

losses = []
for step in range(301):
    d = chunkjac.derivatives(u, inside, terms, create_graph=True, plan=plan)   # {name: (B, 1)}
    residual = d["u_t"] - kappa * (d["u_xx"] + d["u_yy"])
    loss = (residual ** 2).mean() + 10 * ((u(start) - u0) ** 2).mean() + 10 * (u(edges) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if step % 100 == 0:
        print(f"step {step}: loss {loss.item():.4f}")

test = torch.rand(4096, 3)
with torch.no_grad():
    exact = torch.exp(-2 * kappa * math.pi ** 2 * test[:, 2:]) * torch.sin(math.pi * test[:, :1]) \
        * torch.sin(math.pi * test[:, 1:2])
    err = (u(test) - exact).norm() / exact.norm()
print(f"relative L2 error against u*: {err:.3f}")
assert losses[-1] < 0.1 * losses[0], "the loss should fall"
