"""The independent reference every test compares with: the per-sample blocks of the full Jacobian."""
import torch


def blocks(f, *args, wrt=0, create_graph=False):
    """Diagonal blocks dy_i/dx_i of the full (B, *out, B, *in) Jacobian of f w.r.t. args[wrt]:
    returns (B, *out, *in). Off-diagonal blocks (samples that interact) are dropped."""
    x = args[wrt]

    def g(v):
        a = list(args)
        a[wrt] = v
        return f(*a)

    y = g(x)
    full = torch.autograd.functional.jacobian(g, x, create_graph=create_graph)
    b = x.shape[0]
    i = torch.arange(b)
    return full.reshape(b, -1, b, x[0].numel())[i, :, i].reshape(b, *y.shape[1:], *x.shape[1:])


def hessian_blocks(f, x, part="full"):
    """Per-sample second derivatives d^2 y_i / d x_i^2 from the Hessian of each sample's outputs w.r.t.
    its own input, all other samples held fixed (torch.autograd.functional.hessian, one sample and one
    output element at a time): valid for coupled samples too. Returns the part's shape (see hessian)."""
    b = x.shape[0]
    rows = []
    for i in range(b):
        def yi(v, i=i):
            z = torch.cat([x[:i], v.unsqueeze(0), x[i + 1:]])
            return f(z)[i].reshape(-1)

        n_out = yi(x[i]).numel()
        hs = torch.stack([torch.autograd.functional.hessian(lambda v, r=r: yi(v)[r], x[i]) for r in range(n_out)])
        rows.append(hs)  # (n_out, *in, *in)
    h = torch.stack(rows)
    out_shape = f(x).shape[1:]
    d = x[0].numel()
    h = h.reshape(b, *out_shape, d, d)
    if part == "full":
        return h.reshape(b, *out_shape, *x.shape[1:], *x.shape[1:])
    diag = h.diagonal(dim1=-2, dim2=-1)
    if part == "diagonal":
        return diag.reshape(b, *out_shape, *x.shape[1:])
    return diag.sum(-1)
