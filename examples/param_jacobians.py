"""Per-sample Jacobians w.r.t. a model's parameters, and the empirical neural tangent kernel built from
them: NTK(x1, x2)[i, j] = sum over parameters of J(x1_i) J(x2_j)^T, a (B1, B2, out, out) kernel.

chunkjac.compute(model, x, wrt="params") gives a dict name -> (B, *out, *param.shape) in
named_parameters() order (flat=True: one (B, *out, P) tensor, the same order flattened), sized under
a memory budget; out="folder/" dumps one .npy per parameter, resumably. The kernel is checked against
torch.func's own NTK recipe (vmap(jacrev(functional_call))).
"""
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import chunkjac

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
x1, x2 = torch.randn(20, 1, 8, 8), torch.randn(30, 1, 8, 8)

print(f"plan: {chunkjac.plan(model, x1, wrt='params')}")
j1 = chunkjac.compute(model, x1, wrt="params", flat=True)   # (20, 10, P)
j2 = chunkjac.compute(model, x2, wrt="params", flat=True)   # (30, 10, P)
ntk = torch.einsum("aip,bjp->abij", j1, j2)                 # (20, 30, 10, 10)
print(f"per-sample Jacobians {tuple(j1.shape)}, NTK {tuple(ntk.shape)}")

# torch.func's recipe (https://pytorch.org/tutorials/intermediate/neural_tangent_kernels.html)
params = {k: v.detach() for k, v in model.named_parameters()}


def one(p, x):
    return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)


def jacs(x):
    j = vmap(jacrev(one), (None, 0))(params, x)
    return [v.flatten(2) for v in j.values()]


reference = sum(torch.einsum("Naf,Mbf->NMab", a, b) for a, b in zip(jacs(x1), jacs(x2)))
err = (ntk - reference).abs().max().item()
print(f"max |NTK - torch.func's| = {err:.2e}")
assert err < 1e-4 * reference.abs().max().item()
