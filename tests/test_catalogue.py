"""Modules and operators chunkjac has not been written for, each run on a batch with the default call
(coupling="auto", mode="auto"): the answer is the exact diagonal blocks of the full Jacobian, in
float64, and a CouplingWarning comes exactly when samples interact."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import chunkjac

D = torch.float64


def _m(module):
    torch.manual_seed(0)
    return module.double()


PERM = torch.tensor([1, 0, 3, 2, 5, 4])
# name: (fn factory, input shape, samples interact)
CATALOGUE = {
    "linear": (lambda: _m(nn.Linear(4, 3)), (10, 4), False),
    "conv1d": (lambda: _m(nn.Conv1d(2, 3, 3)), (6, 2, 7), False),
    "batchnorm1d_train": (lambda: _m(nn.BatchNorm1d(4)).train(), (10, 4), True),
    "batchnorm1d_eval": (lambda: _m(nn.BatchNorm1d(4)).eval(), (10, 4), False),
    "instancenorm1d": (lambda: _m(nn.InstanceNorm1d(3)), (6, 3, 5), False),
    "layernorm": (lambda: _m(nn.LayerNorm(4)), (10, 4), False),
    "groupnorm": (lambda: _m(nn.GroupNorm(2, 4)), (10, 4, 3), False),
    "softmax_dim0": (lambda: nn.Softmax(dim=0), (10, 4), True),
    "softmax_dim-1": (lambda: nn.Softmax(dim=-1), (10, 4), False),
    "logsoftmax_dim0": (lambda: nn.LogSoftmax(dim=0), (10, 4), True),
    "normalize_dim0": (lambda: (lambda x: F.normalize(x, dim=0)), (10, 4), True),
    "multihead_attention_unbatched": (lambda: (lambda m: lambda x: m(x, x, x)[0])(_m(nn.MultiheadAttention(4, 2))),
                                      (7, 4), True),
    "transformer_layer_unbatched": (lambda: _m(nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0)),
                                    (7, 4), True),
    "lstm_unbatched": (lambda: (lambda m: lambda x: m(x)[0])(_m(nn.LSTM(4, 3))), (7, 4), True),
    "gru_unbatched": (lambda: (lambda m: lambda x: m(x)[0])(_m(nn.GRU(4, 3))), (7, 4), True),
    "cumsum_dim0": (lambda: (lambda x: torch.cumsum(x, 0)), (10, 3), True),
    "cumprod_dim0": (lambda: (lambda x: torch.cumprod(x, 0)), (10, 3), True),
    "sort_dim0": (lambda: (lambda x: torch.sort(x, 0)[0]), (10, 3), True),
    "flip_dim0": (lambda: (lambda x: x.flip(0)), (10, 3), True),
    "fft_dim0": (lambda: (lambda x: torch.fft.fft(x, dim=0).real), (10, 3), True),
    "median_dim0": (lambda: (lambda x: x - x.median(0, keepdim=True)[0]), (9, 3), True),
    "maxpool1d_unbatched": (lambda: nn.MaxPool1d(2), (6, 8), False),
    "cdist_self": (lambda: (lambda x: torch.cdist(x, x)), (8, 3), True),  # no forward-mode formula
    "centre_and_scale": (lambda: (lambda x: (x - x.mean(0)) / x.std(0)), (8, 3), True),
    "shift_by_one": (lambda: (lambda x: F.pad(x, (0, 0, 1, 0))[:-1] + x), (8, 3), True),
    "fixed_permutation": (lambda: (lambda x: x[PERM] * x), (6, 3), True),
    "bilinear_with_flipped": (lambda: (lambda m: lambda x: m(x, x.flip(0)))(_m(nn.Bilinear(4, 4, 2))), (6, 4), True),
    "gelu": (lambda: nn.GELU(), (10, 4), False),
    "prelu": (lambda: _m(nn.PReLU()), (10, 4), False),
    "glu": (lambda: nn.GLU(), (10, 4), False),
    "pixel_shuffle": (lambda: nn.PixelShuffle(2), (3, 4, 2, 2), False),
    "unfold": (lambda: nn.Unfold(2), (3, 2, 4, 4), False),
}


def blocks(f, x):
    y = f(x)
    full = torch.autograd.functional.jacobian(f, x)
    b = x.shape[0]
    i = torch.arange(b)
    return full.reshape(b, -1, b, x[0].numel())[i, :, i].reshape(b, *y.shape[1:], *x.shape[1:])


@pytest.mark.parametrize("name", CATALOGUE)
def test_default_call_is_exact(name):
    make, shape, interact = CATALOGUE[name]
    f = make()
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=D)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        j = chunkjac.compute(f, x)
    torch.testing.assert_close(j, blocks(f, x), rtol=1e-10, atol=1e-12)
    warned = [w for w in caught if issubclass(w.category, chunkjac.CouplingWarning)]
    assert len(warned) == int(interact)


def test_unbatched_conv_is_refused():
    """Conv1d on a 2-D tensor reads dim 0 as channels: the output does not hold the samples."""
    with pytest.raises(ValueError, match="leading dim must hold those samples"):
        chunkjac.compute(_m(nn.Conv1d(6, 3, 3)), torch.randn(6, 7, dtype=D))
