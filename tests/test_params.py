"""Per-sample Jacobians w.r.t. parameters (wrt="params", lists of names): against torch.func's
vmap(jacrev(functional_call)), in float64, for both strategies."""
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

import chunkjac


def reference(model, x, names=None, output=None):
    params = {k: v.detach() for k, v in model.named_parameters() if names is None or k in names}
    buffers = {k: v for k, v in model.named_buffers()}

    def one(p, xi):
        out = functional_call(model, {**p, **buffers}, (xi.unsqueeze(0),))
        out = out if output is None else out[output]
        return out[0]

    return vmap(jacrev(one), in_dims=(None, 0))(params, x)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.tanh(self.bn(self.c2(h)))
        return self.fc(h.flatten(1))


class Tied(nn.Module):
    """One weight used twice (an encoder and its transpose): the Jacobian is the total derivative."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(6, 3)
        self.dec = nn.Linear(3, 6)
        self.dec.weight = nn.Parameter(self.enc.weight.T.detach().clone())
        self.share = self.enc  # the same module under a second name

    def forward(self, x):
        return torch.tanh(self.share(x)) @ self.enc.weight + self.dec.bias


MODELS = {
    "mlp": (lambda: nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)), (40, 6)),
    "conv": (lambda: ConvNet().eval(), (12, 3, 7, 7)),
    "tied": (Tied, (30, 6)),
}


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("name", list(MODELS))
def test_params_dict_matches_vmap_jacrev(name, mode):
    torch.manual_seed(0)
    make, shape = MODELS[name]
    model = make().double()
    x = torch.randn(*shape, dtype=torch.double)
    got = chunkjac.compute(model, x, wrt="params", mode=mode, chunk_size=16)
    ref = reference(model, x)
    assert list(got) == [k for k, p in model.named_parameters() if p.requires_grad]
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], msg=f"{name} {mode} {k}")
    flat = chunkjac.compute(model, x, wrt="params", flat=True, mode=mode)
    torch.testing.assert_close(flat, torch.cat([ref[k].reshape(*ref[k].shape[:2], -1) for k in ref], -1))


def test_lists_of_names_and_parameters_give_dicts_tuples_give_tuples():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(25, 5, dtype=torch.double)
    ref = reference(model, x)
    d = chunkjac.compute(model, x, wrt=["2.weight", model[0].bias, 0])
    assert list(d) == ["2.weight", "0.bias", 0]
    torch.testing.assert_close(d["2.weight"], ref["2.weight"])
    torch.testing.assert_close(d["0.bias"], ref["0.bias"])
    torch.testing.assert_close(d[0], vmap(jacrev(lambda xi: model(xi[None])[0]))(x))
    t = chunkjac.compute(model, x, wrt=("2.weight", 0))
    assert isinstance(t, tuple) and len(t) == 2


def test_per_sample_gradients_of_a_loss_match_vmap_grad():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4)).double()
    x = torch.randn(64, 10, dtype=torch.double)
    target = torch.randint(0, 4, (64,))

    class Loss(nn.Module):  # one loss per sample; the model's parameters are the loss module's
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, xb, tb):
            return nn.functional.cross_entropy(self.model(xb), tb, reduction="none")

    got = chunkjac.compute(Loss(model), (x, target), wrt=list(model.parameters()))
    got = {k.removeprefix("model."): v for k, v in got.items()}
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, ti):
        return nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), ti[None])

    ref = vmap(grad(one), in_dims=(None, 0, 0))(params, x, target)
    assert list(got) == list(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k])


def test_several_outputs_and_create_graph():
    torch.manual_seed(3)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 6)

        def forward(self, x):
            h = self.lin(x)
            return torch.sin(h[:, :3]), h[:, 3:] ** 2

    model = Two().double()
    x = torch.randn(20, 4, dtype=torch.double)
    got = chunkjac.compute(model, x, wrt="params", output=1, create_graph=True)
    ref = reference(model, x, output=1)
    for k in ref:
        torch.testing.assert_close(got[k].detach(), ref[k])
    # Differentiable: a penalty on the Jacobians has the gradient torch.func's recipe gives.
    ours = torch.autograd.grad(sum(j.pow(2).sum() for j in got.values()), list(model.parameters()))
    params = dict(model.named_parameters())
    rec = vmap(jacrev(lambda p, xi: functional_call(model, p, (xi[None],))[1][0]), in_dims=(None, 0))(params, x)
    theirs = torch.autograd.grad(sum(j.pow(2).sum() for j in rec.values()), list(model.parameters()))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_batchnorm_in_training_is_coupled_exact_or_refused():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    x = torch.randn(6, 3, dtype=torch.double)
    with pytest.warns(chunkjac.CouplingWarning):
        got = chunkjac.compute(model, x, wrt=["2.weight"], max_seconds=None)
    # The exact per-sample derivative of y_i w.r.t. the shared weight, batch statistics included.
    full = torch.autograd.functional.jacobian(lambda w: torch.func.functional_call(model, {"2.weight": w}, (x,)),
                                              model[2].weight.detach())
    torch.testing.assert_close(got["2.weight"], full)


def test_out_dict_folder_dump_and_resume(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(300, 6, dtype=torch.double)
    ref = reference(model, x)
    outs = {k: torch.empty_like(v) for k, v in ref.items()}
    chunkjac.compute(model, x, wrt="params", out=outs)
    for k in ref:
        torch.testing.assert_close(outs[k], ref[k])
    folder = str(tmp_path / "jac")
    got = chunkjac.compute(model, x, wrt="params", out=folder + "/", chunk_size=64)
    for k in ref:
        torch.testing.assert_close(torch.from_numpy(np.load(f"{folder}/{k}.npy")), ref[k])
        torch.testing.assert_close(got[k], ref[k])
    again = chunkjac.compute(model, x, wrt="params", out=folder, chunk_size=64)  # complete: nothing to do
    torch.testing.assert_close(again["0.weight"], ref["0.weight"])
    with pytest.raises(ValueError, match="different call"):
        chunkjac.compute(model, x * 2, wrt="params", out=folder, chunk_size=64)
    with pytest.raises(ValueError, match="names a .npy file"):
        chunkjac.compute(model, x, wrt="params", out=str(tmp_path / "j.npy"))
    with pytest.raises(ValueError, match="flat=True with out="):
        chunkjac.compute(model, x, wrt="params", flat=True, out=folder)


def test_params_errors():
    x = torch.randn(5, 3)
    with pytest.raises(TypeError, match="wrt='params' names the parameters of an nn.Module"):
        chunkjac.compute(lambda z: z * 2, x, wrt="params")
    with pytest.raises(ValueError, match="no trainable parameters"):
        chunkjac.compute(nn.Linear(3, 2).requires_grad_(False), x, wrt="params")
    with pytest.raises(ValueError, match="flat=True concatenates"):
        chunkjac.compute(nn.Linear(3, 2), x, flat=True)


def test_a_result_larger_than_the_budget_is_one_chunk_in_memory_and_chunks_on_disk(tmp_path):
    # Per-sample parameter Jacobians are mostly result (here 134 kB a sample against a few bytes of work): on
    # the CPU the budget does not count the result in memory, and one chunk's Jacobians are returned
    # as the result without a copy, so the planner keeps the batch whole; a dump must count them.
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(100, 40), nn.Tanh(), nn.Linear(40, 4)).double()
    x = torch.randn(2000, 100, dtype=torch.double)
    result = 2000 * 4 * (100 * 40 + 40 + 40 * 4 + 4) * 8
    p = chunkjac.plan(model, x, wrt="params", budget="100MB")
    assert p.num_chunks == 1 and p.result_bytes == result and "the result's" in str(p)
    J = chunkjac.compute(model, x, wrt="params", budget="100MB")
    ref = reference(model, x[:50])
    for k in ref:
        torch.testing.assert_close(J[k][:50], ref[k])
    chunkjac.compute(model, x, wrt="params", budget="100MB", out=str(tmp_path / "d"))
    m = json.load(open(tmp_path / "d" / "jacobians.chunkjac.json"))
    assert len(m["chunks"]) > 1  # on disk the chunk's Jacobians are memory the budget must hold
    for k in ref:
        torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "d" / f"{k}.npy"))[:50], ref[k])


def test_coupled_parameter_jacobians_through_batchnorm_are_not_refused_for_rounding():
    # BatchNorm in training removes the conv's bias: its Jacobian is zero, and the forward-mode check
    # compared two rounding residues (u.Jv = -2.5e-17 against J^T u.v = -5.0e-16) and refused.
    import copy
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 2)).double()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    J = chunkjac.compute(m, x, wrt="params", coupling="coupled")
    names = [k for k, _ in m.named_parameters()]
    ref_m = copy.deepcopy(m)
    full = torch.autograd.functional.jacobian(lambda *ps: functional_call(ref_m, dict(zip(names, ps)), (x,)),
                                              tuple(p.detach() for p in m.parameters()))
    for k, r in zip(names, full):
        torch.testing.assert_close(J[k], r, rtol=1e-9, atol=1e-12)
    assert J["0.bias"].abs().max() < 1e-12  # zero: the batch's mean takes the bias away
