"""Projected per-sample gradients (compute(..., project=...)): every kind against Projection.apply of
the full per-sample gradients from vmap(grad(functional_call)) in float64; the same bits across chunk
sizes and resumes; a resume with another projection refused; tied, frozen and BatchNorm-eval models;
bad input."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import chunkjac

KINDS = ("rademacher", "gaussian", "kronecker")


class Loss(nn.Module):
    """A classifier's per-sample loss: what data attribution differentiates."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.net(x), y, reduction="none")


def classifier(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if bn else []) + [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).double()


def data(n=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, dtype=torch.float64, generator=g), torch.randint(0, 3, (n,), generator=g)


def close(a, b, rtol=1e-12):
    assert a.shape == b.shape, (a.shape, b.shape)
    assert (a - b).abs().max() <= rtol * b.abs().max(), (a - b).abs().max()


def reference(loss: Loss, x, y):
    """{name: (B, *shape)}: per-sample gradients of the trainable parameters by vmap(grad(functional_call))."""
    params = {k: v.detach() for k, v in loss.named_parameters() if v.requires_grad}
    buffers = {k: v for k, v in loss.named_buffers()}

    def one(p, xi, yi):
        return functional_call(loss, {**p, **buffers}, (xi[None], yi[None]))[0]

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_equals_its_apply_of_the_reference(kind):
    loss = Loss(classifier())
    x, y = data()
    p = chunkjac.Projection(12, seed=3, kind=kind)
    want = p.apply(reference(loss, x, y))
    got = {}
    for chunk in (7, 64):
        got[chunk] = chunkjac.compute(loss, (x, y), wrt="params", project=p, chunk_size=chunk)
        assert got[chunk].shape == (20, 12)
        assert (got[chunk] - want).abs().max() <= 1e-12 * want.abs().max()
    assert torch.equal(got[7], got[64])  # the same bits for every chunk size
    if kind != "kronecker":
        flat = torch.cat([g.reshape(20, -1) for g in reference(loss, x, y).values()], 1)
        close(p.apply(flat), want)


def test_projections_keep_inner_products_in_expectation():
    g = torch.randn(4, 300, dtype=torch.float64)
    exact = g @ g.T
    for kind in ("rademacher", "gaussian"):
        est = torch.stack([(lambda z: z @ z.T)(chunkjac.Projection(64, seed=s, kind=kind).apply(g)) for s in range(200)])
        assert ((est.mean(0) - exact).abs() <= 5 * est.std(0) / math.sqrt(200) + 1e-9).all()
    shapes = {"w": torch.randn(4, 10, 12, dtype=torch.float64), "b": torch.randn(4, 10, dtype=torch.float64)}
    flat = torch.cat([v.reshape(4, -1) for v in shapes.values()], 1)
    exact = flat @ flat.T
    est = torch.stack([(lambda z: z @ z.T)(chunkjac.Projection(40, seed=s, kind="kronecker").apply(shapes))
                       for s in range(200)])
    assert ((est.mean(0) - exact).abs() <= 5 * est.std(0) / math.sqrt(200) + 1e-9).all()


def test_jacobian_rows_frozen_parameters_and_batchnorm_eval():
    net = classifier(bn=True).eval()
    x, _ = data()
    p = chunkjac.Projection(9, kind="kronecker")
    rows = chunkjac.compute(net, x, wrt="params")            # {name: (B, 3, *shape)}
    close(chunkjac.compute(net, x, wrt="params", project=p), p.apply(rows, batch_dims=2))
    net[0].weight.requires_grad_(False)                      # frozen: not a target, not projected
    loss = Loss(net)
    xs, ys = data()
    ref = reference(loss, xs, ys)
    assert "net.0.weight" not in ref
    close(chunkjac.compute(loss, (xs, ys), wrt="params", project=p), p.apply(ref))


def test_tied_parameter_is_projected_once_with_its_total_gradient():
    torch.manual_seed(0)
    emb = nn.Linear(5, 5, bias=False).double()
    net = nn.Sequential(emb, nn.Tanh(), emb, nn.Tanh(), nn.Linear(5, 3).double())  # one weight used twice
    loss = Loss(net)
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    ref = reference(loss, x, y)
    assert len(ref) == 3
    p = chunkjac.Projection(8, kind="kronecker")
    close(chunkjac.compute(loss, (x, y), wrt="params", project=p), p.apply(ref))


class _Crash(Exception):
    pass


class CrashingLoss(Loss):
    """Loss that raises in the dump's fourth chunk (once its manifest exists: the planner's probes come
    before it), while ``crash`` is set."""

    def __init__(self, net, manifest):
        super().__init__(net)
        self.manifest, self.calls, self.crash = manifest, 0, True

    def forward(self, x, y):
        import os
        if self.crash and x.shape[0] == 8 and os.path.exists(self.manifest):
            self.calls += 1
            if self.calls == 4:
                raise _Crash
        return super().forward(x, y)


def test_float16_dump_resumes_and_refuses_another_projection(tmp_path, monkeypatch):
    from chunkjac import _manifest
    from chunkjac._sinks import NpySink
    monkeypatch.setattr(NpySink, "COMMIT_SECONDS", 0.0)  # list every chunk as soon as it is on disk
    out = str(tmp_path / "grads.npy")
    loss = CrashingLoss(classifier(), out + ".chunkjac.json")
    x, y = data(40)
    p = chunkjac.Projection(16, seed=2, kind="kronecker", dtype=torch.float16)
    with pytest.raises(_Crash):
        chunkjac.compute(loss, (x, y), wrt="params", project=p, out=out, chunk_size=8)
    assert sorted(_manifest.load(out)["done"]) == [0, 1, 2]
    loss.crash = False
    chunkjac.compute(loss, (x, y), wrt="params", project=p, out=out, chunk_size=8)
    arr = np.load(out)
    assert arr.dtype == np.float16 and arr.shape == (40, 16)
    whole = chunkjac.compute(loss, (x, y), wrt="params", project=p, chunk_size=8)  # uninterrupted, in memory
    assert np.array_equal(arr, whole.numpy())  # the same bits after the resume
    want = p.apply(reference(loss, x, y))
    assert want.dtype == torch.float16
    close(torch.from_numpy(arr).double(), want.double(), 1e-3)
    with pytest.raises(ValueError, match="different call"):
        chunkjac.compute(loss, (x, y), wrt="params", project=chunkjac.Projection(16, seed=3, kind="kronecker",
                                                                                 dtype=torch.float16), out=out)


@pytest.mark.parametrize("make, match", [
    (lambda: chunkjac.Projection(0), "dim must be a positive int"),
    (lambda: chunkjac.Projection(8, kind="sparse"), "kind must be one of"),
    (lambda: chunkjac.Projection(8, seed=-1), "seed must be a non-negative int"),
    (lambda: chunkjac.Projection(8, dtype=torch.int8), "dtype must be a float dtype"),
    (lambda: chunkjac.Projection(1, kind="kronecker").apply({"w": torch.zeros(2, 3, 4), "b": torch.zeros(2, 3)}),
     "cannot give each of its 2 groups"),
    (lambda: chunkjac.Projection(4, kind="kronecker").apply(torch.zeros(2, 10)), "needs the parameters' shapes"),
    (lambda: chunkjac.compute(Loss(classifier()), data(), wrt="params", project="4096"), "project must be"),
    (lambda: chunkjac.compute(Loss(classifier()), data(), wrt="params", project=8, flat=True), "drop flat=True"),
])
def test_bad_projections_are_refused_by_name(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


FACTORY = '''
import torch
from torch import nn

class Loss(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.net(x), y, reduction="none")

def make():
    return Loss()
'''


def test_cli_dump_one_process_and_two_give_the_same_bytes(tmp_path):
    """chunkjac dump --wrt params --project: the same file from one process and from two (torchrun)."""
    import os
    import subprocess
    import sys
    (tmp_path / "model.py").write_text(FACTORY)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.standard_normal((2000, 6)).astype(np.float32))
    np.save(tmp_path / "y.npy", rng.integers(0, 3, 2000))
    files = {}
    for procs in (1, 2):
        out = tmp_path / f"g{procs}.npy"
        cmd = ["-m", "chunkjac", "dump", f"{tmp_path}/model.py:make", f"{tmp_path}/x.npy", f"{tmp_path}/y.npy",
               str(out), "--wrt", "params", "--project", "16", "--seed", "1", "--projection", "kronecker",
               "--project-dtype", "float16", "--chunk-size", "250", "--quiet"]
        if procs > 1:
            cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}", *cmd]
        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
        files[procs] = np.load(out)
    assert files[1].shape == (2000, 16) and files[1].dtype == np.float16
    assert files[1].tobytes() == files[2].tobytes()
    import importlib.util
    spec = importlib.util.spec_from_file_location("model_projection", tmp_path / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    loss = mod.make()
    x = torch.from_numpy(np.load(tmp_path / "x.npy"))
    y = torch.from_numpy(np.load(tmp_path / "y.npy"))
    want = chunkjac.Projection(16, seed=1, kind="kronecker").apply(
        chunkjac.compute(loss, (x, y), wrt="params"))
    np.testing.assert_allclose(files[1].astype(np.float32), want.numpy(), rtol=1e-2, atol=1e-3)


def test_a_matrix_larger_than_the_budget_is_made_by_blocks_with_the_same_result():
    """Dense projection whose matrix would not fit the budget: made again by row blocks every chunk."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 60), nn.Tanh(), nn.Linear(60, 3)).double()   # 2,643 parameters
    loss = Loss(net)
    x, y = torch.randn(30, 40, dtype=torch.float64), torch.randint(0, 3, (30,))
    p = chunkjac.Projection(256, seed=4)                                            # 5.4 MB in float64
    small = chunkjac.plan(loss, (x, y), wrt="params", project=p, budget=4_000_000)
    assert small.held_bytes == 0
    got = chunkjac.compute(loss, (x, y), wrt="params", project=p, budget=4_000_000)
    close(got, p.apply(reference(loss, x, y)))
    assert chunkjac.plan(loss, (x, y), wrt="params", project=p, budget="1GB").held_bytes > 0
