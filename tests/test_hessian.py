"""chunkjac.hessian / chunkjac.laplacian: every part, both strategies, against independent references
(torch.func.vmap(hessian), the per-sample Hessians of torch.autograd.functional, the seed's loop)."""
import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import hessian as fhessian, jacrev, vmap

import chunkjac
from _reference import hessian_blocks

PARTS = ("laplacian", "diagonal", "full")


def vmap_reference(f, x, part):
    h = vmap(fhessian(lambda z: f(z[None])[0]))(x)  # (B, *out, D, D) for (B, D) inputs
    if part == "full":
        return h
    d = h.diagonal(dim1=-2, dim2=-1)
    return d if part == "diagonal" else d.sum(-1)


def mlp(act, d_in=3, d_out=2, width=24):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, width), act, nn.Linear(width, width), act, nn.Linear(width, d_out)).double()


class Sin(nn.Module):
    def forward(self, x):
        return torch.sin(x)


ACTS = [nn.Tanh(), Sin(), nn.Softplus(beta=2.0), nn.GELU(), nn.SiLU(), nn.Sigmoid(), nn.GELU(approximate="tanh"),
        nn.ELU(), nn.Mish()]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__ + getattr(a, "approximate", ""))
@pytest.mark.parametrize("part", PARTS)
def test_mlps_every_part_match_vmap_hessian(act, part):
    f = mlp(act)
    x = torch.randn(300, 3, dtype=torch.double)
    res, jac, out = chunkjac.hessian(f, x, part=part, return_jacobian=True, return_outputs=True, chunk_size=128)
    torch.testing.assert_close(res, vmap_reference(f, x, part), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(jac, vmap(jacrev(lambda z: f(z[None])[0]))(x), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out, f(x))
    assert type(res) is torch.Tensor and type(out) is torch.Tensor  # no Taylor-mode tensor leaks out


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("part", PARTS)
def test_both_strategies_agree_with_the_reference(mode, part):
    f = mlp(nn.Tanh(), d_in=4, d_out=3)
    x = torch.randn(200, 4, dtype=torch.double)
    p = chunkjac.plan(f, x, part=part, mode=mode)
    assert p.strategy == {"forward": "taylor", "reverse": "double_backward"}[mode]
    torch.testing.assert_close(chunkjac.hessian(f, x, part=part, mode=mode), vmap_reference(f, x, part))


def test_laplacian_is_the_short_form_and_matches_the_seed_loop():
    f = mlp(nn.Tanh())
    x = torch.randn(500, 3, dtype=torch.double)
    lap = chunkjac.laplacian(f, x)
    # The seed's grad-of-grad loop (002): exact because the samples are independent.
    xr = x.clone().requires_grad_(True)
    y = f(xr)
    cols = []
    for o in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[:, o].sum(), xr, create_graph=True)
        cols.append(sum(torch.autograd.grad(g[:, k].sum(), xr, retain_graph=True)[0][:, k] for k in range(3)))
    torch.testing.assert_close(lap, torch.stack(cols, 1))
    with pytest.raises(TypeError, match="takes no part"):
        chunkjac.laplacian(f, x, part="full")


class OffTable(nn.Module):
    """Ops without a rule of their own (the generic rule) and the normalisations taken by definition."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6)
        self.gn = nn.GroupNorm(2, 6)
        self.bn = nn.BatchNorm1d(6).eval()
        self.bn.running_mean.normal_()
        self.bn.running_var.uniform_(0.5, 2.0)
        nn.init.normal_(self.ln.weight)

    def forward(self, x):
        h = self.ln(self.lin(x))
        h = self.bn(self.gn(h)) + torch.softmax(h, -1) * h.prod(-1, keepdim=True)
        a = torch.logsumexp(h, -1, keepdim=True) + torch.atan2(h[:, :1], h[:, 1:2] + 3)
        b = torch.cumprod(torch.tanh(h[:, 2:5]), -1) * h.norm(dim=-1, keepdim=True)
        return torch.cat([a, b, F_rms(h)], -1)


def F_rms(h):
    return h[:, :2] * torch.rsqrt((h * h).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("part", PARTS)
def test_ops_outside_the_rule_table_are_exact(part):
    f = OffTable().double()
    x = torch.randn(40, 4, dtype=torch.double)
    assert chunkjac.plan(f, x, part=part).strategy == "taylor"
    torch.testing.assert_close(chunkjac.hessian(f, x, part=part), vmap_reference(f, x, part), rtol=1e-8, atol=1e-9)


def test_several_inputs_outputs_in_dims_and_per_sample_shapes():
    torch.manual_seed(2)
    w = torch.randn(4, 6, dtype=torch.double)

    def fn(t, x, scale):  # x: (2, B, 2) batched along dim 1; a dict of outputs
        z = x.permute(1, 0, 2).reshape(-1, 4)
        h = torch.tanh(z @ w) * scale + t
        return {"u": h.reshape(-1, 2, 3), "aux": h.sum(-1)}

    b = 25
    t = torch.randn(b, 6, dtype=torch.double)
    x = torch.randn(2, b, 2, dtype=torch.double)
    scale = torch.tensor(1.5, dtype=torch.double)
    res, jac = chunkjac.hessian(fn, (t, x, scale), wrt=1, in_dims=(0, 1, None), output="u", return_jacobian=True)
    assert res.shape == (b, 2, 3, 2, 2, 2, 2) and jac.shape == (b, 2, 3, 2, 2)

    def one(xi, i):
        xx = x.clone()
        xx[:, i] = xi
        return fn(t, xx, scale)["u"][i]

    for i in (0, 7, b - 1):
        ref = torch.autograd.functional.hessian(lambda v: one(v, i).reshape(-1)[0], x[:, i])
        torch.testing.assert_close(res[i, 0, 0], ref)
        ref_j = torch.autograd.functional.jacobian(lambda v: one(v, i), x[:, i])
        torch.testing.assert_close(jac[i], ref_j)


def test_inplace_ops_in_fn_are_followed_or_fall_back_exactly():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(3)
            self.a = nn.Linear(3, 8)
            self.b = nn.Linear(8, 8)

        def forward(self, x):
            h = self.a(x)
            h += torch.sin(x).sum(-1, keepdim=True)  # into a fresh tensor: followed
            h = torch.nn.functional.relu(h, inplace=True)
            h = torch.tanh(self.b(h)) + 1.0  # (tanh saves its output: autograd refuses writes into it)
            h.mul_(2.0)
            return h

    class IntoPlain(nn.Module):  # writes jets into a tensor made inside fn: Taylor mode falls back
        def forward(self, x):
            out = torch.zeros(x.shape[0], 2, dtype=x.dtype)
            out[:, 0] = torch.sin(x).prod(-1)
            out[:, 1] = torch.tanh(x[:, 0] * x[:, 2])
            return out

    x = torch.randn(30, 3, dtype=torch.double)
    for f, strategy in ((InPlace().double(), "taylor"), (IntoPlain(), "double_backward")):
        for part in PARTS:
            assert chunkjac.plan(f, x, part=part).strategy == strategy
            torch.testing.assert_close(chunkjac.hessian(f, x, part=part), hessian_blocks(f, x, part))


def test_wrong_forward_over_forward_is_caught_and_reverse_over_reverse_used():
    # PyTorch's forward-over-forward second derivative of linalg.solve is wrong (against finite
    # differences; vmap(hessian) is wrong here too); the cross-check against reverse over reverse sees
    # it on the first samples. The reference: per-sample autograd.functional.hessian and differences.
    def f(x):
        a = x[:, :4].reshape(-1, 2, 2) + 3 * torch.eye(2, dtype=x.dtype)
        return torch.linalg.solve(a, x[:, 4:, None])[..., 0]

    x = torch.randn(20, 6, dtype=torch.double)
    p = chunkjac.plan(f, x, part="laplacian")
    assert p.strategy == "double_backward", str(p)
    lap = chunkjac.laplacian(f, x)
    torch.testing.assert_close(lap, hessian_blocks(f, x, "laplacian"))
    h = 1e-4
    eye = torch.eye(6, dtype=x.dtype) * h
    fd = sum((f(x + e) - 2 * f(x) + f(x - e)) / h ** 2 for e in eye)
    torch.testing.assert_close(lap, fd, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Taylor mode .*cannot give"):
        chunkjac.laplacian(f, x, mode="forward")


@pytest.mark.parametrize("act", [nn.Tanh(), Sin(), nn.Sigmoid(), nn.Softplus()], ids=lambda a: type(a).__name__)
def test_create_graph_gradients_match_the_seed_loop(act):
    # tanh, sin and sigmoid take the fused training path (a written-out backward); softplus does not.
    torch.manual_seed(4)
    f = mlp(act, d_in=2, d_out=1, width=16)
    x = torch.randn(200, 2, dtype=torch.double)
    src = torch.randn(200, 1, dtype=torch.double)
    for mode in ("auto", "reverse"):
        lap, u = chunkjac.laplacian(f, x, create_graph=True, return_outputs=True, mode=mode, chunk_size=64)
        loss = ((lap - src) ** 2).mean() + (u ** 2).mean()
        ours = torch.autograd.grad(loss, list(f.parameters()), create_graph=True)
        xr = x.clone().requires_grad_(True)
        y = f(xr)
        (g,) = torch.autograd.grad(y.sum(), xr, create_graph=True)
        ref_lap = sum(torch.autograd.grad(g[:, k].sum(), xr, create_graph=True)[0][:, k] for k in range(2))[:, None]
        ref = torch.autograd.grad(((ref_lap - src) ** 2).mean() + (y ** 2).mean(), list(f.parameters()),
                                  create_graph=True)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b)
        # and once more (a gradient penalty on the parameters' gradient): the backward differentiates too
        again = torch.autograd.grad(sum((a ** 2).sum() for a in ours), list(f.parameters()))
        ref_again = torch.autograd.grad(sum((b ** 2).sum() for b in ref), list(f.parameters()))
        for a, b in zip(again, ref_again):
            torch.testing.assert_close(a, b)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.q, self.k = nn.Linear(3, 4), nn.Linear(3, 4)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).T, -1)
        return torch.tanh(a @ x)


@pytest.mark.parametrize("part", PARTS)
def test_coupled_samples_get_exact_blocks_never_the_sum_trick(part):
    f = Attention().double()
    x = torch.randn(6, 3, dtype=torch.double)
    with pytest.warns(chunkjac.CouplingWarning):
        res = chunkjac.hessian(f, x, part=part, max_seconds=None)
    torch.testing.assert_close(res, hessian_blocks(f, x, part))
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    g = lambda z: torch.cat([f(z[:3]), f(z[3:])])  # noqa: E731 - two independent groups of 3
    torch.testing.assert_close(chunkjac.hessian(g, x, part=part, coupling=groups), hessian_blocks(g, x, part))


def test_batchnorm_in_training_is_coupled_and_exact():
    torch.manual_seed(6)
    f = nn.Sequential(nn.Linear(2, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1)).double().train()
    x = torch.randn(5, 2, dtype=torch.double)
    before = f[1].running_mean.clone()
    with pytest.warns(chunkjac.CouplingWarning):
        lap = chunkjac.laplacian(f, x, max_seconds=None)
    assert torch.equal(f[1].running_mean, before)  # a derivative is not a training step
    torch.testing.assert_close(lap, hessian_blocks(f, x, "laplacian"))


def test_dump_resume_out_tensors_and_recorded_plan(tmp_path):
    f = mlp(nn.Tanh())
    x = torch.randn(400, 3, dtype=torch.double)
    ref = vmap_reference(f, x, "diagonal")
    path = str(tmp_path / "d.npy")
    got = chunkjac.hessian(f, x, part="diagonal", out=path, chunk_size=64)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(torch.from_numpy(np.load(path)), ref)
    again = chunkjac.hessian(f, x, part="diagonal", out=path, chunk_size=64)  # complete: a no-op
    torch.testing.assert_close(again, ref)
    with pytest.raises(ValueError, match="another call|different call|was made"):
        chunkjac.hessian(f, x, part="full", out=path, chunk_size=64)
    h = torch.empty(400, 2, dtype=torch.double)
    j = torch.empty(400, 2, 3, dtype=torch.double)
    chunkjac.hessian(f, x, part="laplacian", return_jacobian=True, out=(h, j))
    torch.testing.assert_close(h, ref.sum(-1))
    p = chunkjac.plan(f, x, part="laplacian")
    torch.testing.assert_close(chunkjac.laplacian(f, x, plan=p), ref.sum(-1))
    with pytest.raises(ValueError, match="plan= was made for laplacian"):
        chunkjac.hessian(f, x, part="full", plan=p)
    with pytest.raises(ValueError, match="plan= was made for Jacobians"):
        chunkjac.laplacian(f, x, plan=chunkjac.plan(f, x))


def test_bad_arguments_get_clear_errors():
    f = mlp(nn.Tanh())
    x = torch.randn(10, 3, dtype=torch.double)
    with pytest.raises(ValueError, match="part must be one of"):
        chunkjac.hessian(f, x, part="trace")
    with pytest.raises(ValueError, match="one batched input"):
        chunkjac.hessian(f, x, wrt="0.weight")
    with pytest.raises(ValueError, match="one batched input"):
        chunkjac.hessian(lambda a, b: f(a + b), (x, x), wrt=(0, 1))
    with pytest.raises(TypeError, match="floating-point"):
        chunkjac.laplacian(lambda i: f(i.double()), torch.ones(10, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="mode must be one of"):
        chunkjac.laplacian(f, x, mode="taylor")


def test_random_and_constant_outputs():
    x = torch.randn(20, 3, dtype=torch.double)
    # An output that does not depend on x: zero derivatives, no error.
    torch.testing.assert_close(chunkjac.laplacian(lambda z: torch.ones(z.shape[0], 2, dtype=z.dtype) + 0 * z[:, :2],
                                                  x), torch.zeros(20, 2, dtype=torch.double))
    # x enters only through a detached path while the output moves with it: refused, not zeros.
    with pytest.raises(ValueError, match="not connected"):
        chunkjac.laplacian(lambda z: torch.sin(z.detach()), x)


def test_ops_without_second_derivatives_give_chunkjac_errors_in_a_child_process():
    # Whatever the engine meets, the process survives, and the answer is exact (compared with the
    # per-sample Hessians of torch.autograd.functional, reverse over reverse) or a chunkjac error.
    code = (
        "import torch, chunkjac\n"
        "fs = [lambda x: torch.fft.rfft(x, dim=-1).abs(), lambda x: torch.cdist(x[:, None], x[:, None] + 1)[:, 0],\n"
        "      lambda x: torch.sort(x, -1)[0], lambda x: x.max(-1, keepdim=True)[0], lambda x: x.float().double()]\n"
        "x = torch.randn(8, 4, dtype=torch.double)\n"
        "def h(f, v):  # (*out, 4, 4): one Hessian per output element of the sample\n"
        "    out = f(v[None])[0]\n"
        "    hs = [torch.autograd.functional.hessian(lambda w, r=r: f(w[None])[0].reshape(-1)[r], v)\n"
        "          for r in range(out.numel())]\n"
        "    return torch.stack(hs).reshape(*out.shape, 4, 4)\n"
        "for f in fs:\n"
        "    for part in ('laplacian', 'diagonal', 'full'):\n"
        "        try:\n"
        "            got = chunkjac.hessian(f, x, part=part)\n"
        "        except (RuntimeError, ValueError, TypeError) as e:\n"
        "            assert str(e).startswith('chunkjac:'), e\n"
        "            print('error')\n"
        "            continue\n"
        "        ref = torch.stack([h(f, xi) for xi in x])\n"
        "        want = {'full': ref, 'diagonal': ref.diagonal(dim1=-2, dim2=-1),\n"
        "                'laplacian': ref.diagonal(dim1=-2, dim2=-1).sum(-1)}[part]\n"
        "        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)\n"
        "        print('exact')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.split()
    assert len(lines) == 15 and lines.count("exact") >= 9, r.stdout


# Regressions from an adversarial review: each case branches on the data so that samples 0-1 (where
# a check on the first samples alone would look) take one path and samples 4-7 another.
class _ClipGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return z.clone()

    @staticmethod
    def backward(ctx, g):
        (z,) = ctx.saved_tensors
        return torch.where(z.abs() > 9, 0 * g, g)


def _view_of_view(x):
    h = x * 2
    first = h.view(-1, 3)[:, 0]  # a view of a temporary view of h
    h.clamp_(max=3.0)            # must show in `first`
    return first[:, None] ** 2 + h


def _detached_alias(x):
    h = x * 2
    snap = h.detach()            # shares h's memory
    h.clamp_(max=3.0)
    return x ** 2 * snap


def _no_grad_block(x):
    with torch.no_grad():
        s = torch.where(x.abs() > 3, x.abs(), torch.ones_like(x))
    return torch.sin(x) / s


BRANCHY = {
    "scalar over jet": lambda x: torch.where(x > 3, 1.0 / x, x ** 2),
    "int tensor branch": lambda x: torch.where(x > 3, torch.tensor(3), x ** 2),
    "plain.where(cond, jet)": lambda x: torch.tensor(9.0, dtype=x.dtype).where(x > 3, x ** 2),
    "bool summand": lambda x: torch.sin(x) + (x > 3),
    "cat tensors=": lambda x: torch.cat(tensors=[x ** 2, torch.ones_like(x)], dim=1),
    "view of a view written in place": _view_of_view,
    "detached alias written in place": _detached_alias,
    "no_grad block": _no_grad_block,
    "custom autograd.Function": lambda x: _ClipGrad.apply(x ** 2) ** 2,
}


@pytest.mark.parametrize("name", list(BRANCHY))
def test_data_dependent_paths_are_exact_on_every_sample(name):
    f = BRANCHY[name]
    torch.manual_seed(0)
    x = torch.randn(8, 3, dtype=torch.double)
    x[4:] += 5
    lap, out = chunkjac.laplacian(f, x, return_outputs=True)
    torch.testing.assert_close(lap, hessian_blocks(f, x, "laplacian"))
    torch.testing.assert_close(out, f(x.clone()))


def test_outputs_of_very_different_scales_are_each_checked():
    x = torch.randn(6, 3)
    f = lambda z: torch.cat([1e5 * z ** 2, 1 / (z + 3)], 1)  # noqa: E731
    lap = chunkjac.laplacian(f, x)
    ref = hessian_blocks(lambda z: f(z.float()).double(), x.double(), "laplacian").float()
    torch.testing.assert_close(lap[:, 3:], ref[:, 3:], rtol=1e-3, atol=1e-5)


def test_a_jet_kept_by_a_hook_is_a_plain_tensor_afterwards():
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    feats = []
    m[1].register_forward_hook(lambda mod, i, o: feats.append(o))
    chunkjac.laplacian(m, torch.randn(6, 3))
    kept = feats[-1]  # a jet of a finished pass: every op on it treats it as its value
    value = m(torch.zeros(1, 3)) * 0  # (any plain tensor, to compare types)
    assert type(kept * 2) is type(value) and type(kept.sum()) is type(value)
    assert type(copy.deepcopy(kept)) is type(value)
    torch.testing.assert_close(kept * 2, torch.tensor(kept.tolist()) * 2)


def test_transformer_layer_by_definition_where_no_other_route_exists():
    # PyTorch's fused CPU attention kernel has neither forward-over-forward nor double-backward
    # derivatives; Taylor mode runs multi_head_attention_forward's own body and attention by its
    # definition. Reference: central differences.
    torch.manual_seed(7)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double().eval()
    f = lambda z: layer(z.reshape(-1, 4, 8))[:, 0, :2]  # noqa: E731 - 4 tokens of 8 features per sample
    x = torch.randn(5, 32, dtype=torch.double)
    lap = chunkjac.laplacian(f, x)
    h = 1e-4
    with torch.no_grad():
        fd = sum((f(x + e) - 2 * f(x) + f(x - e)) / h ** 2 for e in torch.eye(32, dtype=x.dtype) * h)
    torch.testing.assert_close(lap, fd, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["auto", "reverse"])
@pytest.mark.parametrize("part", PARTS)
def test_empty_inputs_and_outputs_give_empty_results(part, mode):
    x = torch.randn(2, 0, 3, dtype=torch.double)
    extra = {"laplacian": (), "diagonal": (0, 3), "full": (0, 3, 0, 3)}[part]
    assert chunkjac.hessian(torch.exp, x, part=part, mode=mode).shape == (2, 0, 3, *extra)
    x = torch.randn(3, 2, dtype=torch.double)
    res, jac = chunkjac.hessian(lambda z: z[:, :0], x, part=part, mode=mode, return_jacobian=True)
    assert res.shape == (3, 0, *{"laplacian": (), "diagonal": (2,), "full": (2, 2)}[part]) and jac.shape == (3, 0, 2)


def test_wide_outputs_are_checked_by_projection_without_false_alarms():
    # 600 outputs x (1 + 6) VJPs would make the full check cost more than the run: projected instead.
    f = mlp(nn.Tanh(), d_in=6, d_out=600, width=16)
    x = torch.randn(40, 6, dtype=torch.double)
    assert chunkjac.plan(f, x, part="laplacian").strategy == "taylor"
    torch.testing.assert_close(chunkjac.laplacian(f, x), vmap_reference(f, x, "laplacian"))


# create_graph=True: the route must be right one order higher (see [Why create_graph is checked one
# order higher] in _check). PyTorch's third derivative of layer_norm is wrong, so the gradient of a
# Laplacian by reverse over reverse was off by 13-115% while Taylor mode matched finite differences.

def _layer_norm_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1)).double()


def _fd_parameter_gradient(m, x, eps=1e-6):
    """d/dθ of sum_i laplacian(m)(x_i), by central differences of per-sample autograd Hessians."""
    base = torch.nn.utils.parameters_to_vector(m.parameters()).detach()
    mm = copy.deepcopy(m)
    g = torch.zeros_like(base)
    for k in range(base.numel()):
        for sign in (1, -1):
            v = base.clone()
            v[k] += sign * eps
            torch.nn.utils.vector_to_parameters(v, mm.parameters())
            lap = sum(torch.autograd.functional.hessian(lambda z: mm(z[None])[0, 0], xi).trace() for xi in x)
            g[k] += sign * lap / (2 * eps)
    return g


def test_create_graph_through_layer_norm_takes_the_route_that_is_right():
    m, x = _layer_norm_net(), torch.randn(6, 3, dtype=torch.float64)
    ref = _fd_parameter_gradient(m, x)
    for mode in ("auto", "forward"):
        mm = copy.deepcopy(m)
        chunkjac.laplacian(mm, x, create_graph=True, mode=mode).sum().backward()
        got = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in mm.parameters()])
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"create_graph=True with mode='reverse'.*finite differences.*mode='auto'"):
        chunkjac.laplacian(copy.deepcopy(m), x, create_graph=True, mode="reverse")


def test_the_higher_order_check_sees_a_wrong_route(monkeypatch):
    # The check itself: reverse over reverse through layer_norm fails it, Taylor mode passes.
    from chunkjac import _check, _request
    m, x = _layer_norm_net(), torch.randn(6, 3, dtype=torch.float64)
    for mode, wrong in (("reverse", True), ("forward", False)):
        req = _request.make("laplacian", m, x, create_graph=True, mode=mode, part="laplacian")
        p = chunkjac.plan(m, x, create_graph=True, mode="forward", part="laplacian") if mode == "forward" else None
        if p is None:
            monkeypatch.setattr(chunkjac._call, "check_higher_order", lambda spec, plan: None)
            p = chunkjac.plan(m, x, create_graph=True, mode="reverse", part="laplacian")
            monkeypatch.undo()
        assert (_check.check_higher_order(req.spec, p) is not None) == wrong
