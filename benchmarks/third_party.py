"""chunkjac on real third-party models, randomly initialised, called as a new user would call it.

Each case runs in its own subprocess (crash-safe, 120 s timeout), or with --one-process all of them in one
interpreter, chunkjac's remembered decisions kept from case to case (a new interpreter after a crash), and
is compared with an independent
float64 reference: ``vmap(jacrev(...))`` per sample where samples are independent, else the diagonal
blocks of ``torch.autograd.functional.jacobian`` of the whole batch, or a loop. Outcomes:

    exact      matches the reference (relative error within the tolerance of the dtype)
    refused    raised an exception whose message starts with "chunkjac:"
    fn_error   fn's own exception (its class kept), with chunkjac's note naming the chunk (PEP 678)
    raw_error  another exception escaped chunkjac.compute
    wrong      returned a result of the wrong shape or values
    crash      the process died (signal, e.g. a segfault) or exited without a record
    hang       no answer within the timeout
    skipped    an optional package (torch_geometric, torchdiffeq, e3nn, opacus) is missing
    (setup_error / no_reference: the case itself or its reference failed; a bug in this script)

The "expect" column is what a user would want: exact, refused (a chunkjac error that says what to do), or
error (refused, or the model's own error passed through); "ok" marks the cases that behave so.
CouplingWarnings and other chunkjac warnings are shown after "warned".

    python benchmarks/third_party.py [--filter SUBSTRING] [--timeout 120] [--json results.json] [--one-process]
    python benchmarks/third_party.py --list

Optional packages (pure Python, install without touching torch):
    pip install --no-deps torch_geometric xxhash torchdiffeq e3nn opt-einsum opt-einsum-fx opacus
torchvision's PyPI wheel is built for another torch, so the vision models here are small equivalents
(a ResNet-like CNN with BatchNorm, a tiny ViT on nn.TransformerEncoder).
"""
import argparse
import copy
import json
import math
import os
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CASES = {}  # name: (builder, expect, what)


def case(expect="exact", what=""):
    def register(f):
        CASES[f.__name__[2:]] = (f, expect, what or (f.__doc__ or "").strip().splitlines()[0])
        return f
    return register


class Skip(Exception):
    pass


def need(module):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise Skip(f"{module} not installed ({e})") from None


class Trial:
    """call(): what the user runs; ref(): the float64 reference J (or None: check shape only)."""

    def __init__(self, call, ref=None, tol=1e-9, shape=None, note="", check=None):
        self.call, self.ref, self.tol, self.shape, self.note, self.check = call, ref, tol, shape, note, check


F32_TOL, F64_TOL = 2e-4, 1e-8


# ----------------------------------------------------------------------------------------------------
# references


def ref_vmap(g, x, *shared):
    """vmap(jacrev) of the per-sample function g(x_i, *shared) (x_i without the batch dim)."""
    from torch.func import jacrev, vmap
    return vmap(jacrev(g), in_dims=(0,) + (None,) * len(shared))(x, *shared)


def ref_diag(f, x):
    """Diagonal blocks of the full Jacobian of the whole batch f(x): (B, *out, *in)."""
    import torch
    full = torch.autograd.functional.jacobian(f, x)  # (B, *out, B, *in)
    b = x.shape[0]
    y_shape = full.shape[: full.dim() - x.dim()]
    out = math.prod(y_shape[1:])
    inn = math.prod(x.shape[1:])
    blocks = full.reshape(b, out, b, inn)
    idx = torch.arange(b)
    return blocks[idx, :, idx, :].reshape(b, *y_shape[1:], *x.shape[1:])


def double(m):
    return copy.deepcopy(m).double()


def rel_err(j, ref):
    import torch
    j = j.detach().to(torch.float64).cpu()
    scale = ref.abs().max().item() or 1.0
    return (j - ref).abs().max().item() / scale


def mlp(*w, act=None, dtype=None):
    import torch
    from torch import nn
    layers = []
    for a, b in zip(w[:-1], w[1:]):
        layers += [nn.Linear(a, b), (act or nn.Tanh)()]
    return nn.Sequential(*layers[:-1]).to(dtype or torch.float32)


def random_graph(n, deg, seed=0, components=1):
    """A random undirected graph on n nodes as a (2, E) edge_index; ``components`` equal parts with
    no edge between them."""
    import torch
    g = torch.Generator().manual_seed(seed)
    size = n // components
    edges = []
    for c in range(components):
        lo = c * size
        hi = n if c == components - 1 else lo + size
        m = hi - lo
        src = torch.randint(lo, hi, (m * deg,), generator=g)
        dst = torch.randint(lo, hi, (m * deg,), generator=g)
        keep = src != dst
        edges.append(torch.stack([src[keep], dst[keep]]))
        ring = torch.arange(lo, hi)  # connected inside the part
        edges.append(torch.stack([ring, torch.roll(ring, 1)]))
    ei = torch.cat(edges, 1)
    ei = torch.cat([ei, ei.flip(0)], 1)
    return torch.unique(ei, dim=1)


# ----------------------------------------------------------------------------------------------------
# torch_geometric: nodes are samples, one shared edge_index; a node's output reads its neighbours


def _pyg(conv_name, components=1, coupling="auto", n=24, **kw):
    import torch
    tg = need("torch_geometric.nn")
    import chunkjac
    torch.manual_seed(0)
    f = 4
    conv = getattr(tg, conv_name)(f, 3, **kw).eval()
    x = torch.randn(n, f)
    ei = random_graph(n, 2, components=components)
    c = ei if isinstance(coupling, str) and coupling == "edges" else coupling
    if isinstance(coupling, str) and coupling == "groups":
        c = torch.arange(n) // (n // components)
    conv64 = double(conv)
    return Trial(lambda: chunkjac.compute(conv, (x, ei), in_dims=(0, None), coupling=c),
                 lambda: ref_diag(lambda z: conv64(z, ei), x.double()), F32_TOL)


@case(what="GCNConv(4,3), 24 nodes, shared edge_index, in_dims=(0, None), coupling auto")
def c_pyg_gcn():
    return _pyg("GCNConv")


@case(what="GATConv(4,3,heads=2), 24 nodes, coupling auto")
def c_pyg_gat():
    return _pyg("GATConv", heads=2)


@case(what="GCNConv, 3 disconnected parts, coupling=edge_index (the documented structure form)")
def c_pyg_gcn_edges():
    return _pyg("GCNConv", components=3, coupling="edges")


@case(what="GCNConv, 3 disconnected parts of 8 nodes, coupling=<group ids> (torch.arange(24) // 8)")
def c_pyg_gcn_groups():
    return _pyg("GCNConv", components=3, coupling="groups")


@case(what="GCNConv, 200 nodes (more than the 64 samples the coupling check looks at), coupling auto")
def c_pyg_gcn_200():
    return _pyg("GCNConv", n=200)


@case(what="GCNConv, one connected graph, coupling='coupled'")
def c_pyg_gcn_coupled():
    return _pyg("GCNConv", coupling="coupled")


def _gcn2(hops):
    pyg = need("torch_geometric.nn")
    import torch
    import chunkjac
    torch.manual_seed(0)
    c1, c2 = pyg.GCNConv(4, 8).double(), pyg.GCNConv(8, 2).double()
    x, ei = torch.randn(30, 4, dtype=torch.float64), random_graph(30, 3)
    gcn = lambda z: c2(torch.tanh(c1(z, ei)), ei)  # noqa: E731
    coupling = ei if hops == 1 else chunkjac.hops(ei, hops)
    return Trial(lambda: chunkjac.compute(gcn, x, coupling=coupling), lambda: ref_diag(gcn, x), F64_TOL)


@case(expect="refused", what="2-layer GCN, coupling=edge_index (1-hop; outputs depend on 2-hop neighbours)")
def c_pyg_gcn2_one_hop():
    return _gcn2(1)


@case(what="2-layer GCN, coupling=chunkjac.hops(edge_index, 2)")
def c_pyg_gcn2_two_hops():
    return _gcn2(2)


# ----------------------------------------------------------------------------------------------------
# torchdiffeq


class _ODEFunc:
    def __init__(self, dtype):
        import torch
        torch.manual_seed(0)
        self.net = mlp(3, 16, 3, dtype=dtype)

    def __call__(self, t, y):
        return self.net(y)


def _ode(method, b=8, **kw):
    import torch
    td = need("torchdiffeq")
    import chunkjac
    func = _ODEFunc(torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.manual_seed(1)
    y0 = torch.randn(b, 3, dtype=torch.float64)

    def solve(y):
        return td.odeint(func, y, t, method=method, **kw)[-1]
    return Trial(lambda: chunkjac.compute(solve, y0), lambda: ref_diag(solve, y0.clone()), F64_TOL)


@case(what="odeint dopri5 (adaptive: one step size for the batch couples samples), float64, B=8")
def c_ode_dopri5():
    return _ode("dopri5", rtol=1e-6, atol=1e-8)


@case(what="odeint dopri5, float64, B=100 (more than the check's 64 samples)")
def c_ode_dopri5_100():
    return _ode("dopri5", b=100, rtol=1e-6, atol=1e-8)


@case(what="odeint rk4 fixed step 0.1 (samples independent), float64, B=8")
def c_ode_rk4():
    return _ode("rk4", options={"step_size": 0.1})


# ----------------------------------------------------------------------------------------------------
# e3nn


@case(what="e3nn o3.Linear('4x0e+2x1o' -> '3x0e+2x1o') on (32, 10)")
def c_e3nn_linear():
    import torch
    o3 = need("e3nn.o3")
    import chunkjac
    torch.manual_seed(0)
    lin = o3.Linear("4x0e+2x1o", "3x0e+2x1o")
    x = torch.randn(32, 10)
    lin64 = o3.Linear("4x0e+2x1o", "3x0e+2x1o").double()
    lin64.load_state_dict({k: v.double() for k, v in lin.state_dict().items()})
    return Trial(lambda: chunkjac.compute(lin, x),
                 lambda: ref_diag(lin64, x.double()), F32_TOL)


@case(what="e3nn FullyConnectedTensorProduct('2x0e+1x1o','1x0e+1x1o'->'2x0e+1x1o'), wrt=0 of (x1, x2)")
def c_e3nn_tp():
    import torch
    o3 = need("e3nn.o3")
    import chunkjac
    torch.manual_seed(0)
    args = ("2x0e+1x1o", "1x0e+1x1o", "2x0e+1x1o")
    tp = o3.FullyConnectedTensorProduct(*args)
    tp64 = o3.FullyConnectedTensorProduct(*args).double()
    tp64.load_state_dict({k: v.double() for k, v in tp.state_dict().items()})
    x1, x2 = torch.randn(32, 5), torch.randn(32, 4)
    return Trial(lambda: chunkjac.compute(tp, (x1, x2), wrt=0),
                 lambda: ref_diag(lambda a: tp64(a, x2.double()), x1.double()), F32_TOL)


# ----------------------------------------------------------------------------------------------------
# opacus


def _opacus_model():
    import torch
    need("opacus")
    from opacus import GradSampleModule
    torch.manual_seed(0)
    net = mlp(6, 16, 4)
    return net, GradSampleModule(copy.deepcopy(net))


# Opacus's hooks allow one backward pass per forward, and a Jacobian takes several (plain torch.autograd
# fails the same way): a chunkjac error that names gsm.disable_hooks() is the right answer.
@case("error", what="opacus GradSampleModule(MLP 6-16-4), J w.r.t. the input")
def c_opacus_input():
    import chunkjac
    import torch
    net, gsm = _opacus_model()
    x = torch.randn(32, 6)
    net64 = double(net)
    return Trial(lambda: chunkjac.compute(gsm, x),
                 lambda: ref_vmap(lambda xi: net64(xi), x.double()), F32_TOL)


@case(what="opacus GradSampleModule(MLP) after gsm.disable_hooks(), J w.r.t. the input")
def c_opacus_no_hooks():
    import chunkjac
    import torch
    net, gsm = _opacus_model()
    gsm.disable_hooks()
    x = torch.randn(32, 6)
    net64 = double(net)
    return Trial(lambda: chunkjac.compute(gsm, x),
                 lambda: ref_vmap(lambda xi: net64(xi), x.double()), F32_TOL)


@case("error", what="opacus GradSampleModule(MLP), wrt='_module.0.weight' (per-sample parameter Jacobian)")
def c_opacus_param():
    import chunkjac
    import torch
    from torch.func import functional_call
    net, gsm = _opacus_model()
    x = torch.randn(32, 6)
    net64 = double(net)
    w = net64[0].weight.detach()
    g = lambda xi: torch.func.jacrev(lambda ww: functional_call(net64, {"0.weight": ww}, (xi,)))(w)
    return Trial(lambda: chunkjac.compute(gsm, x, wrt="_module.0.weight"),
                 lambda: torch.func.vmap(g)(x.double()), F32_TOL)


# ----------------------------------------------------------------------------------------------------
# vision models (torchvision-like equivalents)


def resnet_like():
    from torch import nn

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return nn.functional.relu(x + self.b2(self.c2(nn.functional.relu(self.b1(self.c1(x))))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
            self.layer1 = Block(8)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.pool(self.layer1(self.stem(x))).flatten(1))
    return Net()


def _resnet(train):
    import torch
    import chunkjac
    torch.manual_seed(0)
    m = resnet_like()
    m.train()
    with torch.no_grad():  # non-trivial running statistics
        m(torch.randn(64, 3, 8, 8) * 2 + 1)
    m.train(train)
    x = torch.randn(16, 3, 8, 8)
    m64 = double(m)
    stats = copy.deepcopy(m.state_dict())

    def check(_):
        same = all(torch.equal(v, m.state_dict()[k]) for k, v in stats.items())
        return "" if same else "running statistics changed"
    ref = (lambda: ref_diag(m64, x.double())) if train else (
        lambda: ref_vmap(lambda xi: m64(xi[None])[0], x.double()))
    return Trial(lambda: chunkjac.compute(m, x), ref, F32_TOL, check=check)


@case(what="ResNet-like CNN with BatchNorm, eval mode, (16,3,8,8) -> (16,5)")
def c_resnet_eval():
    return _resnet(False)


@case(what="ResNet-like CNN with BatchNorm, train mode (batch statistics couple samples)")
def c_resnet_train():
    return _resnet(True)


def tiny_vit():
    from torch import nn
    import torch

    class ViT(nn.Module):
        def __init__(self, dim=16, patch=4, img=8, classes=5):
            super().__init__()
            self.embed = nn.Conv2d(3, dim, patch, stride=patch)
            self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
            self.pos = nn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.1)
            layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.1, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(dim, classes)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
            return self.head(self.encoder(t)[:, 0])
    return ViT()


@case(what="tiny ViT: patch conv + nn.TransformerEncoder(batch_first) on (B, tokens, dim), eval")
def c_vit_eval():
    import torch
    import chunkjac
    torch.manual_seed(0)
    m = tiny_vit().eval()
    x = torch.randn(8, 3, 8, 8)
    m64 = double(m)
    return Trial(lambda: chunkjac.compute(m, x), lambda: ref_diag(m64, x.double()), F32_TOL)


@case(what="nn.TransformerEncoder on (B, tokens, dim) directly, eval, under torch.no_grad()")
def c_transformer_nograd():
    import torch
    from torch import nn
    import chunkjac
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    x = torch.randn(6, 5, 8)
    enc64 = double(enc)

    def call():
        with torch.no_grad():  # a user's inference code: the fast path of TransformerEncoder
            return chunkjac.compute(enc, x)
    return Trial(call, lambda: ref_diag(enc64, x.double()), F32_TOL)


# ----------------------------------------------------------------------------------------------------
# compiled, recurrent, attention


# Where inductor's compiled backward donates its buffers (one backward per forward), a chunkjac error
# that names torch._functorch.config.donated_buffer = False is the right answer; where it does not
# (seen in a fresh CI clone), the answer is exact. aot_eager is exact (below).
@case("either", what="torch.compile(MLP 3-32-3) (inductor, CPU), B=64")
def c_compiled_mlp():
    import torch
    import chunkjac
    torch.manual_seed(0)
    net = mlp(3, 32, 3)
    cm = torch.compile(net)
    x = torch.randn(64, 3)
    net64 = double(net)
    return Trial(lambda: chunkjac.compute(cm, x), lambda: ref_vmap(net64, x.double()), F32_TOL,
                 note="inductor's backward donates buffers: no retain_graph; "
                      "torch._functorch.config.donated_buffer = False works around it")


@case(what="torch.compile(MLP, backend='aot_eager'), B=64")
def c_compiled_aot_eager():
    import torch
    import chunkjac
    torch.manual_seed(0)
    net = mlp(3, 32, 3)
    cm = torch.compile(net, backend="aot_eager")
    x = torch.randn(64, 3)
    net64 = double(net)
    return Trial(lambda: chunkjac.compute(cm, x), lambda: ref_vmap(net64, x.double()), F32_TOL)


def _lstm(batch_first):
    import torch
    from torch import nn
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=batch_first)
    b = t = 6  # sequence length == batch size: shapes cannot tell the dims apart
    x = torch.randn(b, t, 3) if batch_first else torch.randn(t, b, 3)
    return lstm, double(lstm), x


@case(what="nn.LSTM(batch_first=True) on (B=6, T=6, 3), fn = lstm(x)[0]")
def c_lstm_batch_first():
    import chunkjac
    lstm, l64, x = _lstm(True)
    return Trial(lambda: chunkjac.compute(lambda z: lstm(z)[0], x),
                 lambda: ref_diag(lambda z: l64(z)[0], x.double()), F32_TOL)


def _time_major_ref(l64, x):
    import torch
    from torch.autograd.functional import jacobian
    x = x.double()
    # sample b: the sequence x[:, b] -> lstm(x)[0][:, b], (T, H, T, F)
    return torch.stack([jacobian(lambda s: l64(s[:, None])[0][:, 0], x[:, b]) for b in range(x.shape[1])])


@case(expect="refused", what="nn.LSTM time-major (T=6, B=6, 3), in_dims=1, fn = lstm(x)[0] (batch in dim 1 of the output)")
def c_lstm_time_major():
    import chunkjac
    import torch
    lstm, l64, x = _lstm(False)

    def check(j):  # what chunkjac computes: output dim 0 (time) read as the sample
        full = torch.autograd.functional.jacobian(lambda z: l64(z)[0], x.double())  # (T,B,H,T,B,F)
        idx = torch.arange(x.shape[1])
        dim0 = full[idx, :, :, :, idx, :]  # (B, B, H, T, F): y[i] w.r.t. x[:, i]
        return f"vs the dim-0 reading (y[i] w.r.t. x[:, i]): rel err {rel_err(j, dim0):.1e}"
    return Trial(lambda: chunkjac.compute(lambda z: lstm(z)[0], x, in_dims=1),
                 lambda: _time_major_ref(l64, x), F32_TOL, check=check,
                 note="the output's leading dim is time, not the batch; T == B hides it from a shape check")


@case(what="nn.LSTM time-major, in_dims=1, fn = lstm(x)[0].transpose(0, 1) (batch leading)")
def c_lstm_time_major_T():
    import chunkjac
    lstm, l64, x = _lstm(False)
    return Trial(lambda: chunkjac.compute(lambda z: lstm(z)[0].transpose(0, 1), x, in_dims=1),
                 lambda: _time_major_ref(l64, x), F32_TOL)


@case(what="nn.MultiheadAttention(8, 2) across the batch: x (B=16, 8) as one unbatched sequence")
def c_mha_across_batch():
    import torch
    from torch import nn
    import chunkjac
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).eval()
    x = torch.randn(16, 8)
    m64 = double(mha)
    return Trial(lambda: chunkjac.compute(lambda z: mha(z, z, z)[0], x),
                 lambda: ref_diag(lambda z: m64(z, z, z)[0], x.double()), F32_TOL)


@case(what="nn.MultiheadAttention(8, 2, batch_first=True) within samples: x (B=8, L=5, 8)")
def c_mha_batched():
    import torch
    from torch import nn
    import chunkjac
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(8, 5, 8)
    m64 = double(mha)
    return Trial(lambda: chunkjac.compute(lambda z: mha(z, z, z)[0], x),
                 lambda: ref_vmap(lambda xi: m64(xi[None], xi[None], xi[None])[0][0], x.double()), F32_TOL)


# ----------------------------------------------------------------------------------------------------
# odd functions


@case(what="fn = lambda z: m.to(z.device)(z), m a float64 nn.Sequential (reported to segfault)")
def c_to_device_inside():
    import torch
    import chunkjac
    torch.manual_seed(0)
    m = mlp(3, 8, 2, dtype=torch.float64)
    x = torch.randn(10, 3, dtype=torch.float64)
    m64 = double(m)
    return Trial(lambda: chunkjac.compute(lambda z: m.to(z.device)(z), x),
                 lambda: ref_vmap(m64, x), F64_TOL)


@case(expect="refused", what="the same .to(z.device) fn with mode='forward', coupling='independent' (torch's own jvp fails)")
def c_to_device_inside_fwd():
    import torch
    import chunkjac
    torch.manual_seed(0)
    m = mlp(3, 8, 2, dtype=torch.float64)
    x = torch.randn(10, 3, dtype=torch.float64)
    m64 = double(m)
    return Trial(lambda: chunkjac.compute(lambda z: m.to(z.device)(z), x, mode="forward", coupling="independent"),
                 lambda: ref_vmap(m64, x), F64_TOL)


@case(expect="refused", what="numpy inside fn: torch.from_numpy(np.tanh(z.detach().numpy()))")
def c_numpy_inside():
    import numpy as np
    import torch
    import chunkjac
    x = torch.randn(10, 3, dtype=torch.float64)
    return Trial(lambda: chunkjac.compute(lambda z: torch.from_numpy(np.tanh(z.detach().numpy())), x),
                 lambda: torch.diag_embed(1 - torch.tanh(x) ** 2), F64_TOL,
                 note="reference: the true derivative diag(1 - tanh^2); autograd cannot see it")


@case(expect="refused", what="fn returns z.detach() * 2 (leaves autograd entirely)")
def c_detach_all():
    import torch
    import chunkjac
    x = torch.randn(10, 3, dtype=torch.float64)
    return Trial(lambda: chunkjac.compute(lambda z: z.detach() * 2, x),
                 lambda: 2 * torch.eye(3, dtype=torch.float64).expand(10, 3, 3), F64_TOL,
                 note="reference: the true derivative 2*I")


@case(what="fn = sin(z) + z.detach()**2 (partial stop-gradient: autograd's answer is cos)")
def c_detach_partial():
    import torch
    import chunkjac
    x = torch.randn(10, 3, dtype=torch.float64)
    return Trial(lambda: chunkjac.compute(lambda z: torch.sin(z) + z.detach() ** 2, x),
                 lambda: torch.diag_embed(torch.cos(x)), F64_TOL)


# ----------------------------------------------------------------------------------------------------
# parameter Jacobians, timed against vmap(jacrev(functional_call))


def small_cnn():
    from torch import nn

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 6 * 6, 5)

        def forward(self, x):
            return self.fc(nn.functional.relu(self.conv(x)).flatten(1))
    return CNN()


def _param(name, b):
    import torch
    from torch.func import functional_call, jacrev, vmap
    import chunkjac
    torch.manual_seed(0)
    m = small_cnn()
    x = torch.randn(b, 1, 8, 8)
    m64 = double(m)
    w = dict(m64.named_parameters())[name].detach()
    times = {}

    def call():
        t = time.perf_counter()
        j = chunkjac.compute(m, x, wrt=name)
        times["chunkjac_first_s"] = time.perf_counter() - t
        t = time.perf_counter()
        chunkjac.compute(m, x, wrt=name)
        times["chunkjac_again_s"] = time.perf_counter() - t
        params = {k: v.detach() for k, v in m.named_parameters()}
        g = lambda xi: jacrev(lambda ww: functional_call(m, {**params, name: ww}, (xi[None],))[0])(params[name])
        for k in ("vmap_jacrev_first_s", "vmap_jacrev_again_s"):
            t = time.perf_counter()
            vmap(g)(x)
            times[k] = time.perf_counter() - t
        return j

    def ref():
        g = lambda xi: jacrev(lambda ww: functional_call(m64, {name: ww}, (xi[None],))[0])(w)
        return vmap(g)(x.double())

    def check(_):
        return " ".join(f"{k}={v:.3f}" for k, v in times.items())
    return Trial(call, ref, F32_TOL, check=check)


@case(what="small CNN, wrt='fc.weight' (5x144), B=256; times vs vmap(jacrev(functional_call))")
def c_param_fc_weight():
    return _param("fc.weight", 256)


@case(what="small CNN, wrt='conv.weight' (4x1x3x3), B=256; times vs vmap(jacrev(functional_call))")
def c_param_conv_weight():
    return _param("conv.weight", 256)


# ----------------------------------------------------------------------------------------------------
# meta tensors and bad inputs


@case(expect="refused", what="model and x on the meta device")
def c_meta_all():
    import torch
    import chunkjac
    m = mlp(3, 8, 2).to("meta")
    x = torch.randn(10, 3, device="meta")
    return Trial(lambda: chunkjac.compute(m, x), None, shape=(10, 2, 3),
                 note="meta tensors have no values: a result can only be checked for shape")


@case(expect="refused", what="CPU model, x on the meta device")
def c_meta_input():
    import torch
    import chunkjac
    m = mlp(3, 8, 2)
    x = torch.randn(10, 3, device="meta")
    return Trial(lambda: chunkjac.compute(m, x), None, shape=(10, 2, 3))


@case(expect="error", what="wrong feature count: Linear(5, .) model, x (8, 4)")
def c_bad_features():
    import torch
    import chunkjac
    m = mlp(5, 8, 2)
    return Trial(lambda: chunkjac.compute(m, torch.randn(8, 4)), None, shape=(8, 2, 4))


@case(expect="error", what="float64 x into a float32 model")
def c_bad_float64_into_float32():
    import torch
    import chunkjac
    torch.manual_seed(0)
    m = mlp(3, 8, 2)
    x = torch.randn(8, 3, dtype=torch.float64)
    return Trial(lambda: chunkjac.compute(m, x), lambda: ref_vmap(double(m), x), F32_TOL,
                 note="exact (a float64 J of the float32 model) would also be acceptable")


@case(what="numpy float32 array input into a float32 model")
def c_numpy_input_f32():
    import numpy as np
    import torch
    import chunkjac
    torch.manual_seed(0)
    m = mlp(3, 8, 2)
    x = np.random.default_rng(0).standard_normal((8, 3)).astype(np.float32)
    return Trial(lambda: chunkjac.compute(m, x), lambda: ref_vmap(double(m), torch.from_numpy(x).double()), F32_TOL)


@case(expect="error", what="numpy float64 array (numpy's default) into a float32 model")
def c_numpy_input_f64():
    import numpy as np
    import torch
    import chunkjac
    torch.manual_seed(0)
    m = mlp(3, 8, 2)
    x = np.random.default_rng(0).standard_normal((8, 3))
    return Trial(lambda: chunkjac.compute(m, x), lambda: ref_vmap(double(m), torch.from_numpy(x)), F32_TOL,
                 note="exact would also be acceptable")


@case(what="Laplacian of Linear -> LayerNorm -> Linear with create_graph=True, then its parameter gradient "
           "(PyTorch's third derivative of layer_norm is wrong: the route must be right one order higher)")
def c_layernorm_create_graph():
    import torch
    import chunkjac
    from torch import nn
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 1)).double()
    x = torch.randn(6, 3, dtype=torch.float64)

    def call():
        mm = copy.deepcopy(m)
        chunkjac.laplacian(mm, x, create_graph=True).sum().backward()
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in mm.parameters()])

    def ref():  # central differences of per-sample autograd Laplacians
        base = torch.nn.utils.parameters_to_vector(m.parameters()).detach()
        mm, g = copy.deepcopy(m), torch.zeros_like(base)
        for k in range(base.numel()):
            for sign in (1, -1):
                v = base.clone()
                v[k] += sign * 1e-6
                torch.nn.utils.vector_to_parameters(v, mm.parameters())
                lap = sum(torch.autograd.functional.hessian(lambda z: mm(z[None])[0, 0], xi).trace() for xi in x)
                g[k] += sign * lap / 2e-6
        return g
    return Trial(call, ref, 1e-6)


@case(what="CNN with BatchNorm in training, wrt='params', coupling='coupled' (a bias BatchNorm removes)")
def c_bn_cnn_params_coupled():
    import torch
    import chunkjac
    from torch import nn
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 2)).double()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    names = [k for k, _ in m.named_parameters()]
    ref_m = copy.deepcopy(m)

    def ref():
        full = torch.autograd.functional.jacobian(
            lambda *ps: torch.func.functional_call(ref_m, dict(zip(names, ps)), (x,)),
            tuple(p.detach() for p in m.parameters()))
        return torch.cat([r.reshape(6, 2, -1) for r in full], -1)
    return Trial(lambda: chunkjac.compute(m, x, wrt="params", coupling="coupled", flat=True), ref, F64_TOL)


@case(expect="refused", what="opacus GradSampleModule refused, then the user's own backward (the refusal must "
                              "leave the module as it was)")
def c_opacus_refused_then_backward():
    import torch
    import chunkjac
    net, gsm = _opacus_model()
    x = torch.randn(32, 6)

    def call():
        try:
            chunkjac.compute(gsm, x)
        finally:
            gsm(x).sum().backward()  # fails inside Opacus if the refused call left state behind
    return Trial(call, None, shape=())


# ----------------------------------------------------------------------------------------------------
# running


def first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"[:300]


def where(e: BaseException) -> str:
    """The innermost frame, and the last chunkjac frame on the way there."""
    import traceback
    tb = traceback.extract_tb(e.__traceback__)
    short = lambda f: f"{'/'.join(f.filename.split('/')[-2:])}:{f.lineno}"
    ours = [f for f in tb if f"{os.sep}chunkjac{os.sep}" in f.filename]
    return f"raised at {short(tb[-1])}" + (f" via {short(ours[-1])}" if ours else "")


def run_case(name: str) -> dict:
    """In this process: build the case, call chunkjac, compare. Returns the record."""
    import torch
    torch.manual_seed(0)
    builder = CASES[name][0]
    rec = {"case": name}
    try:
        trial = builder()
    except Skip as e:
        return {**rec, "status": "skipped", "detail": str(e)}
    except Exception as e:
        return {**rec, "status": "setup_error", "detail": first_line(e)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = time.perf_counter()
        try:
            j = trial.call()
            err = None
        except Exception as e:
            err = e
        rec["seconds"] = round(time.perf_counter() - t, 3)
    cw = [f"{w.category.__name__}: {w.message}" for w in caught
          if w.category.__name__ == "CouplingWarning" or str(w.message).startswith("chunkjac")]
    rec["warned"] = cw[0][:200] if cw else ""
    rec["note"] = trial.note
    if err is not None:
        msg = str(err).strip()
        # fn's own exception comes back as itself, with chunkjac's context in a note (PEP 678)
        noted = any(str(n).startswith("chunkjac: fn raised") for n in getattr(err, "__notes__", ()))
        rec["status"] = "refused" if msg.startswith("chunkjac:") else "fn_error" if noted else "raw_error"
        rec["detail"] = first_line(err)
        if rec["status"] == "raw_error":
            rec["where"] = where(err)
        return rec
    if isinstance(j, tuple):
        j = j[0]
    extra = trial.check(j) if trial.check else ""
    if trial.ref is None:
        ok = tuple(j.shape) == tuple(trial.shape)
        rec["status"] = "exact" if ok else "wrong"
        rec["detail"] = f"returned {j.dtype} {tuple(j.shape)} on {j.device} (no values to check)"
    else:
        try:
            ref = trial.ref()
        except Exception as e:
            return {**rec, "status": "no_reference", "detail": first_line(e)}
        if tuple(j.shape) != tuple(ref.shape):
            rec["status"], rec["detail"] = "wrong", f"shape {tuple(j.shape)}, expected {tuple(ref.shape)}"
        else:
            e = rel_err(j, ref)
            tol = F64_TOL if j.dtype == torch.float64 and trial.tol == F64_TOL else trial.tol
            rec["status"] = "exact" if e <= tol else "wrong"
            rec["detail"] = f"rel err {e:.1e} (tol {tol:.0e}), {j.dtype} {tuple(j.shape)}"
    if extra:
        rec["detail"] += "; " + extra
        if "changed" in extra:
            rec["status"] = "wrong"
    return rec


def run_isolated(name: str, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name], capture_output=True,
                           text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"case": name, "status": "hang", "detail": f"no answer within {timeout:.0f} s"}
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode < 0:
        import signal
        sig = signal.Signals(-r.returncode).name
        return {"case": name, "status": "crash", "detail": f"killed by {sig}",
                "seconds": round(time.perf_counter() - t, 1)}
    if not lines:
        tail = (r.stderr.strip().splitlines() or [""])[-1]
        return {"case": name, "status": "crash", "detail": f"exit {r.returncode}, no record: {tail[:200]}"}
    return json.loads(lines[-1])


def run_in_one_process(names: list, timeout: float):
    """--one-process: every case in one interpreter, one after the other (chunkjac's remembered
    decisions kept across cases, as in a long-running service); a crash or hang ends that interpreter,
    and a new one goes on with the cases after it. Yields the records in order."""
    import queue
    import threading
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    pending = list(names)
    while pending:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--children", json.dumps(pending)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout] + [lines.put(None)], daemon=True).start()
        current, t = None, time.perf_counter()
        while pending:
            try:
                line = lines.get(timeout=timeout)
            except queue.Empty:
                proc.kill()
                yield {"case": current or pending[0], "status": "hang", "detail": f"no answer within {timeout:.0f} s"}
                pending.remove(current or pending[0])
                break
            if line is None:  # the interpreter died in the middle of ``current``
                rc = proc.wait()
                how = f"killed by {signal_name(-rc)}" if rc < 0 else f"exit {rc}"
                name = current or pending[0]
                yield {"case": name, "status": "crash", "detail": f"{how} (one process)",
                       "seconds": round(time.perf_counter() - t, 1)}
                pending.remove(name)
                break
            if line.startswith("start "):
                current, t = line.split(" ", 1)[1].strip(), time.perf_counter()
            elif line.startswith("{"):
                rec = json.loads(line)
                pending.remove(rec["case"])
                current = None
                yield rec
        proc.kill()
        proc.wait()


def signal_name(n: int) -> str:
    import signal
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--filter", default="", help="run only the cases whose name contains this substring")
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--json", help="also write the records to this file")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--one-process", action="store_true", help="every case in one interpreter, one after the "
                    "other, chunkjac's remembered decisions kept across cases (a new interpreter after a crash)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--children", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        sys.path.insert(0, ROOT)
        print(json.dumps(run_case(a.child)), flush=True)
        return 0
    if a.children:
        sys.path.insert(0, ROOT)
        for name in json.loads(a.children):
            print(f"start {name}", flush=True)
            print(json.dumps(run_case(name)), flush=True)
        return 0
    names = [n for n in CASES if a.filter in n]
    if a.list:
        for n in names:
            print(f"{n:26} expect {CASES[n][1]:8} {CASES[n][2]}")
        return 0
    if not names:
        print(f"no case matches {a.filter!r}; --list shows them", file=sys.stderr)
        return 2
    records = []
    print(f"{'case':26} {'status':11} {'expect':8} {'ok':3} {'s':>6}  detail", flush=True)
    runs = run_in_one_process(names, a.timeout) if a.one_process else (run_isolated(n, a.timeout) for n in names)
    for rec in runs:
        n = rec["case"]
        rec["expect"] = CASES[n][1]
        want = {"error": ("refused", "fn_error"), "either": ("exact", "refused")}.get(rec["expect"], (rec["expect"],))
        rec["ok"] = rec["status"] in want + ("skipped",)
        records.append(rec)
        sec = rec.get("seconds")
        sec = f"{sec:6.1f}" if isinstance(sec, (int, float)) else "     -"
        detail = rec.get("detail", "")
        if rec.get("where"):
            detail += f" ({rec['where']})"
        if rec.get("warned"):
            detail += f" | warned {rec['warned'][:100]}"
        print(f"{n:26} {rec['status']:11} {rec['expect']:8} {'yes' if rec['ok'] else 'NO':3} {sec}  {detail}",
              flush=True)
    counts = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print("\n" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(records, f, indent=1)
    # A crash, hang, wrong answer or raw PyTorch error is a defect; so is a refusal where the answer exists.
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
