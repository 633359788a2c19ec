"""Seed 000: dy_i/dC for a batch of outputs and one shared parameter C, without a Python loop."""
import torch

import chunkjac


def routine(C, x):
    return torch.tanh(C * x) * x + C ** 2


x = torch.arange(10)                 # an integer batch: not differentiated, passed through
C = torch.tensor(-5.0)
dy_dC = chunkjac.compute(lambda x, C: C * x, (x, C), in_dims=(0, None), wrt=1)
print("dy/dC of C*x:", dy_dC)        # tensor([0., 1., ..., 9.])

x = torch.linspace(-2, 2, 1_000_000)
dy_dC = chunkjac.compute(lambda x, C: routine(C, x), (x, C), in_dims=(0, None), wrt=1)
print("dy/dC of the routine at 10^6 points:", tuple(dy_dC.shape))

# A parameter of a module, by name: per-sample derivatives w.r.t. a shared weight.
lin = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh())
J = chunkjac.compute(lin, torch.randn(100, 3), wrt="0.bias")
print("d y_i / d bias:", tuple(J.shape))  # (100, 2, 2)
