"""chunkjac inside a training loop: no false alarms, no per-step tax, reproducible plans."""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

import chunkjac
from chunkjac import _call


def pinn(seed: int, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1)).to(dtype)


@pytest.fixture
def recheck_every_call():
    before = chunkjac.probe_cache.recheck_every
    chunkjac.probe_cache.recheck_every = 1  # the coupling check runs at every step
    yield
    chunkjac.probe_cache.recheck_every = before


@pytest.mark.parametrize("seed, dtype, steps", [(0, torch.float32, 30), (1, torch.float32, 30), (2, torch.float32, 30),
                                                (0, torch.bfloat16, 12), (1, torch.bfloat16, 12)])
def test_no_false_coupling_alarm_over_a_training_loop(recheck_every_call, seed, dtype, steps):
    # Long loops over more seeds: benchmarks/bench_training.py --alarms.
    u = pinn(seed, dtype)
    opt = torch.optim.Adam(u.parameters(), lr=1e-2)
    x = (torch.rand(2048, 2) * 2 - 1).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", chunkjac.CouplingWarning)
        for _ in range(steps):
            J = chunkjac.compute(u, x, create_graph=True)  # (B, 1, 2)
            loss = (J[:, 0, 0].float() - torch.sin(x[:, 0].float())).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        J = chunkjac.compute(u, x)
    ref = vmap(jacrev(copy.deepcopy(u).double()))(x.double())
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5  # the dtype's rounding of a 3-layer net, relative to scale
    assert (J.double() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("module", [
    lambda: nn.BatchNorm1d(2).train(),
    lambda: (lambda m: lambda x: m(x, x, x)[0])(nn.MultiheadAttention(2, 1)),
], ids=["batchnorm-train", "attention-across-batch"])
def test_real_couplings_are_still_caught_in_float32(module):
    torch.manual_seed(0)
    with pytest.warns(chunkjac.CouplingWarning):
        chunkjac.compute(module(), torch.randn(32, 2))


def test_the_verdict_is_not_rechecked_at_every_optimizer_step(monkeypatch):
    calls = []
    real = _call.check_coupling
    monkeypatch.setattr(_call, "check_coupling", lambda spec: calls.append(1) or real(spec))
    chunkjac.probe_cache.clear()
    u = pinn(0)
    opt = torch.optim.Adam(u.parameters(), lr=1e-3)
    x = torch.rand(512, 2)
    for _ in range(30):
        J = chunkjac.compute(u, x, create_graph=True)
        opt.zero_grad()
        J.pow(2).mean().backward()
        opt.step()  # new parameter values, same structure
    assert len(calls) == 5  # calls 1, 2, 4, 8 and 16: the gap doubles towards recheck_every
    u.eval()  # a training flag is part of the structure: checked at once
    chunkjac.compute(u, x)
    assert len(calls) == 6


def test_the_verdict_is_rechecked_every_n_calls(monkeypatch):
    calls = []
    real = _call.check_coupling
    monkeypatch.setattr(_call, "check_coupling", lambda spec: calls.append(1) or real(spec))
    monkeypatch.setattr(chunkjac.probe_cache, "recheck_every", 5)
    chunkjac.probe_cache.clear()
    u, x = pinn(1), torch.rand(64, 2)
    for _ in range(20):
        chunkjac.compute(u, x)
    assert len(calls) == 1  # the same values: the answer cannot have changed
    for _ in range(19):
        with torch.no_grad():
            u[0].weight.mul_(1.001)  # new values, as an optimizer step makes them
        chunkjac.compute(u, x)
    assert len(calls) == 6  # after 1, 2, 4, 5 and 5 more changes: the gap doubles up to 5


def test_a_recorded_plan_runs_without_check_or_probe(monkeypatch):
    u, x = pinn(2, torch.float64), torch.rand(300, 2, dtype=torch.float64)
    p = chunkjac.plan(u, x)
    monkeypatch.setattr(_call, "check_coupling", lambda spec: pytest.fail("checked again"))
    monkeypatch.setattr(_call, "make_plan", lambda *a, **k: pytest.fail("planned again"))
    torch.testing.assert_close(chunkjac.compute(u, x, plan=p), vmap(jacrev(u))(x))
    with pytest.raises(ValueError, match="chunkjac: plan= was made for another call"):
        chunkjac.compute(u, x[:10], plan=p)
    with pytest.raises(TypeError, match="chunkjac: plan must be a chunkjac.Plan"):
        chunkjac.compute(u, x, plan="fast")


def test_deterministic_algorithms_choose_the_plan_without_timing():
    torch.use_deterministic_algorithms(True)
    try:
        u, x = pinn(3), torch.rand(5000, 2)
        chunkjac.probe_cache.clear()
        a = chunkjac.plan(u, x)
        chunkjac.probe_cache.clear()
        b = chunkjac.plan(u, x)
    finally:
        torch.use_deterministic_algorithms(False)
    assert a.seconds is None and a == b


def test_nested_calls_give_second_derivatives():
    # A chunkjac call inside fn: the outer forward-mode candidate cannot run it (requires_grad_ inside
    # torch.func.jvp) and is passed over; reverse mode over the inner create_graph result is exact.
    u = pinn(4, torch.float64)
    x = torch.rand(64, 2, dtype=torch.float64)
    ux = lambda z: chunkjac.compute(u, z, create_graph=True)[:, 0]  # noqa: E731
    H = chunkjac.compute(ux, x, create_graph=True)
    ref = vmap(torch.func.hessian(lambda v: u(v)[0]))(x)
    torch.testing.assert_close(H, ref)
    H.diagonal(dim1=1, dim2=2).sum().backward()  # a loss on u_xx + u_yy reaches the parameters
    v = copy.deepcopy(u)
    for q in v.parameters():
        q.grad = None
    ref_loss = vmap(torch.func.hessian(lambda z: v(z)[0]))(x).diagonal(dim1=1, dim2=2).sum()
    ref_loss.backward()
    torch.testing.assert_close(u[0].weight.grad, v[0].weight.grad)
