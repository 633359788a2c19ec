"""A large batch inside a memory budget: look at the plan first, then run it with a progress bar."""
import sys

import torch
from torch import nn

import chunkjac

samples = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
model = nn.Sequential(nn.Linear(3, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3))
x = torch.rand(samples, 3) * 2 - 1

plan = chunkjac.plan(model, x, budget="64MB")
print(plan)                          # chunks, mode, predicted peak within the budget, predicted time
J = chunkjac.compute(model, x, budget="64MB", progress=True)
print(tuple(J.shape))

try:
    chunkjac.compute(model, x, budget="10KB")
except chunkjac.BudgetError as e:    # too small for one sample: the message says what would do
    print(e)
