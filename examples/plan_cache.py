"""A script run every morning: the second run starts from the plan the first one settled on.

Run it twice. The first run plans from the cost model and times equal-cost candidates on its first
chunks; what it settles on is written to the plan cache (chunkjac.plan_cache.path). The second run,
a new process, reads it and times nothing: its plan has no trials. CHUNKJAC_PLAN_CACHE=0 turns the
cache off; chunkjac.plan_cache.clear() empties it. The answer never depends on it.
"""
import os
import sys

import torch
from torch import nn

import chunkjac

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
x = torch.rand(int(sys.argv[1]) if len(sys.argv) > 1 else 40_000, 3)

before = chunkjac.plan_cache.hits
J = chunkjac.compute(model, x, chunk_size=1_000)
print(f"plan cache: {chunkjac.plan_cache.path}")
print("this process read a remembered plan" if chunkjac.plan_cache.hits > before else
      "no remembered plan: planned, and the run's choice is now on disk for the next process")
print(chunkjac.plan(model, x, chunk_size=1_000))  # the settled plan: no candidates left to time

# The answer is the same either way.
ref = torch.func.vmap(torch.func.jacrev(model))(x[:100])
torch.testing.assert_close(J[:100], ref)
folder = chunkjac.plan_cache.path
print("entries on disk:", len([n for n in os.listdir(folder) if n.endswith(".json")]) if os.path.isdir(folder) else 0)
