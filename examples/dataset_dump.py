"""Jacobians of a dataset that fits neither in memory nor on the GPU: a .npy on disk, resumable.

From a shell, the same dump is:  chunkjac dump model.py:make x.npy jacobians.npy --budget 64MB
Kill it at any moment and run the same command again: it resumes where the file stopped.
"""
import logging
import os
import shutil
import tempfile

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

import chunkjac

logging.basicConfig(level=logging.INFO, format="%(message)s")  # "resuming: ...", "complete: ..."
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
folder = tempfile.mkdtemp()

# 1. Inputs in a .npy file, read chunk by chunk through a memmap (never loaded whole).
x_path = os.path.join(folder, "x.npy")
np.save(x_path, np.random.default_rng(0).standard_normal((200_000, 3)).astype(np.float32))
x = np.load(x_path, mmap_mode="r")

# 2. The result goes to a .npy file created at its final shape, (200000, 3, 3), filled chunk by chunk;
#    a manifest next to it (jacobians.npy.chunkjac.json) lists the chunks on disk.
out = os.path.join(folder, "jacobians.npy")
J = chunkjac.compute(model, x, budget="8MB", out=out)
print("J:", tuple(J.shape), J.dtype, "shares memory with", os.path.basename(out))
print("any numpy user can read it:", np.load(out, mmap_mode="r")[12345, 0])

# 3. Running the same call again does nothing (the manifest says the dump is complete) ...
chunkjac.compute(model, x, budget="8MB", out=out)

# ... and a different model or input is refused rather than mixed into the file.
other = nn.Sequential(nn.Linear(3, 3))
try:
    chunkjac.compute(other, x, out=out)
except ValueError as e:
    print("refused:", str(e)[:90], "...")

# 4. A map-style Dataset works the same way: items are read as chunks need them, the next chunk in a
#    background thread while the current one computes.
class Points(Dataset):
    def __len__(self):
        return 50_000

    def __getitem__(self, i):
        return torch.from_numpy(np.array(x[i])), 2.0  # (a point, a scale), one per positional input


J2 = chunkjac.compute(lambda p, s: model(p) * s[:, None], Points(), out=os.path.join(folder, "scaled.npy"))
print("Dataset:", tuple(J2.shape), "max |J2 - 2 J|:", (J2 - 2 * J[:50_000]).abs().max().item())

# 5. Or write into a tensor you allocated (pinned host memory, a slice of a bigger buffer, ...).
buf = torch.empty(10_000, 3, 3)
chunkjac.compute(model, torch.from_numpy(np.array(x[:10_000])), out=buf)
print("out=tensor:", bool(torch.allclose(buf, J[:10_000], atol=1e-6)))
del J, J2  # they map the files
shutil.rmtree(folder)
