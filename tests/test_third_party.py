"""chunkjac on third-party models (randomly initialised), each skipped when its package is absent.

Install the optional packages without touching torch:
    pip install --no-deps torch_geometric xxhash torchdiffeq e3nn opt-einsum opt-einsum-fx opacus
benchmarks/third_party.py runs a wider sweep of the same kind, each case in a subprocess.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import chunkjac

from _reference import blocks


def compute(*args, **kwargs):
    """chunkjac.compute, returning (J, the CouplingWarnings it issued)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        j = chunkjac.compute(*args, **kwargs)
    return j, [w for w in caught if issubclass(w.category, chunkjac.CouplingWarning)]


def random_graph(n, components=1, seed=0):
    """An undirected (2, E) edge_index on n nodes, in ``components`` parts with no edge between them."""
    g = torch.Generator().manual_seed(seed)
    size, edges = n // components, []
    for c in range(components):
        ring = torch.arange(c * size, (c + 1) * size)
        extra = ring[torch.randint(0, size, (2, 2 * size), generator=g)]
        edges += [torch.stack([ring, ring.roll(1)]), extra[:, extra[0] != extra[1]]]
    ei = torch.cat(edges, 1)
    return torch.unique(torch.cat([ei, ei.flip(0)], 1), dim=1)


# ---------------------------------------------------------------------------------------------------
# torch_geometric: nodes are the samples, the edge_index is shared (in_dims None)


def test_pyg_two_layer_gcn_with_a_one_hop_edge_index_is_refused_and_exact_with_two_hops():
    # The README's graph call on a 2-layer GCN: outputs depend on 2-hop neighbours, the edge_index names
    # 1-hop ones; it used to return wrong blocks (error 0.38 on 0.82), the Hessian likewise.
    pyg = pytest.importorskip("torch_geometric.nn")
    torch.manual_seed(0)
    c1, c2 = pyg.GCNConv(4, 8).double(), pyg.GCNConv(8, 2).double()
    x, ei = torch.randn(30, 4, dtype=torch.float64), random_graph(30)
    gcn = lambda z: c2(torch.tanh(c1(z, ei)), ei)  # noqa: E731
    with pytest.raises(chunkjac.CouplingError, match=r"2-hop.*chunkjac.hops\(edge_index, 2\)"):
        chunkjac.compute(gcn, x, coupling=ei)
    with pytest.raises(chunkjac.CouplingError, match="2-hop"):
        chunkjac.hessian(gcn, x, coupling=ei, part="laplacian")
    j = chunkjac.compute(gcn, x, coupling=chunkjac.hops(ei, 2))
    torch.testing.assert_close(j, blocks(gcn, x), rtol=1e-9, atol=1e-10)
    lap = chunkjac.laplacian(gcn, x, coupling=chunkjac.hops(ei, 2))
    ref = torch.stack([torch.stack([torch.autograd.functional.hessian(
        lambda v, i=i, o=o: gcn(torch.cat([x[:i], v[None], x[i + 1:]]))[i, o], x[i]).trace() for o in range(2)])
        for i in range(30)])
    torch.testing.assert_close(lap, ref, rtol=1e-8, atol=1e-10)



@pytest.mark.parametrize("conv", ["GCNConv", "GATConv"])
def test_pyg_conv_on_small_graph_is_exact_and_warns(conv):
    pyg = pytest.importorskip("torch_geometric.nn")
    layer = getattr(pyg, conv)(4, 3).double().eval()
    x, ei = torch.randn(24, 4, dtype=torch.float64), random_graph(24)
    j, warned = compute(layer, (x, ei), in_dims=(0, None))
    assert warned, "neighbours' features change a node's output: coupling='auto' should say so"
    torch.testing.assert_close(j, blocks(lambda z: layer(z, ei), x), rtol=1e-9, atol=1e-10)


def test_pyg_gcn_on_more_nodes_than_the_check_window_is_exact():
    pyg = pytest.importorskip("torch_geometric.nn")
    layer = pyg.GCNConv(4, 3).double()
    x, ei = torch.randn(100, 4, dtype=torch.float64), random_graph(100)
    j, warned = compute(layer, (x, ei), in_dims=(0, None))  # as coupling="coupled" gives it
    assert warned
    torch.testing.assert_close(j, blocks(lambda z: layer(z, ei), x), rtol=1e-9, atol=1e-10)


def test_pyg_gcn_coupled_is_exact():
    pyg = pytest.importorskip("torch_geometric.nn")
    layer = pyg.GCNConv(4, 3).double()
    x, ei = torch.randn(100, 4, dtype=torch.float64), random_graph(100)
    j = chunkjac.compute(layer, (x, ei), in_dims=(0, None), coupling="coupled")
    torch.testing.assert_close(j, blocks(lambda z: layer(z, ei), x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("form", ["edge_index", "group_ids"])
def test_pyg_gcn_with_documented_structure_is_exact(form):
    pyg = pytest.importorskip("torch_geometric.nn")
    layer = pyg.GCNConv(4, 3).double()
    x, ei = torch.randn(24, 4, dtype=torch.float64), random_graph(24, components=3)
    coupling = ei if form == "edge_index" else torch.arange(24) // 8
    j = chunkjac.compute(layer, (x, ei), in_dims=(0, None), coupling=coupling)
    torch.testing.assert_close(j, blocks(lambda z: layer(z, ei), x), rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# torchdiffeq


def _ode_solve(method, **kw):
    td = pytest.importorskip("torchdiffeq")
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    return lambda y0: td.odeint(lambda s, y: net(y), y0, t, method=method, **kw)[-1]


def test_torchdiffeq_adaptive_solver_couples_samples_and_is_exact():
    solve = _ode_solve("dopri5", rtol=1e-6, atol=1e-8)
    y0 = torch.randn(8, 3, dtype=torch.float64)
    j, warned = compute(solve, y0)
    assert warned, "one adaptive step size for the whole batch couples the samples"
    torch.testing.assert_close(j, blocks(solve, y0), rtol=1e-9, atol=1e-10)


def test_torchdiffeq_fixed_step_is_exact():
    solve = _ode_solve("rk4", options={"step_size": 0.25})
    y0 = torch.randn(8, 3, dtype=torch.float64)
    j, warned = compute(solve, y0)
    assert not warned
    torch.testing.assert_close(j, blocks(solve, y0), rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# e3nn


def test_e3nn_linear_is_exact():
    o3 = pytest.importorskip("e3nn.o3")
    lin = o3.Linear("4x0e+2x1o", "3x0e+2x1o").double()
    x = torch.randn(16, 10, dtype=torch.float64)
    j, warned = compute(lin, x)
    assert not warned and j.shape == (16, 9, 10)
    torch.testing.assert_close(j, blocks(lin, x), rtol=1e-9, atol=1e-10)


def test_e3nn_tensor_product_first_input_is_exact():
    o3 = pytest.importorskip("e3nn.o3")
    tp = o3.FullyConnectedTensorProduct("2x0e+1x1o", "1x0e+1x1o", "2x0e+1x1o").double()
    x1, x2 = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    j = chunkjac.compute(tp, (x1, x2), wrt=0)
    torch.testing.assert_close(j, blocks(lambda a: tp(a, x2), x1), rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------------------------------
# opacus: GradSampleModule's backward hooks pop one stored activation per backward pass


def _gsm():
    pytest.importorskip("opacus")
    from opacus import GradSampleModule
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    return net, GradSampleModule(copy.deepcopy(net))


def test_opacus_grad_sample_module_is_a_chunkjac_error_that_names_the_fix():
    # Its hooks allow one backward per forward; a Jacobian takes several (plain autograd fails alike).
    _, gsm = _gsm()
    x = torch.randn(32, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"^chunkjac: .*disable_hooks\(\)"):
        chunkjac.compute(gsm, x)


def test_a_refused_opacus_call_leaves_the_module_as_it_was():
    # The refusal used to leave grad_sample tensors and stored activations behind: the next chunkjac
    # call and the user's own backward then failed inside Opacus.
    net, gsm = _gsm()
    x = torch.randn(32, 6, dtype=torch.float64)
    params = {n: dict(vars(p)) for n, p in gsm.named_parameters()}
    modules = {n: dict(vars(m)) for n, m in gsm.named_modules()}
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"disable_hooks\(\)"):
            chunkjac.compute(gsm, x)
    for n, p in gsm.named_parameters():
        assert vars(p).keys() == params[n].keys() and all(vars(p)[k] is v for k, v in params[n].items())
    for n, m in gsm.named_modules():
        assert vars(m).keys() == modules[n].keys()
    gsm(x).sum().backward()  # the user's own step works
    for p, q in zip(gsm.parameters(), net.parameters()):
        ref = torch.func.vmap(torch.func.grad(lambda w, z, q=q: torch.func.functional_call(
            net, {n: (w if t is q else t) for n, t in net.named_parameters()}, (z[None],)).sum()), in_dims=(None, 0))(q, x)
        torch.testing.assert_close(p.grad_sample, ref * len(x))  # (loss_reduction="mean" scales by the batch)


def test_opacus_with_hooks_disabled_is_exact():
    net, gsm = _gsm()
    gsm.disable_hooks()
    x = torch.randn(32, 6, dtype=torch.float64)
    torch.testing.assert_close(chunkjac.compute(gsm, x), torch.func.vmap(torch.func.jacrev(net))(x),
                               rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("method", ["rk4", "dopri5"])  # independent samples; an adaptive solver couples them
@pytest.mark.parametrize("mode", ["auto", "reverse"])
def test_torchdiffeq_adjoint_parameter_jacobians_are_exact(method, mode):
    # The adjoint's autograd.Function has no setup_context: neither forward mode nor torch.func runs it.
    # mode="reverse" used to be answered about forward mode; a product per (sample, output element) of
    # the whole batch, by plain autograd, is exact.
    tdq = pytest.importorskip("torchdiffeq")
    torch.manual_seed(0)
    ts = torch.tensor([0.0, 0.5], dtype=torch.float64)

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3).double()

        def forward(self, t, y):
            return torch.tanh(self.lin(y))

    class Flow(nn.Module):
        def __init__(self):
            super().__init__()
            self.field = Field()

        def forward(self, z):
            return tdq.odeint_adjoint(self.field, z, ts, method=method,
                                      adjoint_params=tuple(self.field.parameters()))[-1]

    flow, x = Flow(), torch.randn(5, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", chunkjac.CouplingWarning)
        J = chunkjac.compute(flow, x, wrt="params", mode=mode)
    names = [k for k, _ in flow.named_parameters()]
    ref_flow = copy.deepcopy(flow)
    full = torch.autograd.functional.jacobian(
        lambda *ps: torch.func.functional_call(ref_flow, dict(zip(names, ps)), (x,)),
        tuple(p.detach() for p in flow.parameters()))
    for k, r in zip(names, full):
        torch.testing.assert_close(J[k], r, rtol=1e-9, atol=1e-10)
