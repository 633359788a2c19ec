"""The executor: out-of-memory back-off, progress bar, probe cache, chunk_size override."""
import warnings

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

import chunkjac
from chunkjac import _probe
from chunkjac._executor import execute
from chunkjac._spec import normalize


class OOMAbove(nn.Module):
    """Raises torch.cuda.OutOfMemoryError for chunks above ``limit`` samples, as a GPU would."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


def test_out_of_memory_halves_the_chunk_and_gives_the_same_answer():
    f = OOMAbove(limit=60)
    x = torch.randn(300, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        J = chunkjac.compute(f, x, chunk_size=200, mode="reverse")
    torch.testing.assert_close(J, vmap(jacrev(f.net))(x), rtol=1e-10, atol=1e-12)
    msgs = [str(m.message) for m in w if "out of memory" in str(m.message)]
    assert msgs == ["chunkjac: ran out of memory on cpu with the planned chunks of 200 samples; "
                    "finished with chunks of 50."]
    assert max(s for s in f.sizes[-6:]) <= 60  # the smaller size is kept for the rest of the run


def test_out_of_memory_below_one_sample_is_a_budget_error():
    f = OOMAbove(limit=10**9)
    x = torch.randn(40, 3, dtype=torch.float64)
    p = chunkjac.plan(f, x, chunk_size=4, mode="reverse")
    f.limit = 0  # the device fills up after planning
    spec = normalize(f, x, wrt=0, output=None, in_dims=0, mode="reverse", coupling="independent",
                     create_graph=False, return_outputs=False)
    with pytest.raises(chunkjac.BudgetError, match="out of memory on cpu with a chunk of 1 sample"):
        execute(spec, p)


def test_other_errors_are_not_swallowed():
    def f(x):
        if x.shape[0] > 40:
            raise RuntimeError("shape mismatch in user code")
        return torch.sin(x)

    with pytest.raises(RuntimeError, match="shape mismatch in user code"):
        chunkjac.compute(f, torch.randn(100, 3), chunk_size=50)


def test_progress_bar_on_and_off(capsys):
    x = torch.randn(5000, 3)
    chunkjac.compute(torch.sin, x, chunk_size=1000, progress=True)
    err = capsys.readouterr().err
    assert "5.00k/5.00k" in err and "sample/s" in err
    chunkjac.compute(torch.sin, x, chunk_size=1000, progress=False)
    chunkjac.compute(torch.sin, x, chunk_size=1000)  # None: not a terminal here, so no bar
    assert capsys.readouterr().err == ""


def test_probe_cache_skips_the_second_probe(monkeypatch):
    f = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(3000, 3)
    chunkjac.probe_cache.clear()
    calls = []
    real = _probe.probe
    monkeypatch.setattr("chunkjac._planner.probe", lambda *a: calls.append(1) or real(*a))
    first = chunkjac.plan(f, x)
    n = len(calls)
    assert n > 0
    second = chunkjac.plan(f, x)
    assert len(calls) == n and chunkjac.probe_cache.hits > 0
    assert (first.modes, first.rows_per_vjp, first.cols_per_jvp) == (second.modes, second.rows_per_vjp,
                                                                   second.cols_per_jvp)
    chunkjac.plan(f, torch.randn(3000, 3, dtype=torch.float64).float()[:, :3].contiguous()[:2999])
    assert len(calls) > n  # another input shape probes again


def test_explicit_chunk_size_is_used():
    p = chunkjac.plan(torch.sin, torch.randn(1000, 3), chunk_size=300)
    assert (p.chunk_size, p.num_chunks) == (300, 4)
    assert list(p.chunks()) == [(0, 300), (300, 600), (600, 900), (900, 1000)]


def test_cache_key_follows_non_tensor_arguments_and_module_state():
    f = lambda x, k: x[:, :k].sin()  # noqa: E731
    x = torch.randn(500, 4)
    assert chunkjac.compute(f, (x, 3)).shape == (500, 3, 4)
    assert chunkjac.compute(f, (x, 2)).shape == (500, 2, 4)
    lin = nn.Linear(3, 4)
    assert chunkjac.compute(lin, torch.randn(500, 3)).shape == (500, 4, 3)
    lin.weight = nn.Parameter(torch.randn(6, 3))
    lin.bias = nn.Parameter(torch.randn(6))
    assert chunkjac.compute(lin, torch.randn(500, 3)).shape == (500, 6, 3)


def test_bound_methods_reuse_the_probe():
    m = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(600, 3)
    chunkjac.probe_cache.clear()
    chunkjac.compute(m.forward, x)
    hits = chunkjac.probe_cache.hits
    chunkjac.compute(m.forward, x)
    assert chunkjac.probe_cache.hits > hits


def test_small_batches_keep_batched_outputs():
    J, y = chunkjac.compute(torch.sin, torch.randn(2, 3), return_outputs=True, chunk_size=1)
    assert J.shape == (2, 3, 3) and y.shape == (2, 3)


def test_back_off_refuses_to_split_unbatched_outputs():
    class F(OOMAbove):
        def forward(self, x):
            y = super().forward(x)
            return y, y.sum()

    f = F(limit=10**9)
    x = torch.randn(8, 3, dtype=torch.float64)
    spec = normalize(f, x, wrt=0, output=0, in_dims=0, mode="reverse", coupling="independent",
                     create_graph=False, return_outputs=True)
    p = chunkjac.plan(f, x, output=0, mode="reverse", return_outputs=True)
    f.limit = 4
    with pytest.raises(chunkjac.BudgetError, match="cannot be split"):
        execute(spec, p)
