"""The ``chunkjac`` command (also ``python -m chunkjac``)."""
from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn

from . import __version__, compute, plan


def pinn_mlp(width: int = 128, depth: int = 3, dim: int = 3) -> nn.Module:
    """The PINN-style MLP of the demo: dim -> width x depth -> dim, tanh activations."""
    layers: list[nn.Module] = [nn.Linear(dim, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, dim))


def _demo(args: argparse.Namespace) -> int:
    torch.manual_seed(0)
    model = pinn_mlp()
    x = torch.rand(args.samples, 3) * 2 - 1
    t = time.perf_counter()
    p = plan(model, x)  # probes the model once; compute reuses the probe
    tp = time.perf_counter() - t
    t = time.perf_counter()
    J = compute(model, x)
    dt = time.perf_counter() - t
    print("model:       PINN MLP 3 -> 128 -> 128 -> 128 -> 3 (tanh), float32")
    print(f"samples:     {args.samples:,}")
    print(f"plan:        {p}")
    print(f"planning:    {tp:.3f} s (probe, once per model and input shape)")
    print(f"jacobians:   {tuple(J.shape)}  (J[i] = dy_i/dx_i)")
    print(f"time:        {dt:.3f} s")
    print(f"throughput:  {args.samples / dt:,.0f} samples/s")
    return 0


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chunkjac",
        description="Exact per-sample Jacobians of PyTorch models over very large batches.")
    parser.add_argument("--version", action="version", version=f"chunkjac {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="per-sample Jacobians of a PINN-style MLP over a large batch of points",
        description="Builds a PINN-style MLP (3 -> 128 -> 128 -> 128 -> 3, tanh), computes the "
                    "per-sample Jacobians of SAMPLES random points and prints shape, time and throughput.")
    demo.add_argument("--samples", type=_positive_int, default=1_000_000, help="number of points (default 1e6)")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
