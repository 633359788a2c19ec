"""The PDE operators (chunkjac.laplacian's dims/weights/samples, bilaplacian, divergence, derivatives)
against nested torch.autograd.grad in float64, sample by sample (exact for coupled samples too)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import chunkjac
from chunkjac._operators import random_directions

F = nn.functional
MODES = ("forward", "reverse")


def partial(f, x, idx):
    """(B, n_out): d^m f(x)_i / dx_{i,a1} ... dx_{i,am} for each sample i, by nested autograd.grad on
    sample i's output with the other samples held (exact whatever the coupling)."""
    x = x.detach().requires_grad_(True)
    y = f(x)
    shape = y.shape[1:]
    y = y.reshape(x.shape[0], -1)
    out = torch.zeros_like(y)
    for i in range(x.shape[0]):
        for o in range(y.shape[1]):
            g = y[i, o]
            for a in idx:
                (gx,) = torch.autograd.grad(g, x, create_graph=True, allow_unused=True)
                if gx is None:
                    g = None
                    break
                g = gx[i].reshape(-1)[a]
            out[i, o] = 0.0 if g is None else g.detach()
    return out.reshape(y.shape[0], *shape)


def fourth(f, x):
    """(B, *out, D, D, D, D): every fourth derivative, by reverse mode nested four deep (torch.func)."""
    from torch.func import jacrev, vmap
    return vmap(jacrev(jacrev(jacrev(jacrev(lambda z: f(z[None])[0])))))(x)


def mlp(d_in=3, d_out=1, width=12, act=nn.Tanh, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), act(), nn.Linear(width, width), act(),
                         nn.Linear(width, d_out)).double()


class LayerNormByHand(nn.Module):
    """A LayerNorm written out: the reference's third and fourth derivatives through PyTorch's native
    layer_norm are wrong, through its definition right."""

    def forward(self, h):
        c = h - h.mean(-1, keepdim=True)
        return c * torch.rsqrt((c * c).mean(-1, keepdim=True) + 1e-5)


class Unsupported(nn.Module):
    """The ops jet-for-pytorch raises NotImplementedError on: GELU, SiLU, Softplus, LayerNorm, prod, slicing."""

    def __init__(self, native_norm=True, d_in=3):
        super().__init__()
        torch.manual_seed(1)
        self.l1, self.l2 = nn.Linear(d_in, 8), nn.Linear(8, 6)
        self.norm = nn.LayerNorm(8, elementwise_affine=False) if native_norm else LayerNormByHand()

    def forward(self, x):
        h = self.norm(F.gelu(self.l1(x)))
        h = self.l2(F.softplus(h) + F.silu(h))
        return h[:, :2].prod(-1, keepdim=True) + h[:, 2:].sum(-1, keepdim=True)


X = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


def close(a, b, rtol=1e-8):
    scale = max(1.0, float(b.abs().max()))
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max().item() <= rtol * scale, (a - b).abs().max().item()


@pytest.mark.parametrize("mode", MODES)
def test_laplacian_over_dims_and_weights(mode):
    f = mlp()
    hess = [[partial(f, X, (j, k)) for k in range(3)] for j in range(3)]
    close(chunkjac.laplacian(f, X, dims=(0, 2), mode=mode), hess[0][0] + hess[2][2])
    for c in (torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 3.0]]),  # positive definite
              torch.tensor([[1.0, 2.0, 0.0], [2.0, -1.0, 0.2], [0.0, 0.2, 0.0]]),  # indefinite
              torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])):  # rank one
        c = c.double()
        want = sum(c[j, k] * hess[j][k] for j in range(3) for k in range(3))
        close(chunkjac.laplacian(f, X, weights=c, mode=mode), want)
    per = torch.randn(5, 2, 2, dtype=torch.float64)
    per = per + per.transpose(1, 2)
    want = sum(per[:, j, k, None] * hess[[0, 1][j]][[0, 1][k]] for j in range(2) for k in range(2))
    close(chunkjac.laplacian(f, X, dims=[0, 1], weights=per, mode=mode), want)


@pytest.mark.parametrize("mode", MODES)
def test_derivatives_orders_one_to_four(mode):
    f = mlp(d_out=2)
    terms = {"u_t": (2,), "u_xx": (0, 0), "u_xy": (0, 1), "u_ty": (2, 1), "u_xyt": (0, 1, 2), "u_xxxx": (0, 0, 0, 0),
             "u_xxyy": (0, 0, 1, 1), "u_xxyt": (0, 0, 1, 2)}
    got = chunkjac.derivatives(f, X, terms, mode=mode)
    assert list(got) == list(terms)
    for name, idx in terms.items():
        close(got[name], partial(f, X, idx))
    low = chunkjac.derivatives(f, X, {"u_x": 0, "u_xy": (1, 0)}, mode=mode)  # order <= 2: one Taylor pass
    close(low["u_x"], partial(f, X, (0,)))
    close(low["u_xy"], partial(f, X, (0, 1)))


@pytest.mark.parametrize("mode", MODES)
def test_bilaplacian_and_divergence(mode):
    f = mlp(act=nn.SiLU)
    t = fourth(f, X)
    close(chunkjac.bilaplacian(f, X, mode=mode), torch.einsum("boiijj->bo", t))
    close(t[..., 0, 0, 1, 1], partial(f, X, (0, 0, 1, 1)))  # the two references agree
    close(chunkjac.bilaplacian(f, X, dims=(0, 2), mode=mode),
          t[..., 0, 0, 0, 0] + t[..., 2, 2, 2, 2] + 2 * t[..., 0, 0, 2, 2])
    # above five coordinates the pairs e_i +- e_j replace the sign patterns
    x6 = torch.randn(3, 6, dtype=torch.float64)
    g = mlp(d_in=6, width=8)
    close(chunkjac.bilaplacian(g, x6, mode=mode), torch.einsum("boiijj->bo", fourth(g, x6)))
    v = mlp(d_out=3)
    div = chunkjac.divergence(v, X, mode=mode)
    assert div.shape == (5,)
    close(div, sum(partial(lambda z: v(z)[:, k:k + 1], X, (k,))[:, 0] for k in range(3)))


@pytest.mark.parametrize("mode", ("auto", "forward"))
def test_ops_jet_for_pytorch_refuses(mode):
    ours, ref = Unsupported(native_norm=True).double(), Unsupported(native_norm=False).double()
    close(chunkjac.laplacian(ours, X, weights=torch.diag(torch.tensor([1.0, 2.0, 3.0])).double(), mode=mode),
          sum((k + 1) * partial(ref, X, (k, k)) for k in range(3)))
    close(chunkjac.bilaplacian(ours, X, mode=mode), torch.einsum("boiijj->bo", fourth(ref, X)), rtol=1e-7)
    d = chunkjac.derivatives(ours, X, {"u_xxx": (0, 0, 0), "u_y": (1,)}, mode=mode)
    close(d["u_xxx"], partial(ref, X, (0, 0, 0)))
    close(d["u_y"], partial(ref, X, (1,)))


def test_randomized_estimates_are_unbiased_and_reproducible():
    f = mlp(d_in=4)
    x = torch.randn(6, 4, dtype=torch.float64)
    exact = chunkjac.laplacian(f, x)
    for dist in ("rademacher", "gaussian"):
        est = torch.stack([chunkjac.laplacian(f, x, samples=2, seed=s, distribution=dist) for s in range(400)])
        se = est.std(0) / math.sqrt(400)
        assert ((est.mean(0) - exact).abs() <= 5 * se + 1e-12).all()
    v = mlp(d_in=4, d_out=4)
    est = torch.stack([chunkjac.divergence(v, x, samples=1, seed=s) for s in range(400)])
    assert ((est.mean(0) - chunkjac.divergence(v, x)).abs() <= 5 * est.std(0) / 20 + 1e-12).all()
    exact4 = chunkjac.bilaplacian(f, x[:3])
    for dist in ("rademacher", "gaussian"):
        est = torch.stack([chunkjac.bilaplacian(f, x[:3], samples=2, seed=s, distribution=dist) for s in range(400)])
        assert ((est.mean(0) - exact4).abs() <= 5 * est.std(0) / 20 + 1e-12).all()
    # one sample's directions depend on (seed, its index) only: the same bits whatever the chunking
    whole = random_directions(7, 0, 50, 3, 4, "rademacher")
    assert torch.equal(random_directions(7, 20, 7, 3, 4, "rademacher"), whole[:, 20:27])
    g = random_directions(7, 0, 50, 3, 5, "gaussian")
    assert torch.equal(random_directions(7, 33, 17, 3, 5, "gaussian"), g[:, 33:])
    assert abs(float(g.mean())) < 0.2 and abs(float(g.std()) - 1) < 0.2
    xs = torch.randn(50, 4, dtype=torch.float64)
    torch.use_deterministic_algorithms(True)  # no strategy timed on the run's chunks: one route throughout
    try:
        a = chunkjac.laplacian(f, xs, samples=4, seed=3, chunk_size=7)
        b = chunkjac.laplacian(f, xs, samples=4, seed=3, chunk_size=50)
        assert torch.equal(a, chunkjac.laplacian(f, xs, samples=4, seed=3, chunk_size=7))
    finally:
        torch.use_deterministic_algorithms(False)
    close(a, b, rtol=1e-12)  # the same directions; BLAS may round a chunk of another size differently
    assert not torch.allclose(a, chunkjac.laplacian(f, xs, samples=4, seed=4))


def test_create_graph_gradients_equal_nested_autograd():
    """A heat-equation residual u_t - u_xx - u_yy: the parameters' gradient of its loss through
    chunkjac.derivatives equals the one through nested autograd."""
    f = mlp(width=10)
    x = X.clone()
    d = chunkjac.derivatives(f, x, {"u_t": (2,), "u_xx": (0, 0), "u_yy": (1, 1)}, create_graph=True)
    loss = ((d["u_t"] - d["u_xx"] - d["u_yy"]) ** 2).mean()
    ours = torch.autograd.grad(loss, list(f.parameters()), allow_unused=True, materialize_grads=True)
    xr = x.clone().requires_grad_(True)
    u = f(xr)
    (g,) = torch.autograd.grad(u.sum(), xr, create_graph=True)
    uxx = torch.autograd.grad(g[:, 0].sum(), xr, create_graph=True)[0][:, 0]
    uyy = torch.autograd.grad(g[:, 1].sum(), xr, create_graph=True)[0][:, 1]
    ref = torch.autograd.grad(((g[:, 2] - uxx - uyy) ** 2).mean(), list(f.parameters()), allow_unused=True,
                              materialize_grads=True)
    for a, b in zip(ours, ref):
        close(a, b, 1e-10)
    bl = chunkjac.bilaplacian(f, x, create_graph=True)
    (gb,) = torch.autograd.grad(bl.sum(), f[0].weight)
    eps = 1e-5
    with torch.no_grad():
        w = f[0].weight
        w[0, 1] += eps
        up = chunkjac.bilaplacian(f, x).sum()
        w[0, 1] -= 2 * eps
        down = chunkjac.bilaplacian(f, x).sum()
        w[0, 1] += eps
    assert abs(gb[0, 1].item() - (up - down).item() / (2 * eps)) < 1e-5 * max(1.0, abs(gb[0, 1].item()))


class Coupled(nn.Module):
    """BatchNorm in training mode: every sample's output depends on every sample's input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.l1, self.bn, self.l2 = nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 1)

    def forward(self, x):
        return self.l2(torch.tanh(self.bn(self.l1(x))))


class CoupledByHand(nn.Module):
    """Coupled's function with the batch norm written out: PyTorch's native batch_norm (training mode)
    has a wrong third derivative (measured: u_xxx off by 0.06 of 0.44 by nested autograd.grad), its
    definition a right one."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        h = self.f.l1(x)
        c = h - h.mean(0, keepdim=True)
        h = c * torch.rsqrt((c * c).mean(0, keepdim=True) + self.f.bn.eps) * self.f.bn.weight + self.f.bn.bias
        return self.f.l2(torch.tanh(h))


@pytest.mark.parametrize("mode", MODES)
def test_coupled_samples_exact_per_sample(mode):
    f = Coupled().double().train()
    ref = CoupledByHand(f)
    got = chunkjac.derivatives(f, X, {"u_xy": (0, 1), "u_z": (2,), "u_xxx": (0, 0, 0)}, coupling="coupled", mode=mode)
    close(got["u_xy"], partial(f, X, (0, 1)))
    close(got["u_z"], partial(f, X, (2,)))
    close(got["u_xxx"], partial(ref, X, (0, 0, 0)))
    c = torch.tensor([[1.0, 0.3, 0.0], [0.3, 2.0, 0.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    close(chunkjac.laplacian(f, X, weights=c, coupling="coupled"),
          sum(c[j, k] * partial(f, X, (j, k)) for j in range(3) for k in range(3)))
    with pytest.warns(chunkjac.CouplingWarning):  # found, not assumed: never the sum trick
        close(chunkjac.laplacian(f, X, dims=(1,)), partial(f, X, (1, 1)))


def test_memo_tells_operators_apart():
    f = mlp()
    a = chunkjac.laplacian(f, X, weights=torch.eye(3, dtype=torch.float64))
    b = chunkjac.laplacian(f, X, weights=2 * torch.eye(3, dtype=torch.float64))
    close(b, 2 * a)
    close(chunkjac.laplacian(f, X, dims=(0,)), partial(f, X, (0, 0)))
    close(chunkjac.laplacian(f, X, dims=(1,)), partial(f, X, (1, 1)))
    d1 = chunkjac.derivatives(f, X, {"u": (0, 0)})
    d2 = chunkjac.derivatives(f, X, {"u": (1, 1)})
    close(d1["u"], partial(f, X, (0, 0)))
    close(d2["u"], partial(f, X, (1, 1)))


def test_dumps_outputs_and_plans(tmp_path):
    f = mlp()
    x = torch.randn(40, 3, dtype=torch.float64)
    terms = {"u_t": (2,), "u_xx": (0, 0)}
    want = chunkjac.derivatives(f, x, terms)
    got = chunkjac.derivatives(f, x, terms, out=str(tmp_path / "d"), chunk_size=16)
    for k in terms:
        close(torch.from_numpy(np.load(tmp_path / "d" / f"{k}.npy")), want[k])
        close(got[k], want[k])
    (d, u) = chunkjac.derivatives(f, x, terms, return_outputs=True)
    close(u, f(x).detach())
    bl = chunkjac.bilaplacian(f, x)
    chunkjac.bilaplacian(f, x, out=str(tmp_path / "b.npy"), chunk_size=9)
    close(torch.from_numpy(np.load(tmp_path / "b.npy")), bl)
    p = chunkjac.plan(f, x, part=chunkjac.operator("laplacian", dims=(0, 1)))
    assert "laplacian over dims [0, 1]" in str(p)
    close(chunkjac.laplacian(f, x, dims=(0, 1), plan=p), chunkjac.laplacian(f, x, dims=(0, 1), chunk_size=40))
    with pytest.raises(ValueError, match="plan= was made for"):
        chunkjac.laplacian(f, x, dims=(0, 2), plan=p)


@pytest.mark.parametrize("call, match", [
    (lambda f: chunkjac.laplacian(f, X, dims=(3,)), "coordinate 3 is outside"),
    (lambda f: chunkjac.laplacian(f, X, dims=(-1,)), "outside"),
    (lambda f: chunkjac.laplacian(f, X, weights=torch.eye(2)), r"expected \(3, 3\)"),
    (lambda f: chunkjac.laplacian(f, X, weights=torch.tensor([[1.0, 2, 0], [0, 1, 0], [0, 0, 1]])), "symmetric"),
    (lambda f: chunkjac.laplacian(f, X, samples=0), "samples must be a positive int"),
    (lambda f: chunkjac.laplacian(f, X, seed=3), "seed= is given without samples="),
    (lambda f: chunkjac.laplacian(f, X, samples=2, distribution="uniform"), "distribution must be one of"),
    (lambda f: chunkjac.bilaplacian(f, X, samples=-1), "samples"),
    (lambda f: chunkjac.derivatives(f, X, {"u5": (0, 0, 0, 0, 0)}), "order 5"),
    (lambda f: chunkjac.derivatives(f, X, {"u": (0, 7)}), "coordinate 7 is outside"),
    (lambda f: chunkjac.derivatives(f, X, {"u": "x"}), "tuple of input coordinates"),
    (lambda f: chunkjac.derivatives(f, X, {}), "non-empty dict"),
    (lambda f: chunkjac.divergence(f, X), "divergence needs fn's per-sample output shaped like its per-sample input"),
    (lambda f: chunkjac.divergence(f, X, part="full"), "takes no part="),
])
def test_bad_input_is_refused_by_name(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(mlp())


def test_randomized_dump_resumes_with_its_seed_and_refuses_another(tmp_path):
    """A dump of a randomized Laplacian: its manifest records the seed; a rerun with another seed is
    refused before anything is overwritten, and the same call returns the same bits."""
    f = mlp()
    x = torch.randn(40, 3, dtype=torch.float64)
    out = str(tmp_path / "l.npy")
    torch.use_deterministic_algorithms(True)
    try:
        first = chunkjac.laplacian(f, x, samples=3, seed=1, out=out, chunk_size=8)
        again = chunkjac.laplacian(f, x, samples=3, seed=1, out=out, chunk_size=8)
    finally:
        torch.use_deterministic_algorithms(False)
    assert np.array_equal(np.asarray(first), np.asarray(again))
    with pytest.raises(chunkjac._manifest.ManifestError, match="different call"):
        chunkjac.laplacian(f, x, samples=3, seed=2, out=out, chunk_size=8)
    close(torch.from_numpy(np.load(out)), chunkjac.laplacian(f, x, samples=3, seed=1))


def test_inputs_without_elements_give_zeros():
    x = torch.randn(3, 0, dtype=torch.float64)
    f = lambda z: z.sum(-1, keepdim=True) + 1.0  # noqa: E731
    for got in (chunkjac.bilaplacian(f, x), chunkjac.bilaplacian(f, x, samples=2), chunkjac.laplacian(f, x, samples=2),
                chunkjac.laplacian(f, x, weights=torch.zeros(0, 0)), chunkjac.laplacian(f, x, weights=torch.zeros(3, 0, 0))):
        assert got.shape == (3, 1) and not got.any()
    for got in (chunkjac.divergence(lambda z: 2 * z, x), chunkjac.divergence(lambda z: 2 * z, x, samples=3)):
        assert got.shape == (3,) and not got.any()
