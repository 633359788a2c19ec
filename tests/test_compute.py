"""Correctness of chunkjac.compute against independent references, in float64, on a zoo of models."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import chunkjac
from chunkjac._executor import execute
from chunkjac._probe import probe
from chunkjac._spec import normalize

MODES = ["reverse", "forward", "auto"]
TOL = dict(rtol=1e-10, atol=1e-12)


def mlp(*w, act=nn.Tanh):
    layers = []
    for a, b in zip(w[:-1], w[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1]).double()


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3 * 5 * 5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(-3))


class ConvImage(nn.Module):
    """Image to image: (B, 2, 5, 5) -> (B, 2, 5, 5), so J is (B, 2, 5, 5, 2, 5, 5)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return torch.sin(self.conv(x)) * x


ZOO = {
    "seed001_sin": (lambda: torch.sin, (1024, 3)),
    "seed002_seq_5_2_10": (lambda: nn.Sequential(nn.Linear(5, 2), nn.Sigmoid(), nn.Linear(2, 10)).double(), (3, 5)),
    "pinn_tanh": (lambda: mlp(3, 16, 16, 3), (64, 3)),
    "relu_wide": (lambda: mlp(20, 12, 4, act=nn.ReLU), (33, 20)),
    "scalar_out": (lambda: (lambda m: lambda x: m(x).squeeze(-1))(mlp(4, 8, 1)), (17, 4)),
    "conv_net": (lambda: ConvNet().double(), (6, 2, 5, 5)),
    "conv_image": (lambda: ConvImage().double(), (4, 2, 5, 5)),
    "matrix_in": (lambda: (lambda x: (x @ x.transpose(-1, -2)).tanh()), (9, 3, 2)),
}


def reference(f, x):
    return vmap(jacrev(f))(x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_matches_vmap_jacrev(name, mode):
    make, shape = ZOO[name]
    f = make()
    x = torch.randn(*shape, dtype=torch.float64)
    J = chunkjac.compute(f, x, mode=mode)
    ref = reference(f, x)
    assert J.shape == ref.shape
    torch.testing.assert_close(J, ref, **TOL)


def test_seed000_shared_scalar_with_integer_batch():
    x = torch.arange(10)
    C = torch.tensor(-5.0, requires_grad=True)
    J = chunkjac.compute(lambda x, C: C * x, (x, C), in_dims=(0, None), wrt=1)
    loop = torch.stack([torch.autograd.grad(yi, C, retain_graph=True)[0] for yi in C * x])
    assert J.shape == (10,)
    torch.testing.assert_close(J, loop)


def test_shared_input_nonlinear_against_loop():
    def routine(C, x):
        return torch.tanh(C * x) * x + C ** 2

    x = torch.linspace(-2, 2, 50, dtype=torch.float64)
    C = torch.tensor(-0.5, dtype=torch.float64)
    J = chunkjac.compute(lambda x, C: routine(C, x), (x, C), in_dims=(0, None), wrt=1)
    ref = vmap(jacrev(routine), in_dims=(None, 0))(C, x)
    torch.testing.assert_close(J, ref, **TOL)


def test_shared_vector_input_gives_per_sample_rows():
    W = torch.randn(4, 3, dtype=torch.float64)
    f = lambda x, W: torch.tanh(x @ W.T)  # noqa: E731
    x = torch.randn(8, 3, dtype=torch.float64)
    J = chunkjac.compute(f, (x, W), in_dims=(0, None), wrt=1)
    ref = vmap(jacrev(f, argnums=1), in_dims=(0, None))(x, W)
    assert J.shape == (8, 4, 4, 3)
    torch.testing.assert_close(J, ref, **TOL)


@pytest.mark.parametrize("by", ["name", "parameter"])
def test_module_parameter_wrt(by):
    f = mlp(3, 5, 2)
    x = torch.randn(7, 3, dtype=torch.float64)
    w = f[0].weight
    J = chunkjac.compute(f, x, wrt="0.weight" if by == "name" else w)
    params = {k: v.detach() for k, v in f.named_parameters()}

    def one(p, xi):
        return functional_call(f, {**params, "0.weight": p}, (xi,))

    ref = vmap(jacrev(one), in_dims=(None, 0))(w.detach(), x)
    assert J.shape == (7, 2, 5, 3)
    torch.testing.assert_close(J, ref, **TOL)


class Shifted(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.randn(3, dtype=torch.float64))

    def forward(self, x):
        return torch.sin(x - self.shift)


def test_buffer_wrt():
    m = Shifted()
    x = torch.randn(6, 3, dtype=torch.float64)
    J = chunkjac.compute(m, x, wrt="shift")
    assert J.shape == (6, 3, 3)
    torch.testing.assert_close(J, torch.diag_embed(-torch.cos(x - m.shift)), **TOL)


def test_non_differentiable_buffer_is_refused_not_zero():
    # Forward mode alone returns zeros here; reverse mode knows running_mean is not differentiable.
    bn = nn.BatchNorm1d(3).double().eval()
    with pytest.raises(ValueError, match="not differentiable w.r.t. wrt='running_mean'"):
        chunkjac.compute(bn, torch.randn(6, 3, dtype=torch.float64), wrt="running_mean")


class TwoInTwoOut(nn.Module):
    """out1, out2 = model(x1, x2, mask1, mask2): the PINN of seed 001."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4)
        self.c = nn.Linear(4, 3)

    def forward(self, x1, x2, mask1, mask2):
        h = torch.tanh(self.a(x1) * mask1 + self.b(x2))
        out1 = self.c(h) * mask2
        out2 = (h ** 2).sum(-1)
        return out1, out2


def _two_in_two_out(B=11):
    m = TwoInTwoOut().double()
    x1 = torch.randn(B, 3, dtype=torch.float64)
    x2 = torch.randn(B, 2, dtype=torch.float64)
    mask1 = torch.rand(B, 4) > 0.3
    mask2 = (torch.rand(B, 3) > 0.3).double()
    return m, (x1, x2, mask1, mask2)


@pytest.mark.parametrize("mode", MODES)
def test_several_inputs_and_outputs(mode):
    m, args = _two_in_two_out()
    J, (out1, out2) = chunkjac.compute(m, args, wrt=0, output=0, mode=mode, return_outputs=True)
    ref = vmap(jacrev(lambda *a: m(*a)[0]))(*args)
    torch.testing.assert_close(J, ref, **TOL)
    e1, e2 = m(*args)
    torch.testing.assert_close(out1, e1, **TOL)
    torch.testing.assert_close(out2, e2, **TOL)
    assert not out1.requires_grad and not J.requires_grad


@pytest.mark.parametrize("mode", MODES)
def test_wrt_tuple_mixes_batched_and_shared(mode):
    m, args = _two_in_two_out()
    if mode == "reverse":
        wrt = (0, 1)
    else:
        wrt = (1, "c.bias", 0)
    Js = chunkjac.compute(m, args, wrt=wrt, output=1, mode=mode)
    assert isinstance(Js, tuple) and len(Js) == len(wrt)
    g = lambda *a: m(*a)[1]  # noqa: E731
    refs = {0: vmap(jacrev(g, argnums=0))(*args), 1: vmap(jacrev(g, argnums=1))(*args)}
    params = {k: v.detach() for k, v in m.named_parameters()}
    bias = lambda p, *a: functional_call(m, {**params, "c.bias": p}, a)[1]  # noqa: E731
    refs["c.bias"] = vmap(jacrev(bias), in_dims=(None, 0, 0, 0, 0))(m.c.bias.detach(), *args)
    for J, w in zip(Js, wrt):
        torch.testing.assert_close(J, refs[w], **TOL)


def test_unbatched_extra_input_is_broadcast():
    f = lambda x, A: torch.tanh(x @ A)  # noqa: E731
    x = torch.randn(12, 3, dtype=torch.float64)
    A = torch.randn(3, 5, dtype=torch.float64)
    J = chunkjac.compute(f, (x, A), in_dims=(0, None))
    ref = vmap(jacrev(f), in_dims=(0, None))(x, A)
    torch.testing.assert_close(J, ref, **TOL)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_nonzero_in_dims(mode):
    f = lambda x, y: torch.sin(x) * y  # noqa: E731  x: (3, B), y: (B, 3)
    x = torch.randn(3, 8, dtype=torch.float64)
    y = torch.randn(8, 3, dtype=torch.float64)
    J = chunkjac.compute(lambda x, y: f(x.T, y), (x, y), in_dims=(1, 0), mode=mode)
    ref = vmap(jacrev(lambda xi, yi: torch.sin(xi) * yi))(x.T, y)
    torch.testing.assert_close(J, ref, **TOL)


def test_negative_in_dims_and_wrt():
    x = torch.randn(4, 6, dtype=torch.float64)  # batch in the last dim
    J = chunkjac.compute(lambda s, x: s * torch.sin(x.T), (2.0, x), in_dims=(None, -1), wrt=-1)
    torch.testing.assert_close(J, torch.diag_embed(2.0 * torch.cos(x.T)), **TOL)


def test_dict_output_and_non_tensor_leaves():
    def f(x, scale):
        return {"y": torch.exp(x) * scale, "n": 3, "z": x.sum(-1)}

    x = torch.randn(5, 2, dtype=torch.float64)
    J, out = chunkjac.compute(f, (x, 2.0), output="y", return_outputs=True)
    torch.testing.assert_close(J, torch.diag_embed(2 * torch.exp(x)), **TOL)
    assert out["n"] == 3
    torch.testing.assert_close(out["z"], x.sum(-1))


def test_numpy_inputs_are_converted():
    x = np.random.default_rng(0).normal(size=(7, 3))
    J = chunkjac.compute(torch.sin, x)
    torch.testing.assert_close(J, torch.diag_embed(torch.cos(torch.from_numpy(x))), **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_low_precision_dtypes(dtype, mode):
    f = mlp(3, 8, 2)
    x = torch.randn(16, 3, dtype=torch.float64)
    ref = reference(f, x)
    J = chunkjac.compute(f.to(dtype), x.to(dtype), mode=mode)
    assert J.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    torch.testing.assert_close(J.double(), ref, rtol=tol, atol=tol)


def test_jacobian_takes_the_output_dtype():
    f = lambda x: torch.sin(x).double()  # noqa: E731
    J = chunkjac.compute(f, torch.randn(4, 3))
    assert J.dtype == torch.float64


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_create_graph_gradients_match_reference(mode):
    f = mlp(3, 8, 8, 2)
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    J = chunkjac.compute(f, x, create_graph=True, mode=mode)
    assert J.requires_grad
    params = list(f.parameters())
    ours = torch.autograd.grad((J ** 3).sum(), [x, *params], materialize_grads=True)
    ref = torch.autograd.grad((reference(f, x) ** 3).sum(), [x, *params], materialize_grads=True)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


def test_create_graph_through_shared_input():
    x = torch.linspace(-1, 1, 9, dtype=torch.float64)
    C = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    J = chunkjac.compute(lambda x, C: torch.sin(C * x), (x, C), in_dims=(0, None), wrt=1, create_graph=True)
    (g,) = torch.autograd.grad(J.sum(), C)
    torch.testing.assert_close(g, (-(x ** 2) * torch.sin(C * x)).sum().detach(), **TOL)


def test_create_graph_keeps_outputs_connected():
    f = mlp(2, 4, 1)
    x = torch.randn(5, 2, dtype=torch.float64)
    J, y = chunkjac.compute(f, x, create_graph=True, return_outputs=True)
    assert y.requires_grad and J.requires_grad
    (g,) = torch.autograd.grad(y.sum(), f[0].bias)
    (ref,) = torch.autograd.grad(f(x).sum(), f[0].bias)
    torch.testing.assert_close(g, ref, **TOL)


def test_output_independent_of_input_gives_zeros():
    m, args = _two_in_two_out()
    J0, J1 = chunkjac.compute(lambda x1, x2, m1, m2: torch.sin(x2), args, wrt=(0, 1))
    torch.testing.assert_close(J0, torch.zeros(11, 2, 3, dtype=torch.float64))
    torch.testing.assert_close(J1, torch.diag_embed(torch.cos(args[1])), **TOL)
    J = chunkjac.compute(lambda x: torch.ones(x.shape[0], 2, dtype=x.dtype), torch.randn(3, 4))
    assert J.shape == (3, 2, 4) and not J.any()


def test_inputs_are_left_untouched():
    x = torch.randn(6, 3, dtype=torch.float64)
    x0 = x.clone()
    chunkjac.compute(mlp(3, 4, 2), x)
    assert not x.requires_grad and x.grad is None
    torch.testing.assert_close(x, x0, rtol=0, atol=0)


class OldStyleSquare(torch.autograd.Function):
    """An autograd.Function without setup_context: torch.func's vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def test_vectorisation_falls_back_to_the_exact_loop():
    f = lambda x: OldStyleSquare.apply(x) @ torch.ones(3, 2, dtype=x.dtype)  # noqa: E731
    x = torch.randn(5, 3, dtype=torch.float64)
    J = chunkjac.compute(f, x, mode="reverse")
    ref = (2 * x)[:, None, :].expand(5, 2, 3)
    torch.testing.assert_close(J, ref, **TOL)


def _run_with(f, args, plan_changes, **kw):
    opts = dict(wrt=0, output=None, in_dims=0, mode="auto", coupling="independent", create_graph=False,
                return_outputs=False)
    opts.update(kw)
    spec = normalize(f, args, **opts)
    plan = dataclasses.replace(chunkjac.plan(f, args, **opts), **plan_changes)
    return execute(spec, plan)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 11])
def test_chunks_and_blocks_give_the_same_answer(mode, chunk_size):
    m, args = _two_in_two_out()
    ref = vmap(jacrev(lambda *a: m(*a)[0]))(*args)
    J, (o1, o2) = _run_with(m, args, dict(chunk_size=chunk_size, rows_per_vjp=2, cols_per_jvp=2),
                            output=0, mode=mode, return_outputs=True)
    torch.testing.assert_close(J, ref, **TOL)
    e1, e2 = m(*args)
    torch.testing.assert_close(o1, e1, **TOL)
    torch.testing.assert_close(o2, e2, **TOL)


def test_chunked_create_graph_stays_differentiable():
    f = mlp(3, 6, 2)
    x = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    J = _run_with(f, x, dict(chunk_size=3, rows_per_vjp=1), create_graph=True)
    ours = torch.autograd.grad((J ** 2).sum(), [x, f[0].weight])
    ref = torch.autograd.grad((reference(f, x) ** 2).sum(), [x, f[0].weight])
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


def test_probe_leaves_batchnorm_running_stats_alone():
    bn = nn.BatchNorm1d(3).double().eval()
    before = bn.running_mean.clone()
    bn.train()
    spec = normalize(bn, torch.randn(8, 3, dtype=torch.float64), wrt=0, output=None, in_dims=0, mode="auto",
                     coupling="independent", create_graph=False, return_outputs=False)
    probe(spec)
    torch.testing.assert_close(bn.running_mean, before, rtol=0, atol=0)


def test_works_inside_no_grad():
    f = mlp(3, 5, 2)
    x = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        for mode in MODES:
            torch.testing.assert_close(chunkjac.compute(f, x, mode=mode), reference(f, x), **TOL)


def test_inference_tensors_are_accepted_and_inference_mode_refused():
    with torch.inference_mode():
        x = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(chunkjac.compute(torch.sin, x), torch.diag_embed(torch.cos(x)), **TOL)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inside torch.inference_mode"):
        chunkjac.compute(torch.sin, x)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_samples_never_share_result_memory(mode):
    J = chunkjac.compute(lambda x: x + 1, torch.randn(9, 3, dtype=torch.float64), mode=mode)
    J[0].zero_()
    assert torch.equal(J[1], torch.eye(3, dtype=torch.float64))


def test_random_function_uses_one_draw():
    # dropout in training mode: forward mode would differentiate a new mask per column; auto must not.
    A = torch.randn(2, 6, dtype=torch.float64)
    f = lambda x: nn.functional.dropout(x @ A, p=0.3, training=True)  # noqa: E731
    x = torch.randn(400, 2, dtype=torch.float64)
    J, y = chunkjac.compute(f, x, return_outputs=True)
    kept = (y != 0).double() / 0.7  # the mask of the one draw, recovered from the outputs
    torch.testing.assert_close(J, kept[:, :, None] * A.T[None], **TOL)
    with pytest.raises(RuntimeError, match="draws random numbers"):
        chunkjac.compute(f, x, mode="forward")


def test_auto_falls_back_when_the_preferred_mode_cannot_run():
    W = torch.randn(1, 6, dtype=torch.float64)
    f = lambda x: OldStyleSquare.apply(x @ W)  # noqa: E731  n_in=1, n_out=6: forward preferred, cannot run
    x = torch.randn(5, 1, dtype=torch.float64)
    torch.testing.assert_close(chunkjac.compute(f, x), (2 * (x @ W) * W)[..., None], **TOL)


def test_functional_call_leaves_shared_submodules_intact():
    lin = nn.Linear(3, 3).double()
    seq = nn.Sequential(lin, nn.Tanh(), lin)
    chunkjac.compute(seq, torch.randn(4, 3, dtype=torch.float64), wrt="0.weight")
    assert isinstance(lin.weight, nn.Parameter) and lin.weight is seq[2].weight


def test_fn_using_torch_func_inside():
    m = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    u = lambda xi: m(xi).squeeze(-1)  # noqa: E731
    residual = lambda x: torch.cat([u(x)[:, None], vmap(torch.func.grad(u))(x)], -1)  # noqa: E731
    x = torch.randn(5, 2, dtype=torch.float64)
    ref = vmap(jacrev(lambda xi: torch.cat([u(xi)[None], torch.func.grad(u)(xi)], -1)))(x)
    torch.testing.assert_close(chunkjac.compute(residual, x), ref, **TOL)


def test_mixed_precision_cross_check_uses_the_working_precision():
    m32 = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    f = lambda x: m32(x).double()  # noqa: E731
    x = torch.randn(7, 3)
    J = chunkjac.compute(f, x, mode="forward")
    torch.testing.assert_close(J, vmap(jacrev(m32))(x).double(), rtol=1e-5, atol=1e-6)


def test_return_outputs_across_chunks_refuses_unbatched_tensors_up_front():
    f = lambda x, W: (torch.tanh(x @ W.T), W * 2)  # noqa: E731
    x, W = torch.randn(12, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    J, (y, W2) = chunkjac.compute(f, (x, W), in_dims=(0, None), output=0, return_outputs=True)
    torch.testing.assert_close(W2, W * 2)
    with pytest.raises(ValueError, match="without the batch in its leading dim"):
        chunkjac.compute(f, (x, W), in_dims=(0, None), output=0, return_outputs=True, chunk_size=5)
    J, (y, meta) = chunkjac.compute(lambda x: (torch.sin(x), "tag"), x, output=0, return_outputs=True,
                                    chunk_size=5)
    assert meta == "tag" and y.shape == (12, 3)
