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
