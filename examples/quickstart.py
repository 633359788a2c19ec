"""Per-sample Jacobians of a batch: the questions of seeds 001 and 002."""
import torch
from torch import nn

import chunkjac

# Seed 001: x (batch, 3), y = sin(x): a (batch, 3, 3) Jacobian, J[i] = dy_i/dx_i.
x = torch.randn(1024, 3)
J = chunkjac.compute(torch.sin, x)
print("sin:", tuple(J.shape), "diagonal of J[77]:", J[77].diagonal())

# Seed 002: a batch of 3 inputs of dim 5 through a small net, Jacobians (3, 10, 5), not (3, 10, 3, 5).
f = nn.Sequential(nn.Linear(5, 2), nn.Sigmoid(), nn.Linear(2, 10))
J = chunkjac.compute(f, torch.randn(3, 5))
print("Sequential(5 -> 2 -> 10):", tuple(J.shape))

# Images work the same way: (B, C, H, W) -> (B, 4) gives (B, 4, C, H, W).
net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 6 * 6, 4))
print("conv net:", tuple(chunkjac.compute(net, torch.randn(16, 1, 8, 8)).shape))
