"""The plan: AD mode choice, chunk sizing and the readable report, without computing Jacobians."""
import pytest
import torch
from torch import nn

from chunkjac._plan import CACHE_BYTES, _chunk_size, make_plan
from chunkjac._probe import probe
from chunkjac._spec import normalize


def plan_of(fn, inputs, **kw):
    opts = dict(wrt=0, output=None, in_dims=0, mode="auto", coupling="independent", create_graph=False,
                return_outputs=False)
    opts.update(kw)
    spec = normalize(fn, inputs, **opts)
    return make_plan(spec, probe(spec))


@pytest.mark.parametrize("n_in, n_out, mode", [(3, 3, "reverse"), (2, 10, "forward"), (5, 10, "reverse"),
                                               (784, 10, "reverse"), (1, 3, "forward")])
def test_auto_mode_by_dimension_counts(n_in, n_out, mode):
    f = nn.Linear(n_in, n_out)
    assert plan_of(f, torch.randn(8, n_in)).modes == (mode,)


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
    assert _chunk_size(10**6, 0.0) == 10**6
    assert _chunk_size(10**6, 12.0) == 10**6
    assert _chunk_size(10**6, 1536.0) == CACHE_BYTES // 1536
    assert _chunk_size(10, 10.0 * CACHE_BYTES) == 1


def test_chunks_cover_the_batch_once():
    p = plan_of(nn.Sequential(nn.Linear(3, 4096), nn.Tanh()), torch.randn(5000, 3))
    bounds = list(p.chunks())
    assert p.num_chunks == len(bounds) > 1
    assert bounds[0][0] == 0 and bounds[-1][1] == 5000
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(stop - start <= p.chunk_size for start, stop in bounds)


def test_plan_report():
    p = plan_of(nn.Linear(5, 10), torch.randn(1000, 5))
    assert str(p) == ("1,000 samples in 1 chunk of 1,000 · sum_trick, reverse mode, 1 batched VJP per chunk · "
                      "torch.float32 on cpu")
    p = plan_of(nn.Linear(2, 10), torch.randn(1000, 2))
    assert "forward mode, 1 batched JVP per chunk" in str(p)
