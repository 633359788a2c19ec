"""A physics-informed net for viscous Burgers' equation  u_t + u u_x = ν u_xx  on x in [-1, 1], t in
[0, 1], with u(x, 0) = -sin(πx) and u(±1, t) = 0 (the DeepXDE and PINA benchmark). The residual
needs u, u_t, u_x and u_xx: chunkjac.derivatives gives the three derivatives and u itself
(return_outputs=True) from one Taylor pass, with their graph for the training step."""
import math

import torch
from torch import nn

import chunkjac

torch.manual_seed(0)
nu = 0.01 / math.pi
u = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
opt = torch.optim.Adam(u.parameters(), lr=5e-3)

inside = torch.cat([torch.rand(2048, 1) * 2 - 1, torch.rand(2048, 1)], 1)   # (x, t)
x0 = torch.rand(256, 1) * 2 - 1
start = torch.cat([x0, torch.zeros(256, 1)], 1)
t = torch.rand(128, 1)
edges = torch.cat([torch.cat([-torch.ones(128, 1), t], 1), torch.cat([torch.ones(128, 1), t], 1)])
terms = {"u_x": (0,), "u_t": (1,), "u_xx": (0, 0)}
plan = chunkjac.plan(u, inside, part=chunkjac.operator("derivatives", terms=terms), create_graph=True,
                     return_outputs=True)
print(f"plan: {plan}")

losses = []
for step in range(301):
    d, u_in = chunkjac.derivatives(u, inside, terms, create_graph=True, return_outputs=True, plan=plan)
    residual = d["u_t"] + u_in * d["u_x"] - nu * d["u_xx"]
    loss = (residual ** 2).mean() + 10 * ((u(start) + torch.sin(math.pi * x0)) ** 2).mean() \
        + 10 * (u(edges) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if step % 100 == 0:
        print(f"step {step}: loss {loss.item():.4f}")
assert losses[-1] < 0.2 * losses[0], "the loss should fall"
