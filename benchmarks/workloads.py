"""The benchmark suite's workloads: for each, the inputs, chunkjac's call, the peers users write
instead (../ANCHORS in the project's history: the methods each issue named) and the ideal.

``build(name, n, device)`` returns a Workload: ``methods`` (name -> a call returning the result),
``check(result, method)`` (the largest relative error on the first samples against an independent
reference) and ``samples``. Each method runs in its own process (see run.py), so building here is
cheap and nothing is shared between methods.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, vmap

import chunkjac

CHECK = 64  # samples compared with the reference


@dataclass
class Workload:
    samples: int
    methods: dict[str, Callable]
    reference: Callable  # () -> the reference result on the first CHECK samples
    slice: Callable = field(default=lambda r: r[:CHECK])  # a method's result -> its first CHECK samples
    extrapolated: dict = field(default_factory=dict)  # method -> how many samples it runs (scaled to n)


def mlp(*w, act=nn.Tanh):
    layers = []
    for a, b in zip(w[:-1], w[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers[:-1])


def _frozen(m: nn.Module, device) -> nn.Module:
    torch.manual_seed(0)
    return m.to(device).requires_grad_(False)


# -- what users write -------------------------------------------------------------------------------
def dims_loop(f, x):
    """Seed 002's answer: one backward per output dim, the sum trick over the batch."""
    xr = x.detach().requires_grad_(True)
    y = f(xr).reshape(len(x), -1)
    cols = [torch.autograd.grad(y[:, o].sum(), xr, retain_graph=o < y.shape[1] - 1)[0] for o in range(y.shape[1])]
    return torch.stack(cols, 1)


def batched_sum_trick(f, x):
    """All output dims in one is_grads_batched VJP (the forum's eye-cotangent answer, per sample)."""
    xr = x.detach().requires_grad_(True)
    y = f(xr)
    k = y[0].numel()
    eye = torch.eye(k, dtype=y.dtype, device=y.device).reshape(k, 1, *y.shape[1:]).expand(k, *y.shape)
    (g,) = torch.autograd.grad(y, xr, eye, is_grads_batched=True)
    return g.movedim(0, 1)


def ideal(f, x):
    """The limit: one forward and k = min(in, out) batched products over all samples, no chunking
    (reverse: one is_grads_batched VJP of k rows; forward: k JVP columns in one vmapped jvp)."""
    with torch.no_grad():
        y0 = f(x[:1])
    n_in, n_out = x[0].numel(), y0[0].numel()
    if n_out <= n_in:
        return batched_sum_trick(f, x)
    basis = torch.eye(n_in, dtype=x.dtype, device=x.device).reshape(n_in, 1, *x.shape[1:]).expand(n_in, *x.shape)
    cols = vmap(lambda t: torch.func.jvp(f, (x,), (t,))[1])(basis)
    return cols.movedim(0, -1).reshape(len(x), *y0.shape[1:], *x.shape[1:])


def sample_loop(f, x, n=200):
    return torch.stack([jacrev(f)(x[i]) for i in range(min(n, len(x)))])


# -- the workloads --------------------------------------------------------------------------------
def _first_order(f, x, budget=None, peers=("vmap(jacrev)", "dims loop", "is_grads_batched sum trick", "ideal"),
                 loop=True):
    ref = lambda: vmap(jacrev(f))(x[:CHECK])  # noqa: E731
    methods = {"chunkjac": lambda: chunkjac.compute(f, x, budget=budget)}
    table = {"vmap(jacrev)": lambda: vmap(jacrev(f))(x), "vmap(jacfwd)": lambda: vmap(jacfwd(f))(x),
             "dims loop": lambda: dims_loop(f, x), "is_grads_batched sum trick": lambda: batched_sum_trick(f, x),
             "ideal": lambda: ideal(f, x)}
    methods.update({p: table[p] for p in peers})
    extra = {}
    if loop:
        methods["sample loop"] = lambda: sample_loop(f, x)
        extra["sample loop"] = min(200, len(x))
    return Workload(len(x), methods, ref, extrapolated=extra)


def _seed000(n, device):
    x, C = torch.arange(n, device=device), torch.tensor(-5.0, device=device)
    f = lambda x, C: C * x  # noqa: E731

    def dual():
        import torch.autograd.forward_ad as fwAD
        with fwAD.dual_level():
            return fwAD.unpack_dual(f(x, fwAD.make_dual(C, torch.ones_like(C)))).tangent

    return Workload(n, {
        "chunkjac": lambda: chunkjac.compute(f, (x, C), in_dims=(0, None), wrt=1),
        "vmap(jacfwd)": lambda: vmap(jacfwd(f, argnums=1), in_dims=(0, None))(x, C),
        "forward dual": dual,
        "vmap(jacrev)": lambda: vmap(jacrev(f, argnums=1), in_dims=(0, None))(x, C),
    }, lambda: x[:CHECK].float())


def _attention(n, device, groups):
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(3, 1, batch_first=False).to(device).requires_grad_(False)
    x = torch.randn(n, 1, 3, device=device)
    ids = torch.arange(n, device=device) // groups if groups else None
    if groups:
        def f(x):  # attention within each group of `groups` consecutive samples
            z = x.reshape(n // groups, groups, 3).transpose(0, 1)
            return attn(z, z, z)[0].transpose(0, 1).reshape(n, 1, 3)
    else:
        f = lambda x: attn(x, x, x)[0]  # noqa: E731

    def row_loop():  # the exact black-box floor: one autograd.grad per (sample, output element)
        xr = x.detach().requires_grad_(True)
        y = f(xr)
        out = torch.empty(n, 1, 3, 1, 3, device=device)
        for i in range(n):
            for r in range(3):
                (g,) = torch.autograd.grad(y[i, 0, r], xr, retain_graph=True)
                out[i, 0, r] = g[i]
        return out

    def reference():
        full = torch.autograd.functional.jacobian(f, x)  # (n, 1, 3, n, 1, 3): its diagonal blocks
        return torch.stack([full[i, :, :, i] for i in range(CHECK)])

    coupling = ids if groups else "coupled"
    return Workload(n, {"chunkjac": lambda: chunkjac.compute(f, x, coupling=coupling),
                        "row loop": row_loop}, reference)


def _second(n, device, part):
    torch.manual_seed(0)
    u = _frozen(mlp(3, 128, 128, 128, 3), device)
    x = torch.rand(n, 3, device=device)

    def chunked_hessian(chunk=8192):
        parts = []
        for i in range(0, n, chunk):
            h = vmap(hessian(u))(x[i:i + chunk])
            parts.append(h.diagonal(dim1=-2, dim2=-1).sum(-1) if part == "laplacian" else h)
        return torch.cat(parts)

    def grad_of_grad():  # seed 002's loop: the second derivative of each output by each input, summed
        xr = x.detach().requires_grad_(True)
        y = u(xr)
        lap = torch.zeros(n, 3, device=device)
        for o in range(3):
            (g,) = torch.autograd.grad(y[:, o].sum(), xr, create_graph=True)
            for k in range(3):
                (h,) = torch.autograd.grad(g[:, k].sum(), xr, retain_graph=True)
                lap[:, o] += h[:, k]
        return lap

    methods = {"chunkjac": lambda: chunkjac.hessian(u, x, part=part, budget="1GB"),
               "chunked vmap(hessian)": chunked_hessian}
    if part == "laplacian":
        methods["seed 002 grad-of-grad loop"] = grad_of_grad
    ref = lambda: (lambda h: h.diagonal(dim1=-2, dim2=-1).sum(-1) if part == "laplacian" else h)(  # noqa: E731
        vmap(hessian(u))(x[:CHECK]))
    return Workload(n, methods, ref)


class ConvNet(nn.Module):
    """A small conv net on 3x32x32 images (two conv layers and a linear one), 10 outputs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.fc = nn.Linear(32 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


def _params(n, device):
    torch.manual_seed(0)
    model = ConvNet().to(device)
    x = torch.randn(n, 3, 32, 32, device=device)
    params = {k: v.detach() for k, v in model.named_parameters()}
    one = lambda p, xi: functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)  # noqa: E731
    return Workload(n, {"chunkjac": lambda: chunkjac.compute(model, x, wrt="params"),
                        "vmap(jacrev(functional_call))": lambda: vmap(jacrev(one), in_dims=(None, 0))(params, x)},
                    lambda: vmap(jacrev(one), in_dims=(None, 0))(params, x[:CHECK]),
                    slice=lambda r: {k: v[:CHECK] for k, v in r.items()})


def _grads(n, device):
    torch.manual_seed(0)
    model = mlp(784, 256, 10, act=nn.ReLU).to(device)
    x, t = torch.randn(n, 784, device=device), torch.randint(0, 10, (n,), device=device)
    params = {k: v.detach() for k, v in model.named_parameters()}

    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x, t):
            return nn.functional.cross_entropy(self.model(x), t, reduction="none")

    loss = Loss()
    one = lambda p, xi, ti: nn.functional.cross_entropy(functional_call(model, p, (xi[None],)), ti[None])  # noqa
    methods = {"chunkjac": lambda: {k.removeprefix("model."): v for k, v in
                                    chunkjac.compute(loss, (x, t), wrt="params").items()},
               "vmap(grad(functional_call))": lambda: vmap(grad(one), in_dims=(None, 0, 0))(params, x, t)}
    try:
        from opacus import GradSampleModule
        import warnings
        warnings.filterwarnings("ignore", message="Full backward hook")
        gsm = GradSampleModule(mlp(784, 256, 10, act=nn.ReLU).to(device), loss_reduction="sum")
        gsm._module.load_state_dict(model.state_dict())

        def opacus():
            for p in gsm.parameters():
                p.grad_sample = None
            nn.functional.cross_entropy(gsm(x), t, reduction="sum").backward()
            return {k.removeprefix("_module."): p.grad_sample for k, p in gsm.named_parameters()}

        methods["Opacus GradSampleModule"] = opacus
    except ImportError:
        pass
    return Workload(n, methods, lambda: vmap(grad(one), in_dims=(None, 0, 0))(params, x[:CHECK], t[:CHECK]),
                    slice=lambda r: {k: v[:CHECK] for k, v in r.items()})


DUMP_FACTORY = '''
import torch
from torch import nn
def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256),
                         nn.Tanh(), nn.Linear(256, 3))
'''


def _dump_methods(before: list, after: list, read):
    """(straight, killed_and_resumed): ``[*before, out, *after]`` run to the end, and SIGKILLed once half
    its chunks are on disk then run again; each returns ``read(out)``, the file's first samples."""

    def clean(out):
        for p in (out, out + ".chunkjac.json"):
            if os.path.exists(p):
                os.unlink(p)

    def straight(out):
        clean(out)
        subprocess.run([*before, out, *after], check=True, capture_output=True)
        return read(out)

    def killed_and_resumed(out):
        import json
        clean(out)
        p = subprocess.Popen([*before, out, *after], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while p.poll() is None:
            try:
                m = json.load(open(out + ".chunkjac.json"))
                if len(m["done"]) >= len(m["chunks"]) // 2:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait()
        subprocess.run([*before, out, *after], check=True, capture_output=True)
        return read(out)

    return straight, killed_and_resumed


def _named(run, folder) -> dict:
    straight, killed = run
    return {"chunkjac dump": lambda: straight(f"{folder}/a.npy"),
            "chunkjac dump, SIGKILL at half, resumed": lambda: killed(f"{folder}/b.npy")}


def _dump(n, device):
    """A dump to disk, uninterrupted, and the same dump SIGKILLed halfway and resumed (both end
    with the same file: the result is the file's first samples)."""
    folder = tempfile.mkdtemp(prefix="chunkjac-bench-dump-")
    with open(os.path.join(folder, "model.py"), "w") as f:
        f.write(DUMP_FACTORY)
    x = np.random.default_rng(0).random((n, 3), dtype=np.float32)
    np.save(os.path.join(folder, "x.npy"), x)
    exe = [sys.executable, "-m", "chunkjac", "dump", f"{folder}/model.py:make", f"{folder}/x.npy"]
    dev = ["--device", str(device)] if str(device) != "cpu" else []

    run = _dump_methods(exe, ["--budget", "8MB", "--quiet", *dev],
                        lambda out: torch.from_numpy(np.load(out, mmap_mode="r")[:CHECK].copy()))

    torch.manual_seed(0)  # the factory's model
    model = nn.Sequential(nn.Linear(3, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256),
                          nn.Tanh(), nn.Linear(256, 3))
    return Workload(n, _named(run, folder), lambda: vmap(jacrev(model))(torch.from_numpy(x[:CHECK])),
                    slice=lambda r: r)


PROJECTED_FACTORY = '''
import torch
from torch import nn

class Loss(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x, y):
        return nn.functional.cross_entropy(self.net(x), y, reduction="none")

def make():
    return Loss()
'''


def _projected_dump(n, device):
    """Issue 28's dump: per-sample cross-entropy gradients of an MLP 784 -> 256 -> 10, Kronecker-projected
    to 4,096 float16 numbers (8.2 GB at 10^6 samples), uninterrupted and SIGKILLed halfway then resumed."""
    folder = tempfile.mkdtemp(prefix="chunkjac-bench-projected-")
    with open(os.path.join(folder, "model.py"), "w") as f:
        f.write(PROJECTED_FACTORY)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 784), dtype=np.float32)
    y = rng.integers(0, 10, n)
    np.save(os.path.join(folder, "x.npy"), x)
    np.save(os.path.join(folder, "y.npy"), y)
    exe = [sys.executable, "-m", "chunkjac", "dump", f"{folder}/model.py:make", f"{folder}/x.npy", f"{folder}/y.npy"]
    opts = ["--wrt", "params", "--project", "4096", "--projection", "kronecker", "--project-dtype", "float16",
            "--budget", "1GB", "--quiet"] + (["--device", str(device)] if str(device) != "cpu" else [])

    def read(out):
        r = torch.from_numpy(np.load(out, mmap_mode="r")[:CHECK].astype(np.float32))
        for p in (out, out + ".chunkjac.json"):  # 8.2 GB each: not kept
            os.unlink(p)
        return r

    run = _dump_methods(exe, opts, read)

    def reference():
        import importlib.util
        import chunkjac
        spec = importlib.util.spec_from_file_location("projected_factory", f"{folder}/model.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        g = chunkjac.compute(mod.make(), (torch.from_numpy(x[:CHECK]), torch.from_numpy(y[:CHECK])), wrt="params")
        return chunkjac.Projection(4096, kind="kronecker").apply(g)

    return Workload(n, _named(run, folder), reference, slice=lambda r: r)


def build(name: str, n: int, device: torch.device) -> Workload:
    kind = name.split(":")[0]
    if kind == "seed000":
        return _seed000(n, device)
    if kind == "seed001_sin":
        return _first_order(torch.sin, torch.randn(n, 3, device=device))
    if kind == "seed002_seq":
        f = _frozen(nn.Sequential(nn.Linear(5, 2), nn.Sigmoid(), nn.Linear(2, 10)), device)
        return _first_order(f, torch.randn(n, 5, device=device))
    if kind == "pinn":
        return _first_order(_frozen(mlp(3, 128, 128, 128, 3), device), torch.rand(n, 3, device=device),
                            peers=("vmap(jacrev)", "dims loop", "vmap(jacfwd)", "ideal"))
    if kind == "mlp784":
        return _first_order(_frozen(mlp(784, 256, 10, act=nn.ReLU), device), torch.randn(n, 784, device=device),
                            peers=("vmap(jacrev)", "dims loop", "is_grads_batched sum trick", "ideal"))
    if kind == "pinn256_1GB":
        return _first_order(_frozen(mlp(3, 256, 256, 256, 3), device), torch.rand(n, 3, device=device), budget="1GB",
                            peers=("vmap(jacrev)", "dims loop"), loop=False)
    if kind == "scaling":
        return _first_order(_frozen(mlp(3, 128, 128, 128, 3), device), torch.rand(n, 3, device=device), budget="1GB",
                            peers=("vmap(jacrev)", "dims loop"), loop=False)
    if kind == "attention_coupled":
        return _attention(n, device, 0)
    if kind == "attention_groups32":
        return _attention(n, device, 32)
    if kind in ("laplacian", "hessian"):
        return _second(n, device, "laplacian" if kind == "laplacian" else "full")
    if kind == "params_conv":
        return _params(n, device)
    if kind == "grads_ce":
        return _grads(n, device)
    if kind == "dump_resume":
        return _dump(n, device)
    if kind == "projected_dump":
        return _projected_dump(n, device)
    raise KeyError(name)


def relative_error(got, ref) -> float:
    if isinstance(ref, dict):
        return max(relative_error(got[k], ref[k]) for k in ref)
    got, ref = got.detach().float().cpu(), ref.detach().float().cpu().reshape(got.shape)
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item() if ref.numel() else 0.0

