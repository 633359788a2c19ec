"""Coupled samples (issue 4): exact per-sample blocks against the full Jacobian's diagonal blocks,
the auto check, coupling structures, the plan's cost report, and jacobian_of."""
import re
import warnings

import pytest
import torch
from torch import nn

import chunkjac
from chunkjac._coupling import from_argument
from chunkjac._plan import _format_seconds

from _reference import blocks

TOL = dict(rtol=1e-10, atol=1e-12)
MODES = ["reverse", "forward", "auto"]
F64 = torch.float64


def attention(x):
    """Every sample attends to every sample of the batch (seed 001)."""
    s = x @ x.T / x.shape[1] ** 0.5
    return torch.softmax(s, -1) @ x


def attention_kv(q, kv):
    """Queries per sample, keys/values a second batched input: y_i depends on q_i and on all of kv."""
    return torch.softmax(q @ kv.T, -1) @ kv


def group_attention(x, ids):
    """Attention within groups only: ids is a batched integer input, chunked with x."""
    s = (x @ x.T).masked_fill(ids[:, None] != ids[None, :], float("-inf"))
    return torch.softmax(s, -1) @ x


def banded(x):
    """y_i depends on x_{i-1}, x_i, x_{i+1} (no wrap-around)."""
    z = torch.zeros_like(x[:1])
    return torch.sin(x) * torch.cat([z, x[:-1]]) + torch.cat([x[1:], z]) ** 2


class RNNAlongBatch(nn.Module):
    """An RNN whose time axis is the batch: y_i depends on x_0..x_i."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.RNN(3, 4)

    def forward(self, x):
        return self.rnn(x)[0]


COUPLED = {
    "attention": (lambda: attention, [(12, 3)]),
    "batchnorm1d_train": (lambda: nn.BatchNorm1d(4).double().train(), [(10, 4)]),
    "batchnorm2d_train": (lambda: nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2)).double().train(),
                          [(6, 2, 4, 4)]),
    "roll": (lambda: (lambda x: torch.roll(x, 1, 0) * torch.sin(x)), [(11, 2)]),
    "rnn_along_batch": (lambda: RNNAlongBatch().double(), [(9, 3)]),
    "layer_of_batch_stats": (lambda: (lambda x: (x - x.mean(0)) / x.std(0)), [(8, 2, 3)]),
}


def _compute(f, args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        j = chunkjac.compute(f, args, **kw)
    return j, [w for w in caught if issubclass(w.category, chunkjac.CouplingWarning)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", COUPLED)
def test_coupled_models_exact_blocks(name, mode):
    make, shapes = COUPLED[name]
    f = make()
    x = torch.randn(shapes[0], dtype=F64)
    j, warned = _compute(f, x, mode=mode)
    ref = blocks(f, x)
    torch.testing.assert_close(j, ref, **TOL)
    assert len(warned) == 1 and "samples interact" in str(warned[0].message)
    assert "coupling='coupled' silences this" in str(warned[0].message)
    if mode == "reverse":  # the sum trick is wrong on every one of these: the comparison can fail
        wrong = chunkjac.compute(f, x, coupling="independent", mode="reverse")
        assert (wrong - ref).abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_attention_with_batched_keys_values_is_one_chunk(mode):
    q, kv = torch.randn(10, 3, dtype=F64), torch.randn(10, 3, dtype=F64)
    with pytest.warns(chunkjac.CouplingWarning, match="mixes samples"):
        p = chunkjac.plan(attention_kv, (q, kv), mode=mode, chunk_size=3)
    assert p.num_chunks == 1 and p.colours == 1  # per-sample derivatives, unsplittable forward
    j, warned = _compute(attention_kv, (q, kv), mode=mode)
    torch.testing.assert_close(j, blocks(attention_kv, q, kv), **TOL)
    assert len(warned) == 1


def test_coupling_through_an_integer_input_is_one_chunk():
    """Found by the value check: integer inputs cannot be differentiated."""
    def f(x, idx):
        return x * (idx.double().mean() + 1)

    x, idx = torch.randn(8, 2, dtype=F64), torch.arange(8)
    with pytest.warns(chunkjac.CouplingWarning, match="changes when samples"):
        p = chunkjac.plan(f, (x, idx), chunk_size=2)
    assert p.num_chunks == 1
    torch.testing.assert_close(chunkjac.compute(f, (x, idx), chunk_size=2, coupling="unsplittable"),
                               blocks(f, x, idx), **TOL)


def test_batchnorm_eval_takes_the_independent_path_without_warning():
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).double()
    bn(torch.randn(32, 4, dtype=F64))  # non-trivial running statistics
    bn.eval()
    x = torch.randn(20, 4, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", chunkjac.CouplingWarning)
        p = chunkjac.plan(bn, x)
        j = chunkjac.compute(bn, x)
    assert p.coupling is None and p.colours == 1
    torch.testing.assert_close(j, blocks(bn, x), **TOL)


def test_compute_leaves_batchnorm_statistics_alone():
    bn = nn.BatchNorm1d(4).double().train()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    for mode in MODES:
        _compute(bn, torch.randn(10, 4, dtype=F64), mode=mode)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("offset", [1, 37])
def test_sparse_coupling_is_detected(offset):
    """Sample `offset` depends on sample offset + 1 only: one pair among 64."""
    def f(x):
        y = torch.sin(x).clone()
        y[offset] = y[offset] + x[offset + 1] ** 2
        return y

    x = torch.randn(100, 2, dtype=F64)
    p = None
    with pytest.warns(chunkjac.CouplingWarning, match="samples interact"):
        p = chunkjac.plan(f, x)
    assert p.colours == 100
    torch.testing.assert_close(chunkjac.compute(f, x, coupling="coupled"), blocks(f, x), **TOL)


def test_rounding_noise_is_not_coupling():
    """x - mean + mean: the gradients -1/B and +1/B cancel up to rounding."""
    for dtype in (torch.float64, torch.float32):
        x = torch.randn(64, 5, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error", chunkjac.CouplingWarning)
            p = chunkjac.plan(lambda x: torch.tanh(x - x.mean(0) + x.mean(0)), x)
        assert p.coupling is None


def test_dropout_in_training_mode_is_not_taken_for_coupling():
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 2)).double().train()
    x = torch.randn(50, 3, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", chunkjac.CouplingWarning)
        p = chunkjac.plan(model, x, mode="reverse")
    assert p.coupling is None


def test_coupled_shared_parameter_batchnorm_train():
    bn = nn.BatchNorm1d(3).double().train()
    x = torch.randn(7, 3, dtype=F64)
    j, warned = _compute(bn, x, wrt="weight")
    assert len(warned) == 1
    w = bn.weight.detach().clone()
    ref = torch.autograd.functional.jacobian(
        lambda v: torch.func.functional_call(bn, {"weight": v}, (x,)), w)  # (B, 3, 3): shared, no blocks
    torch.testing.assert_close(j, ref, **TOL)


def test_coupled_create_graph_is_differentiable():
    x = torch.randn(6, 2, dtype=F64, requires_grad=True)
    j = chunkjac.compute(attention, x, coupling="coupled", create_graph=True)
    assert j.requires_grad
    (g,) = torch.autograd.grad(j.pow(2).sum(), x)

    def loss(v):
        return blocks(attention, v, create_graph=True).pow(2).sum()

    ref = torch.autograd.functional.jacobian(loss, x.detach())
    torch.testing.assert_close(g, ref, **TOL)


def test_explicit_coupled_matches_auto_and_silences_warning():
    x = torch.randn(9, 3, dtype=F64)
    auto, _ = _compute(attention, x)
    explicit, warned = _compute(attention, x, coupling="coupled", chunk_size=4, mode="reverse")
    assert warned == []
    torch.testing.assert_close(explicit, auto, **TOL)


# Groups and dependency structures ---------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["contiguous", "interleaved", "uneven"])
def test_groups_exact(layout, mode):
    b = 30
    ids = {"contiguous": torch.arange(b) // 4, "interleaved": torch.arange(b) % 5,
           "uneven": torch.tensor([0] * 7 + [1] * 2 + [2] * 12 + [3] + [4] * 8)}[layout]
    x = torch.randn(b, 3, dtype=F64)
    f = group_attention
    j, warned = _compute(f, (x, ids), coupling=ids, mode=mode, chunk_size=8)
    assert warned == []
    torch.testing.assert_close(j, blocks(f, x, ids), **TOL)
    p = chunkjac.plan(f, (x, ids), coupling=ids, mode=mode, chunk_size=8)
    largest = int(torch.unique(ids, return_counts=True)[1].max())
    assert p.colours == largest
    if layout == "contiguous":
        assert p.num_chunks == 4 and [b_ - a for a, b_ in p.chunks()] == [8, 8, 8, 6]
    if layout == "interleaved":
        assert p.num_chunks == 1  # every group spans the batch: no boundary is allowed


def test_groups_detected_by_auto_are_fully_coupled_but_exact():
    ids = torch.arange(16) // 4
    x = torch.randn(16, 2, dtype=F64)
    j, warned = _compute(group_attention, (x, ids))
    assert len(warned) == 1 and "coupling=<group ids>" in str(warned[0].message)
    torch.testing.assert_close(j, blocks(group_attention, x, ids), **TOL)


def _band_edges(b):
    i = torch.arange(b - 1)
    return torch.cat([torch.stack([i, i + 1]), torch.stack([i + 1, i])], 1)  # (j, i): y_i <- x_j


@pytest.mark.parametrize("fmt", ["edges", "numpy_edges", "sparse", "neighbours"])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_dependency_structures_exact(fmt, mode):
    b = 21
    edges = _band_edges(b)
    if fmt == "edges":
        c = edges
    elif fmt == "numpy_edges":
        c = edges.numpy()
    elif fmt == "sparse":
        c = torch.sparse_coo_tensor(torch.stack([edges[1], edges[0]]), torch.ones(edges.shape[1]), (b, b),
                                    check_invariants=True)
    else:
        c = [[j for j in (i - 1, i + 1) if 0 <= j < b] for i in range(b)]
    x = torch.randn(b, 3, dtype=F64)
    j, warned = _compute(banded, x, coupling=c, mode=mode)
    assert warned == []
    torch.testing.assert_close(j, blocks(banded, x), **TOL)
    p = chunkjac.plan(banded, x, coupling=c, mode=mode)
    assert p.colours == 2  # a path: two colours, however long


def test_structure_that_misses_a_dependency_is_the_users_assertion():
    """coupling= is trusted like coupling='independent': a structure with edges missing gives blocks
    that differ from the true ones (documented), so this test guards the colouring, not the user."""
    b = 12
    c = from_argument(_band_edges(b), b)
    assert c.num_colours == 2 and c.colours.tolist() == [i % 2 for i in range(b)]


def test_structure_bounds_allow_chunks_between_components():
    b = 12
    edges = torch.tensor([[0, 1, 5, 6], [1, 0, 6, 5]])  # {0,1} and {5,6} interact, the rest alone
    x = torch.randn(b, 2, dtype=F64)
    # (banded's samples interact along the band, which these edges do not say: only the bounds the
    # declaration allows are tested here, so the declaration is trusted.)
    p = chunkjac.plan(banded, x, coupling=edges, chunk_size=1, check_coupling=False)
    assert [s for s, _ in p.chunks()] == [0, 2, 3, 4, 5, 7, 8, 9, 10, 11]


# Plan's cost report and refusals ------------------------------------------------------------------

def test_plan_reports_the_cost_of_coupled_samples():
    x = torch.randn(40, 3, dtype=F64)
    p = chunkjac.plan(attention, x, coupling="coupled", mode="reverse")
    text = str(p)
    assert "coupled (coupled, 40 colours" in text
    assert "120 VJPs in all" in text  # 40 samples x 3 rows
    assert re.search(r"≈ \d", text)
    vjps, jvps = p.products_per_chunk
    assert jvps == 0 and vjps == -(-120 // p.rows_per_vjp)
    p = chunkjac.plan(group_attention, (x, torch.arange(40) // 8), coupling=torch.arange(40) // 8,
                      mode="forward", chunk_size=16)
    assert "8 colours per chunk" in str(p) and "24 JVPs per chunk" in str(p)


def test_a_million_coupled_samples_is_refused_with_an_estimate():
    def mix(x):  # cheap, but every output depends on every input
        return x * torch.tanh(x.mean(0))

    x = torch.randn(1_000_000, 3)
    p = chunkjac.plan(mix, x, coupling="coupled")
    text = str(p)
    assert p.too_long and p.extrapolated and "TOO LONG" in text and "coupling=<group ids>" in text
    assert p.seconds > 3600 and f"about {_format_seconds(p.seconds)}" in text
    with pytest.raises(chunkjac.TooLongError, match="TOO LONG"):
        chunkjac.compute(mix, x, coupling="coupled")


def test_budget_too_small_for_one_coupled_set():
    x = torch.randn(256, 8)
    with pytest.raises(chunkjac.BudgetError, match="one coupled set of 256 samples"):
        chunkjac.plan(attention, x, coupling="coupled", budget=4096)


@pytest.mark.parametrize("bad, match", [
    (torch.arange(5), "5 group ids but the batch has 8"),
    (torch.tensor([[0, 9], [1, 2]]), "edges between samples 0..9"),
    (torch.zeros(3, 8, dtype=torch.long), r"shape \(3, 8\)"),
    (torch.ones(8), "must be integers"),
    ([[1]] * 3, "3 neighbour lists"),
    (torch.eye(4).to_sparse(), r"\(8, 8\)"),
    ("bands", "coupling must be one of"),
])
def test_bad_coupling_arguments(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        chunkjac.compute(torch.sin, torch.randn(8, 2), coupling=bad)


# jacobian_of ----------------------------------------------------------------------------------------

def test_jacobian_of_independent_graph_keeps_the_graph():
    x = torch.randn(20, 3, dtype=F64, requires_grad=True)
    w = torch.randn(3, 4, dtype=F64)
    y = torch.tanh(x @ w)
    with warnings.catch_warnings():
        warnings.simplefilter("error", chunkjac.CouplingWarning)
        j = chunkjac.jacobian_of(y, x)
    torch.testing.assert_close(j, blocks(lambda v: torch.tanh(v @ w), x.detach()), **TOL)
    y.sum().backward()  # the caller still backpropagates through y
    assert x.grad is not None


def test_jacobian_of_coupled_graph_warns_and_is_exact():
    x = torch.randn(15, 3, dtype=F64, requires_grad=True)
    y = attention(x)
    with pytest.warns(chunkjac.CouplingWarning, match="samples interact"):
        j = chunkjac.jacobian_of(y, x)
    torch.testing.assert_close(j, blocks(attention, x.detach()), **TOL)
    j2 = chunkjac.jacobian_of(y, x, coupling="coupled", budget="1MB")
    torch.testing.assert_close(j2, j, **TOL)


def test_jacobian_of_groups_and_several_inputs():
    ids = torch.arange(12) // 3
    x = torch.randn(12, 2, dtype=F64, requires_grad=True)
    s = torch.randn(12, 1, dtype=F64, requires_grad=True)
    y = group_attention(x, ids) * s
    jx, js = chunkjac.jacobian_of(y, (x, s), coupling=ids)
    torch.testing.assert_close(jx, blocks(lambda v: group_attention(v, ids) * s.detach(), x.detach()), **TOL)
    torch.testing.assert_close(js, blocks(lambda v: group_attention(x.detach(), ids) * v, s.detach()), **TOL)


def test_jacobian_of_create_graph():
    x = torch.randn(5, 2, dtype=F64, requires_grad=True)
    j = chunkjac.jacobian_of(attention(x), x, coupling="coupled", create_graph=True)
    (g,) = torch.autograd.grad(j.sum(), x)
    ref = torch.autograd.functional.jacobian(lambda v: blocks(attention, v, create_graph=True).sum(), x.detach())
    torch.testing.assert_close(g, ref, **TOL)


def test_jacobian_of_refuses_a_run_too_long():
    x = torch.randn(3000, 2, requires_grad=True)
    y = attention(x)
    with pytest.raises(chunkjac.TooLongError, match="coupling=<group ids>"):
        chunkjac.jacobian_of(y, x, coupling="coupled", max_seconds=0.01)


@pytest.mark.parametrize("make, match", [
    (lambda x: (x.detach() * 2, x), "does not require grad"),
    (lambda x: (x * 2, x.detach()), "requires_grad=True"),
    (lambda x: (x.sum(), x), "batch in dim 0"),
    (lambda x: ((x * 2)[:3], x), "4 samples in dim 0 but outputs holds 3"),
    (lambda x: ([x * 2], x), "must be a tensor"),
    (lambda x: (x * 2, ()), "inputs is empty"),
])
def test_jacobian_of_bad_arguments(make, match):
    x = torch.randn(4, 2, requires_grad=True)
    y, xs = make(x)
    with pytest.raises((ValueError, TypeError), match=match):
        chunkjac.jacobian_of(y, xs)


# Found by adversarial testing ----------------------------------------------------------------------

class GatedBatchAttention(nn.Module):
    """A zero-initialised gate on attention across the batch: independent until training moves it."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
        self.q, self.k = nn.Linear(3, 3), nn.Linear(3, 3)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.mlp(x) + self.gate * (torch.softmax(self.q(x) @ self.k(x).T, -1) @ x)


def test_the_check_runs_again_when_the_model_changes():
    m = GatedBatchAttention().double()
    x = torch.randn(20, 3, dtype=F64)
    _, warned = _compute(m, x)
    assert warned == []  # gate = 0: samples are independent, and the sum trick is exact
    with torch.no_grad():
        m.gate.fill_(0.5)  # an optimizer step: the parameters' in-place versions move
    j, warned = _compute(m, x)
    assert len(warned) == 1
    torch.testing.assert_close(j, blocks(m, x), **TOL)
    bn = nn.BatchNorm1d(3).double().eval()
    wrapped = lambda v: bn(v)  # noqa: E731 - the module is reached through a closure
    _compute(wrapped, x)
    bn.train()
    j, warned = _compute(wrapped, x)
    assert len(warned) == 1
    torch.testing.assert_close(j, blocks(wrapped, x), **TOL)
    bn.eval()


@pytest.mark.parametrize("name, f, args", [
    ("pairs through detached values", lambda x: x * x.detach().reshape(-1, 2, 3).flip(1).reshape(-1, 3), None),
    ("scaled by the longest length", lambda x, n: x * (n.to(x.dtype) / n.max()).unsqueeze(1), "lengths"),
    ("batch-size parity", lambda x: x * (1 + x.shape[0] % 2), None),
    ("a branch on grad mode", lambda x: x * x.mean(0).detach() if torch.is_grad_enabled() else x * 1.0, None),
])
def test_forward_mixing_that_one_middle_split_misses_is_found(name, f, args):
    x = torch.randn(64, 3, dtype=F64)
    inputs = x if args is None else (x, torch.randint(1, 10, (64,)).index_fill(0, torch.tensor([5, 40]), 12))
    with pytest.warns(chunkjac.CouplingWarning):
        j = chunkjac.compute(f, inputs, chunk_size=7)
    ref = blocks(f, x) if args is None else blocks(lambda v: f(v, inputs[1]), x)
    torch.testing.assert_close(j, ref, **TOL)


def test_fn_writing_to_its_input_is_refused():
    def halve(v):
        with torch.no_grad():
            v /= 2
        return torch.sin(v)
    x = torch.randn(10, 3, dtype=F64)
    keep = x.clone()
    with pytest.raises(ValueError, match="fn writes in place into input 0, a batched input"):
        chunkjac.compute(halve, x, coupling="independent")
    assert torch.equal(x, keep)  # refused before the write


def test_jacobian_of_a_large_input_does_not_hide_a_coupling_on_another():
    a = torch.randn(10, 3, dtype=F64, requires_grad=True)
    b = torch.randn(10, 3, dtype=F64, requires_grad=True)
    y = a + 1e-2 * a.mean(0) + 1e7 * b
    with pytest.warns(chunkjac.CouplingWarning):
        ja, _ = chunkjac.jacobian_of(y, (a, b))
    torch.testing.assert_close(ja, blocks(lambda v: v + 1e-2 * v.mean(0) + 1e7 * b.detach(), a.detach()), **TOL)


# Declared couplings are checked (see [Checking a declared coupling] in _declared) -------------------

def _mean_over_groups_of(size):
    def f(z):
        g = z.reshape(-1, size, z.shape[-1])
        return (g - g.mean(1, keepdim=True)).reshape(z.shape) * torch.tanh(z)
    return f


def _message_passing(edges, layers):
    """A pure-torch GNN: each layer adds the mean of the in-neighbours' features (edge j -> i)."""
    w = torch.randn(3, 3, dtype=F64)

    def f(z):
        h = z
        for _ in range(layers):
            agg = torch.zeros_like(h).index_add(0, edges[1], h[edges[0]])
            deg = torch.zeros(h.shape[0], dtype=h.dtype).index_add(0, edges[1], torch.ones(edges.shape[1], dtype=h.dtype))
            h = torch.tanh((h + agg / deg.clamp_min(1)[:, None]) @ w)
        return h
    return f


def test_group_ids_finer_than_the_real_groups_are_refused():
    x = torch.randn(16, 3, dtype=F64)
    f = _mean_over_groups_of(4)
    with pytest.raises(chunkjac.CouplingError, match="declared coupling misses interactions.*coarser"):
        chunkjac.compute(f, x, coupling=torch.arange(16) // 2)
    with pytest.raises(chunkjac.CouplingError):  # chunked: the group of 2 is a chunk fn fails on, or leaks
        chunkjac.compute(f, torch.randn(400, 3, dtype=F64), coupling=torch.arange(400) // 2, chunk_size=40)
    J = chunkjac.compute(f, x, coupling=torch.arange(16) // 4)  # the real groups: checked and exact
    torch.testing.assert_close(J, blocks(f, x))


def test_an_interaction_across_chunks_of_declared_groups_is_refused():
    x = torch.randn(400, 3, dtype=F64)
    f = lambda z: z + 0.5 * torch.roll(z, -5, 0)  # noqa: E731 - sample i reads i + 5, in another group
    with pytest.raises(chunkjac.CouplingError, match="misses interactions"):
        chunkjac.compute(f, x, coupling=torch.arange(400) // 4, chunk_size=40)


def test_a_graph_of_one_hop_for_two_message_passing_layers_is_refused_with_the_hops_to_pass():
    torch.manual_seed(3)
    n = 40
    edges = torch.randint(0, n, (2, 90))
    f = _message_passing(edges, 2)
    x = torch.randn(n, 3, dtype=F64)
    with pytest.raises(chunkjac.CouplingError, match=r"2-hop neighbours.*chunkjac.hops\(edge_index, 2\)"):
        chunkjac.compute(f, x, coupling=edges)
    with pytest.raises(chunkjac.CouplingError, match="2-hop"):  # the Hessian likewise
        chunkjac.hessian(f, x, coupling=edges)
    J = chunkjac.compute(f, x, coupling=chunkjac.hops(edges, 2))
    torch.testing.assert_close(J, blocks(f, x))
    H = chunkjac.hessian(f, x, coupling=chunkjac.hops(edges, 2), part="diagonal")
    ref = torch.stack([torch.autograd.functional.hessian(
        lambda v, i=i: f(torch.cat([x[:i], v[None], x[i + 1:]]))[i].sum(), x[i]).diagonal() for i in range(n)])
    # (the sum over the 3 outputs' diagonals, against the per-output parts)
    torch.testing.assert_close(H.sum(1), ref)
    one = _message_passing(edges, 1)
    torch.testing.assert_close(chunkjac.compute(one, x, coupling=edges), blocks(one, x))  # one layer: 1-hop is right


def test_check_coupling_false_trusts_the_declaration():
    x = torch.randn(16, 3, dtype=F64)
    f = _mean_over_groups_of(4)
    J = chunkjac.compute(f, x, coupling=torch.arange(16) // 2, check_coupling=False)
    assert J.shape == (16, 3, 3)  # whatever the declaration implies: not checked (docs/coupling.md)


def test_hops_is_reachability_in_at_most_k_edges():
    edges = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])  # a path 0 -> 1 -> 2 -> 3 -> 4
    got = chunkjac.hops(edges, 2)
    assert {tuple(e) for e in got.T.tolist()} == {(0, 1), (1, 2), (2, 3), (3, 4), (0, 2), (1, 3), (2, 4)}
    assert {tuple(e) for e in chunkjac.hops(edges, 1).T.tolist()} == {tuple(e) for e in edges.T.tolist()}
    with pytest.raises(ValueError, match="k >= 1"):
        chunkjac.hops(edges, 0)
