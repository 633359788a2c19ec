"""Budgets: every accepted and refused form, and the planner's arithmetic against them."""
import pytest
import torch
from torch import nn

import chunkjac
from chunkjac._budget import DEFAULT_SHARE, format_bytes, parse_budget
from chunkjac._planner import _fits, margin
from chunkjac._probe import Measurement

FREE = 10**10


@pytest.mark.parametrize("budget, expected", [
    ("20GB", 20 * 10**9), ("20 GB", 20 * 10**9), ("20gb", 20 * 10**9), ("512MiB", 512 * 2**20),
    ("1.5GiB", int(1.5 * 2**30)), ("1.5 gib", int(1.5 * 2**30)), ("100kb", 10**5), ("3KiB", 3 * 1024),
    ("2TB", 2 * 10**12), ("750B", 750), (".5GB", 5 * 10**8), (4096, 4096), ("80%", int(0.8 * FREE)),
    ("12.5 %", int(0.125 * FREE)), ("100%", FREE), (None, int(DEFAULT_SHARE * FREE)),
])
def test_accepted_forms(budget, expected):
    assert parse_budget(budget, FREE) == expected


@pytest.mark.parametrize("budget", ["0GB", "-1GB", 0, -5, "0%", "150%", "20", "20 GiGs", "GB", "", "1e9",
                                    "20GB extra", 1.5e9, True, [1], "-10%"])
def test_refused_forms_list_the_accepted_ones(budget):
    with pytest.raises(ValueError, match=r"is not a memory size; use \"20GB\", \"20 GB\", \"512MiB\""):
        parse_budget(budget, FREE)


def test_compute_refuses_a_bad_budget_before_any_work():
    calls = []
    with pytest.raises(ValueError, match="budget='lots' is not a memory size"):
        chunkjac.compute(lambda x: calls.append(1) or x, torch.randn(4, 3), budget="lots")
    assert calls == []


def test_format_bytes():
    assert format_bytes(17.2e9) == "17.2 GB" and format_bytes(512e6) == "512 MB" and format_bytes(999) == "999 B"


def test_fits_is_the_largest_chunk_inside_the_margin():
    m = Measurement(mem_const=1000.0, mem_per_sample=100.0)
    budget = 1_000_000
    n = _fits(m, budget, 10**9, 0.8)
    assert m.peak(n) <= 0.8 * budget < m.peak(n + 1)
    assert _fits(m, budget, 50, 0.8) == 50
    assert _fits(m, 100, 10**6, 0.8) == 0
    assert margin(torch.device("cpu")) < margin(torch.device("cuda", 0)) == 0.8


def test_budget_too_small_says_what_would_work():
    f = nn.Sequential(nn.Linear(3, 256), nn.Tanh(), nn.Linear(256, 3))
    with pytest.raises(chunkjac.BudgetError) as e:
        chunkjac.compute(f, torch.randn(1000, 3), budget=100)
    msg = str(e.value)
    assert "cannot hold the work of even one sample" in msg and "Pass budget='" in msg
    need = msg.split("Pass budget='")[1].split("'")[0]
    assert isinstance(e.value, MemoryError)
    J = chunkjac.compute(f, torch.randn(1000, 3), budget=need)  # the suggested budget works
    assert J.shape == (1000, 3, 3)


def test_budget_bounds_the_chunk_and_the_prediction():
    f = nn.Sequential(nn.Linear(3, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(), nn.Linear(512, 3))
    x = torch.randn(20_000, 3)
    p = chunkjac.plan(f, x, budget="8MB")
    assert p.num_chunks > 1 and p.peak_bytes <= margin(torch.device("cpu")) * 8e6
    big = chunkjac.plan(f, x, budget="2GB")
    assert big.chunk_size > p.chunk_size
    torch.testing.assert_close(chunkjac.compute(f, x[:3000], budget="8MB"), torch.func.vmap(torch.func.jacrev(f))(x[:3000]))


def test_suggested_budget_for_tiny_needs_parses():
    with pytest.raises(chunkjac.BudgetError) as e:
        chunkjac.compute(torch.sin, torch.randn(50, 3), budget=1)
    need = str(e.value).split("Pass budget='")[1].split("'")[0]
    assert need.endswith("B")
    assert chunkjac.compute(torch.sin, torch.randn(50, 3), budget=need).shape == (50, 3, 3)


def test_budgets_below_one_byte_are_refused():
    with pytest.raises(ValueError, match="not a memory size"):
        parse_budget("0.5B", FREE)
