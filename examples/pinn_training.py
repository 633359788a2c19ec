"""Seeds 001 and 002: Jacobians inside a physics-informed training loss (create_graph=True), for a
model with several inputs and outputs whose outputs are needed afterwards (return_outputs=True).

Every step changes the parameters, not the model's structure: chunkjac keeps its decision (coupling
check, plan) and re-checks only now and then (``chunkjac.probe_cache.recheck_every``). A plan recorded
once and passed back with ``plan=`` skips even that, and under
``torch.use_deterministic_algorithms(True)`` the plan is chosen without timing, so every run of this
script computes the same bits."""
import torch
from torch import nn

import chunkjac


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))

    def forward(self, x1, x2, mask1, mask2):
        h = self.net(torch.cat([x1 * mask1, x2], -1))
        return h[:, :3] * mask2, h[:, 3]


torch.manual_seed(0)
model = Model()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
B = 4096
x1, x2 = torch.rand(B, 3), torch.rand(B, 2)
mask1, mask2 = torch.ones(B, 3), torch.ones(B, 3)

args = dict(wrt=0, output=0, create_graph=True, return_outputs=True)
plan = chunkjac.plan(model, (x1, x2, mask1, mask2), **args)  # recorded once: the same plan every step
print(f"plan: {plan}")

for step in range(5):
    # J = d out1_i / d x1_i for every sample: (B, 3, 3), differentiable w.r.t. the model's parameters.
    J, (out1, out2) = chunkjac.compute(model, (x1, x2, mask1, mask2), plan=plan, **args)
    divergence = J.diagonal(dim1=1, dim2=2).sum(-1)          # div u = sum_k du_k/dx_k
    loss = divergence.pow(2).mean() + (out2 - 1).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.5f}")
