"""Models chunkjac was not written for: never a crash, exact or a chunkjac error that says what to do."""
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

import chunkjac

D = torch.float64


def run_isolated(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter: a segfault fails the test instead of the test run."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


def test_a_model_moved_inside_fn_is_left_intact_and_exact():
    # Inside torch.func.jvp, model.to() assigns param.data a functorch wrapper that outlives the
    # transform; the next forward (the reverse-mode candidate) used to segfault.
    r = run_isolated("""
import torch, chunkjac
from torch import nn
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
w = m[0].weight
x = torch.randn(100, 4, dtype=torch.double)
J = chunkjac.compute(lambda z: m.to(z.device)(z), x)
ref = torch.func.vmap(torch.func.jacrev(m))(x)
torch.testing.assert_close(J, ref)
assert m[0].weight is w and isinstance(w, nn.Parameter)
m(x).sum().backward()  # the module still trains
assert w.grad is not None
print("exact")
""")
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"
    assert r.stdout.strip().endswith("exact")
