"""TRAK-style data attribution from projected per-sample gradients.

A small classifier is trained on 1,000 points; chunkjac dumps the projected per-sample gradients of
its margin (compute(..., wrt="params", project=Projection(...), out="grads.npy"): never the
full gradients, resumable like any dump) and computes the same for a few held-out points. The
attribution of training point j to test point t is TRAK's g_t (G^T G + λI)^-1 g_j. The check users
make of an attribution: retrain without the 40 training points it ranks most helpful to a test point
and the model's margin on that point falls; retrain without 40 random points and it barely moves."""
import os
import tempfile

import numpy as np
import torch
from torch import nn

import chunkjac

torch.manual_seed(0)
D, C, N = 20, 5, 1000
centres = torch.randn(C, D) * 0.8


def sample(n, g):
    y = torch.randint(0, C, (n,), generator=g)
    return centres[y] + torch.randn(n, D, generator=g) * 1.6, y


x_train, y_train = sample(N, torch.Generator().manual_seed(1))
x_test, y_test = sample(200, torch.Generator().manual_seed(2))


def train(keep: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)  # the same initialisation and steps for every retraining
    net = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, C))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(400):
        loss = nn.functional.cross_entropy(net(x_train[keep]), y_train[keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


class Margin(nn.Module):
    """TRAK's model output function: the correct class's logit against the log-sum-exp of the others,
    one number per sample; its per-sample gradients are what TRAK projects."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, y):
        z = self.net(x)
        mask = nn.functional.one_hot(y, C).bool()
        return z[mask] - torch.logsumexp(z.masked_fill(mask, -torch.inf), 1)


def margin(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The correct class's logit minus the best other one."""
    with torch.no_grad():
        z = net(x)
        other = z.clone()
        other[torch.arange(len(y)), y] = -torch.inf
        return z[torch.arange(len(y)), y] - other.max(1).values


everyone = torch.ones(N, dtype=torch.bool)
net = train(everyone)
print(f"test accuracy: {(margin(net, x_test, y_test) > 0).float().mean():.2f}")

projection = chunkjac.Projection(256, seed=0, kind="kronecker")
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "grads.npy")
    chunkjac.compute(Margin(net), (x_train, y_train), wrt="params", project=projection, out=path)
    g_train = torch.from_numpy(np.load(path))                                  # (1000, 256)
# Test points the model gets right, but not by much: where a few training points matter.
m = margin(net, x_test, y_test)
right = torch.nonzero(m > 0).reshape(-1)
picked = right[torch.argsort(m[right])[:6]]
g_test = chunkjac.compute(Margin(net), (x_test[picked], y_test[picked]), wrt="params", project=projection)

with torch.no_grad():
    p_right = torch.softmax(net(x_train), 1)[torch.arange(N), y_train]
kernel = g_train.T @ g_train + 1e-3 * torch.eye(256)
scores = (g_test @ torch.linalg.solve(kernel, g_train.T)) * (1 - p_right)   # (tests, 1000): TRAK's scores
# The largest scores are the proponents: training points whose removal should lower the test point's
# margin most.
drops_top, drops_random = [], []
gen = torch.Generator().manual_seed(3)
for k, t in enumerate(picked):
    for order, drops in ((torch.argsort(scores[k], descending=True), drops_top), (torch.randperm(N, generator=gen), drops_random)):
        keep = everyone.clone()
        keep[order[:40]] = False
        after = margin(train(keep), x_test[t:t + 1], y_test[t:t + 1])
        drops.append(float(m[t] - after))
print(f"margin drop on {len(picked)} test points, removing the 40 top-attributed training points: "
      f"{np.mean(drops_top):.3f}; 40 random ones: {np.mean(drops_random):.3f}")
assert np.mean(drops_top) > np.mean(drops_random), "the attributed points should matter more than random ones"
