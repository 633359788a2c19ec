"""Samples that interact: attention across the batch (seed 001), BatchNorm in training mode, groups.

The sum trick differentiates y.sum(0); when y_i depends on other samples' inputs it silently adds
their terms. chunkjac checks for that (coupling="auto"), warns once, and returns the exact blocks.
"""
import warnings

import torch
from torch import nn

import chunkjac

torch.manual_seed(0)


class Attention(nn.Module):
    """Every sample attends to every other sample of the batch."""

    def __init__(self, d=3, h=8):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(d, d)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).T / 8 ** 0.5, dim=-1)
        return a @ self.v(x) + torch.tanh(x)


f = Attention().double()
x = torch.randn(64, 3, dtype=torch.float64)

# 1. The default call notices the interaction and says so (one CouplingWarning).
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    J = chunkjac.compute(f, x)
print("warning:", str(caught[0].message)[:100], "...")
print("J:", tuple(J.shape))

# 2. It is exact: the diagonal blocks of the full (64*3) x (64*3) Jacobian.
full = torch.autograd.functional.jacobian(f, x).reshape(64, 3, 64, 3)
blocks = full.diagonal(dim1=0, dim2=2).permute(2, 0, 1)
print("max |J - diagonal blocks of the full Jacobian|:", (J - blocks).abs().max().item())
wrong = chunkjac.compute(f, x, coupling="independent")  # what the sum trick returns
print("max error of the sum trick:", (wrong - blocks).abs().max().item())

# 3. The plan says what it costs before anything runs; coupling="coupled" states it (no warning).
print("plan:", chunkjac.plan(f, x, coupling="coupled"))

# 4. Samples that interact only within groups (tokens of one sequence): pass the group ids, and
#    the products grow with the largest group, not with the batch.
class GroupAttention(Attention):
    def forward(self, x):
        z = x.reshape(-1, 8, x.shape[-1])  # groups of 8 consecutive samples
        a = torch.softmax(self.q(z) @ self.k(z).transpose(-1, -2) / 8 ** 0.5, dim=-1)
        return (a @ self.v(z) + torch.tanh(z)).reshape(x.shape)


g = GroupAttention().double()
xs = torch.randn(4096, 3, dtype=torch.float64)
ids = torch.arange(4096) // 8
print("groups plan:", chunkjac.plan(g, xs, coupling=ids))
Jg = chunkjac.compute(g, xs, coupling=ids)
ref = torch.func.vmap(torch.func.jacrev(g))(xs[:8].reshape(1, 8, 3))[0]  # first group, in full
print("groups: max error on the first group:",
      (Jg[:8] - ref.diagonal(dim1=0, dim2=2).permute(2, 0, 1)).abs().max().item())

# 5. BatchNorm in training mode couples samples through the batch statistics; its running
#    statistics are left as they were (a Jacobian is not a training step).
bn = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).double().train()
Jbn = chunkjac.compute(bn, x, coupling="coupled")
print("BatchNorm (train):", tuple(Jbn.shape))

# 6. You already ran the forward pass and need y afterwards: jacobian_of works on that graph.
xr = x.clone().requires_grad_(True)
y = f(xr)
Jy = chunkjac.jacobian_of(y, xr, coupling="coupled")
print("jacobian_of == compute:", torch.allclose(Jy, J, rtol=1e-10, atol=1e-12))
y.pow(2).sum().backward()  # the graph is still there
