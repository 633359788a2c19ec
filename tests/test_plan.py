"""The plan: AD mode choice, chunk sizing and the readable report, without computing Jacobians."""
import dataclasses

import pytest
import torch
from torch import nn

import chunkjac
from chunkjac._plan import Plan
from chunkjac._planner import CACHE_BYTES, speed_chunk
from chunkjac._strategies import STRATEGIES
from chunkjac._probe import probe
from chunkjac._spec import normalize


def plan_of(fn, inputs, **kw):
    return chunkjac.plan(fn, inputs, **kw)


@pytest.mark.parametrize("n_in, n_out, mode", [(2, 10, "forward"), (1, 8, "forward"), (784, 10, "reverse"),
                                               (8, 1, "reverse")])
def test_auto_mode_by_dimension_counts_when_far_apart(n_in, n_out, mode):
    f = nn.Linear(n_in, n_out)
    assert plan_of(f, torch.randn(8, n_in)).modes == (mode,)


def test_candidates_are_ranked_by_the_cost_model_and_ties_are_timed_on_the_run():
    f = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    spec = normalize(f, torch.randn(64, 3), wrt=0, output=None, in_dims=0, mode="auto", coupling="independent",
                     create_graph=False, return_outputs=False)
    cands = [c for s in STRATEGIES.values() for c in s.candidates(spec, probe(spec), torch.device("cpu"))]
    width = {(c.modes, c.rows_per_vjp if c.mode == "reverse" else c.cols_per_jvp): cost for c, cost in cands}
    assert set(width) == {(("reverse",), 3), (("reverse",), 1), (("forward",), 3), (("forward",), 1)}
    assert width[(("reverse",), 3)] < width[(("reverse",), 1)] < width[(("forward",), 3)]  # a JVP costs 2 VJPs
    p = plan_of(f, torch.randn(20_000, 3), chunk_size=1000)
    assert (p.modes, p.rows_per_vjp) == (("reverse",), 3)  # the count rule's first choice
    assert [(t.modes, t.rows_per_vjp) for t in p.trials] == [(("reverse",), 1)]  # same cost: timed on the run
    assert p.seconds is not None and p.seconds > 0  # chunkjac.plan times one chunk for its estimate
    assert plan_of(f, torch.randn(64, 3)).seconds is None  # too small to be worth timing


def test_shared_targets_use_forward_mode_and_explicit_modes_are_kept():
    f = nn.Linear(3, 3)
    p = plan_of(f, torch.randn(8, 3), wrt=(0, "weight"))
    assert p.modes == ("reverse", "forward") and p.mode == "mixed"
    assert plan_of(f, torch.randn(8, 3), mode="forward").modes == ("forward",)


def test_probe_measures_saved_bytes_per_sample():
    # sin saves its input: 3 float64 per sample. Weights saved by a matmul do not grow with the batch.
    assert probe(normalize(torch.sin, torch.randn(50, 3, dtype=torch.float64), wrt=0, output=None, in_dims=0,
                           mode="auto", coupling="independent", create_graph=False,
                           return_outputs=False)).saved_bytes_per_sample == 24
    f = nn.Sequential(nn.Linear(3, 16), nn.Tanh()).requires_grad_(False)
    spec = normalize(f, torch.randn(50, 3), wrt=0, output=None, in_dims=0, mode="auto",
                     coupling="independent", create_graph=False, return_outputs=False)
    assert probe(spec).saved_bytes_per_sample == 16 * 4  # tanh's output; the weight drops out


def test_chunk_size_fills_the_cache_target():
    assert speed_chunk(10**6, 0.0) == 10**6
    assert speed_chunk(10**6, 12.0) == 10**6
    assert speed_chunk(10**6, 1536.0) == CACHE_BYTES // 1536
    assert speed_chunk(10, 10.0 * CACHE_BYTES) == 1


def test_chunks_cover_the_batch_once():
    p = plan_of(nn.Sequential(nn.Linear(3, 4096), nn.Tanh()), torch.randn(5000, 3), budget="40MB")
    bounds = list(p.chunks())
    assert p.num_chunks == len(bounds) > 1
    assert bounds[0][0] == 0 and bounds[-1][1] == 5000
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(stop - start <= p.chunk_size for start, stop in bounds)


def test_plan_report():
    p = Plan(strategy="coloured", modes=("reverse",), batch_size=1_000_000, chunk_size=131_072, rows_per_vjp=3,
             cols_per_jvp=3, out_shape=(3,), in_numels=(3,), dtype=torch.float32, device=torch.device("cpu"),
             peak_bytes=17_200_000_000, seconds=41.0, budget_bytes=20_000_000_000)
    assert str(p) == ("1,000,000 samples in 8 chunks of 131,072 · reverse mode, 3 VJPs per chunk in 1 call · "
                      "peak ≈ 17.2 GB of 20 GB on cpu · ≈ 41 s")
    p = dataclasses.replace(p, modes=("reverse", "forward"), in_numels=(3, 2), rows_per_vjp=1, cols_per_jvp=1,
                            seconds=None)
    assert "mixed mode, 3 VJPs per chunk in 3 calls + 2 JVPs per chunk in 2 calls · peak" in str(p)
    assert str(p).endswith("on cpu")
    assert plan_of(nn.Linear(5, 10), torch.randn(1000, 5)).budget_bytes > 0
