"""Bad input gets a clear error that names the argument, what was expected and got, and the remedy."""
import pytest
import torch
from torch import nn

import chunkjac

x = torch.randn(4, 3)
lin = nn.Linear(3, 2)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(wrt=2), ValueError, r"wrt=2 is out of range: fn gets 1 positional input\(s\) \(valid: -1..0\)"),
    (dict(wrt="nope"), TypeError, r"wrt='nope' names a parameter, but fn is a builtin_function_or_method"),
    (dict(wrt=()), ValueError, r"wrt is empty"),
    (dict(wrt=(0, 0)), ValueError, r"names the same tensor twice"),
    (dict(wrt=1.5), TypeError, r"wrt must be an input index"),
    (dict(in_dims=(0, 0)), ValueError, r"in_dims has 2 entries but inputs has 1"),
    (dict(in_dims=2), ValueError, r"in_dims\[0\]=2 is out of range for input 0 of shape \(4, 3\)"),
    (dict(in_dims=None), ValueError, r"no input is batched"),
    (dict(in_dims="0"), TypeError, r"in_dims must be an int, None or a tuple"),
    (dict(mode="fast"), ValueError, r"mode must be one of \('auto', 'reverse', 'forward'\), got 'fast'"),
        (dict(coupling="sometimes"), ValueError, r"coupling must be one of \('auto', 'independent', 'coupled', 'unsplittable'\)"),
        (dict(coupling=torch.zeros(4)), TypeError, r"group ids and edges must be integers"),
        (dict(coupling=torch.zeros(5, dtype=torch.long)), ValueError, r"coupling has 5 group ids but the batch has 4 samples"),
        (dict(coupling=torch.tensor([[0, 1], [2, 9]])), ValueError, r"edges between samples 0..9, but the batch has samples 0..3"),
        (dict(coupling=torch.zeros(3, 3, dtype=torch.long)), ValueError, r"expected \(4,\) group ids"),
        (dict(coupling=torch.eye(3).to_sparse()), ValueError, r"must be \(4, 4\)"),
        (dict(coupling=[[1], [0]]), ValueError, r"2 neighbour lists but the batch has 4 samples"),
        (dict(coupling=3.5), TypeError, r"coupling must be a string, a tensor of group ids"),
        (dict(max_seconds=-1), ValueError, r"max_seconds must be a positive number or None"),
    (dict(output=0), TypeError, r"output=0 selects from a tuple, list or dict, but fn returned a torch.float32"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        chunkjac.compute(torch.sin, x, **kwargs)


def test_batch_sizes_disagree():
    with pytest.raises(ValueError, match=r"disagree on the batch size \(input 0: 4, input 1: 5\)"):
        chunkjac.compute(lambda a, b: a, (x, torch.randn(5, 3)))


def test_in_dims_for_a_non_tensor():
    with pytest.raises(ValueError, match=r"in_dims\[1\]=0 but input 1 is float 2.0, not a tensor"):
        chunkjac.compute(lambda a, s: a * s, (x, 2.0), in_dims=(0, 0))


def test_zero_dim_input_cannot_be_batched():
    with pytest.raises(ValueError, match=r"input 1 is a 0-d tensor, which has no batch dim; use None"):
        chunkjac.compute(lambda a, s: a * s, (x, torch.tensor(2.0)), in_dims=(0, -1))


def test_empty_batch():
    with pytest.raises(ValueError, match="0 samples"):
        chunkjac.compute(torch.sin, torch.randn(0, 3))


def test_list_inputs_are_refused_with_the_fix():
    with pytest.raises(TypeError, match=r"got a list. Pass tuple\(inputs\)"):
        chunkjac.compute(torch.sin, [x])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_refused(dtype):
    with pytest.raises(TypeError, match="complex dtypes are not supported"):
        chunkjac.compute(torch.sin, torch.randn(4, 3, dtype=dtype))


def test_complex_output_refused():
    with pytest.raises(TypeError, match="only float16, bfloat16, float32 and float64 outputs"):
        chunkjac.compute(lambda a: a * 1j, x)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_wrt_refused_with_float_copy_advice(dtype):
    with pytest.raises(TypeError, match=r"pass a float copy \(e.g. x.double\(\)\)"):
        chunkjac.compute(lambda a: a * 2.0, torch.ones(4, 3, dtype=dtype))


def test_integer_inputs_outside_wrt_pass_through():
    idx = torch.tensor([0, 2, 1, 0])
    J = chunkjac.compute(lambda a, i: a.gather(1, i[:, None]) * 3.0, (x, idx))
    assert J.shape == (4, 1, 3)
    assert torch.equal(J[:, 0], 3.0 * nn.functional.one_hot(idx, 3).float())


@pytest.mark.parametrize("f, match", [
    (lambda a: a.sum(0), r"has shape \(3,\) for a batch of \d samples, but its leading dim must hold"),
    (lambda a: ((a - 1) ** 2).mean(), r"has shape \(\) for a batch of \d samples.*reduction='none'"),
    (lambda a: nn.functional.mse_loss(a, torch.zeros_like(a)), r"reduction='mean'"),
])
def test_outputs_without_a_batch_dim(f, match):
    with pytest.raises(ValueError, match=match):
        chunkjac.compute(f, x)


def test_non_tensor_output():
    with pytest.raises(TypeError, match="must be a tensor to differentiate, got float"):
        chunkjac.compute(lambda a: 1.0, x)


def test_tuple_output_needs_output_argument():
    with pytest.raises(ValueError, match=r"fn returned a tuple of 2; say which one to differentiate with output="):
        chunkjac.compute(lambda a: (a, a), x)


def test_output_selects_nothing():
    with pytest.raises(ValueError, match=r"output='z' selects nothing from fn's dict; valid: \['y'\]"):
        chunkjac.compute(lambda a: {"y": a}, x, output="z")


def test_unknown_parameter_name_lists_the_real_ones():
    with pytest.raises(ValueError, match=r"wrt='w' names no parameter or buffer of Linear \(it has: weight, bias\)"):
        chunkjac.compute(lin, x, wrt="w")


def test_closure_tensor_cannot_be_swapped():
    C = torch.tensor(-5.0, requires_grad=True)
    with pytest.raises(ValueError, match=r"(?s)neither one of fn's parameters.*in_dims=\(0, None\), wrt=1"):
        chunkjac.compute(lambda a: C * a, x, wrt=C)


def test_reverse_mode_on_shared_targets_is_per_sample_reverse_mode():
    # Not the sum trick (which would add the samples' contributions): each sample's own VJPs.
    assert chunkjac.plan(lin, x, wrt="weight", mode="reverse").strategy == "per_sample"
    torch.testing.assert_close(chunkjac.compute(lin, x, wrt="weight", mode="reverse"),
                               chunkjac.compute(lin, x, wrt="weight", mode="forward"))


def test_wrt_non_tensor_input():
    with pytest.raises(TypeError, match="wrt=1 names input 1, which is float 2.0, not a tensor"):
        chunkjac.compute(lambda a, s: a * s, (x, 2.0), wrt=1)


def test_not_callable():
    with pytest.raises(TypeError, match="fn must be a callable"):
        chunkjac.compute("model", x)


def test_output_shape_that_depends_on_the_batch_size():
    f = lambda a: a.repeat(1, a.shape[0])  # noqa: E731
    a = torch.randn(11, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="per-sample output shape changed"):
        chunkjac.compute(f, a, coupling="independent", chunk_size=4)
    # auto finds that chunks would change the output and runs the batch as one chunk, exactly.
    with pytest.warns(chunkjac.CouplingWarning, match="changes its per-sample shape"):
        J = chunkjac.compute(f, a)
    torch.testing.assert_close(J, torch.func.vmap(torch.func.jacrev(lambda r: r.repeat(11)))(a), rtol=0, atol=0)


def test_ambiguous_wrt_tensor():
    with pytest.raises(ValueError, match=r"wrt is the tensor passed as inputs \[0, 1\]; say which one"):
        chunkjac.compute(lambda a, b: a * b, (x, x), wrt=x)


def test_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size must be a positive int or None, got 0"):
        chunkjac.compute(torch.sin, x, chunk_size=0)


def test_bad_device():
    with pytest.raises(ValueError, match="device='gpu0' is not a device"):
        chunkjac.compute(torch.sin, x, device="gpu0")


def test_device_other_than_the_parameters():
    with pytest.raises(ValueError, match=r"fn's parameters are on cpu; move the model first"):
        chunkjac.compute(lin, x, device="meta")


# Errors that say what happened (issue 25, section 3) ----------------------------------------------

@pytest.mark.parametrize("api", [chunkjac.compute, chunkjac.plan, chunkjac.hessian, chunkjac.laplacian])
def test_a_misspelled_keyword_is_a_type_error_naming_the_closest(api):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'budegt'; did you mean 'budget'\?"):
        api(lin, x, budegt="1GB")


def test_a_plan_made_for_another_wrt_is_refused():
    m = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))  # two weights of 9 elements
    p = chunkjac.plan(m, x, wrt="0.weight")
    with pytest.raises(ValueError, match=r"plan= was made for parameter '0.weight'; this call differentiates "
                                         r"w.r.t. parameter '2.weight'"):
        chunkjac.compute(m, x, wrt="2.weight", plan=p)
    torch.testing.assert_close(chunkjac.compute(m, x, wrt="0.weight", plan=p), chunkjac.compute(m, x, wrt="0.weight"))


def test_warnings_point_at_the_users_line():
    attn = nn.MultiheadAttention(4, 1)
    with pytest.warns(chunkjac.CouplingWarning) as w:
        chunkjac.compute(lambda z: attn(z, z, z)[0], torch.randn(6, 1, 4))
    assert w[0].filename == __file__


def test_one_point_without_its_batch_dim_is_asked_about():
    with pytest.warns(chunkjac.CouplingWarning, match=r"input 0 has shape \(3,\).*add the batch dim: x.unsqueeze\(0\)"):
        chunkjac.compute(nn.Linear(3, 3), torch.rand(3))
    with pytest.raises(ValueError, match=r"input 0 has shape \(3,\).*add the batch dim: x.unsqueeze\(0\)"):
        chunkjac.compute(lin, torch.rand(3))


def test_an_out_tensor_whose_elements_share_memory_is_refused_before_any_work():
    out = torch.empty(1, 2, 3).expand(4, 2, 3)
    calls = []
    with pytest.raises(ValueError, match=r"out has elements that share memory"):
        chunkjac.compute(lambda z: calls.append(1) or lin(z), x, out=out)
    assert not calls


def test_a_route_without_a_derivative_points_at_the_route_that_has_one():
    # Flash attention on the CPU has no double backward: reverse over reverse cannot, Taylor mode can.
    enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0).eval()
    xs = torch.randn(6, 5, 8)
    with pytest.raises(RuntimeError, match=r"With mode='reverse' the route needs that derivative; mode='auto'"):
        chunkjac.laplacian(enc, xs, mode="reverse")
    assert chunkjac.laplacian(enc, xs).shape == (6, 5, 8)


def test_a_parameter_behind_no_grad_is_not_sent_to_forward_mode():
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3), nn.Linear(3, 2)

        def forward(self, z):
            with torch.no_grad():
                h = self.a(z)
            return self.b(torch.tanh(h) * z)

    m = Frozen()
    with pytest.raises(ValueError, match=r"disagree.*Pass mode='reverse' \(per-sample reverse mode\)"):
        chunkjac.compute(m, x, wrt="a.weight", mode="forward")
    assert chunkjac.compute(m, x, wrt="a.weight").abs().max() == 0  # no_grad: no derivative, as autograd says
