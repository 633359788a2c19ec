"""The ``chunkjac`` command (also ``python -m chunkjac``)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import math
import os
import resource
import sys
import threading
import time
import warnings

import numpy as np

import torch
from torch import nn

from . import CouplingWarning, __version__, compute, hessian, plan
from ._budget import format_bytes
from ._distributed import launch_rank, launch_world


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
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


class UsageError(Exception):
    """A mistake on the command line: printed as one paragraph, exit status 2, no traceback."""


def load_factory(ref: str):
    """``package.module:callable`` or ``path/to/file.py:callable``, called with no arguments."""
    where, sep, name = ref.rpartition(":")
    if not sep or not where or not name:
        raise UsageError(f"FACTORY must be 'package.module:callable' or 'path/to/file.py:callable', got {ref!r}.")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise UsageError(f"FACTORY {ref!r}: the file {where} does not exist.")
        # Named after the file (not a per-process hash): the dump's fingerprint names fn's module.
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(where))[0], where)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's file failed: say where and why
            raise UsageError(f"FACTORY {ref!r}: running {where} raised {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as e:  # noqa: BLE001
            raise UsageError(f"FACTORY {ref!r}: cannot import {where} ({type(e).__name__}: {e}).") from None
    factory = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise UsageError(f"FACTORY {ref!r}: {where} has no callable named {name!r}.")
    try:
        fn = factory()
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"FACTORY {ref!r}: {name}() raised {type(e).__name__}: {e}") from None
    if not callable(fn):
        raise UsageError(f"FACTORY {ref!r}: {name}() returned {type(fn).__name__}, not a model or function.")
    return fn


def _load_inputs(paths: list[str]) -> tuple:
    arrays = []
    for p in paths:
        if not p.endswith(".npy"):
            raise UsageError(f"input {p!r} is not a .npy file; save each positional input with numpy.save.")
        if not os.path.isfile(p):
            raise UsageError(f"input file {p} does not exist.")
        try:
            arrays.append(np.load(p, mmap_mode="r"))  # read chunk by chunk, never whole
        except (ValueError, OSError) as e:
            raise UsageError(f"input file {p} is not a readable .npy file ({e}).") from None
    return tuple(arrays)


def _key(s: str | None):
    """--wrt/--output values: integers are indices, anything else a name or key."""
    if s is None:
        return None
    return int(s) if s.lstrip("-").isdigit() else s


def _call_options(args: argparse.Namespace) -> dict:
    opts = dict(wrt=_key(args.wrt) if args.wrt is not None else 0, output=_key(args.output), mode=args.mode,
                budget=args.budget, device=args.device, chunk_size=args.chunk_size, coupling=args.coupling)
    if args.max_seconds is not None:
        opts["max_seconds"] = args.max_seconds
    if getattr(args, "part", None) is not None:
        opts["part"] = args.part
    if getattr(args, "project", None) is not None:
        from ._projection import Projection
        opts["project"] = Projection(args.project, seed=args.seed, kind=args.projection,
                                     dtype={"float16": torch.float16, "float32": torch.float32, None: None}[
                                         args.project_dtype])
    return opts


class _MemoryWatch:
    """Peaks of the process's own memory (anonymous pages: what the budget governs) and of the file
    pages it maps (the memory-mapped inputs and output: page cache the OS reclaims), sampled from
    /proc/self/status every 20 ms. Where that file is missing, only the peak RSS is known."""

    def __init__(self):
        self.anon = self.file = 0
        self.file_before = 0  # mapped file pages before the dump: shared libraries, not the dump's files
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="chunkjac-memory")
        self.available = os.path.exists("/proc/self/status")

    def _sample(self) -> None:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        self.anon = max(self.anon, int(fields["RssAnon"].split()[0]) * 1024)
        self.file = max(self.file, int(fields["RssFile"].split()[0]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def __enter__(self):
        if self.available:
            self._sample()
            self.file_before = self.file
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.available:
            self._stop.set()
            self._thread.join()
            self._sample()

    def report(self, device) -> str:
        if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
            return f"{torch.cuda.max_memory_allocated() / 1e6:,.0f} MB on {device} (torch.cuda.max_memory_allocated)"
        if not self.available:
            peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return f"{peak_kb / 1e3:,.0f} MB resident (peak RSS of this process)"
        return (f"{format_bytes(self.anon)} of the process's own memory (anonymous pages: the budget governs "
                f"these, with the interpreter and PyTorch); up to {format_bytes(max(self.file - self.file_before, 0))} "
                "of mapped file pages added by the dump (the memory-mapped inputs and output: page cache the OS "
                "reclaims)")


def _plan_cmd(args: argparse.Namespace) -> int:
    fn = load_factory(args.factory)
    inputs = _load_inputs(args.inputs)
    print(f"plan: {plan(fn, inputs, **_call_options(args))}")
    return 0


def _dump_cmd(args: argparse.Namespace) -> int:
    paths = args.paths
    if len(paths) < 2:
        raise UsageError("dump needs at least one INPUTS .npy file and the OUT .npy file to write.")
    *inputs_paths, out = paths
    folder = args.wrt == "params" and args.project is None  # a dict: one .npy per parameter in the folder OUT
    if folder and out.endswith(".npy"):
        raise UsageError(f"OUT {out!r}: with --wrt params, OUT is a folder (one .npy per parameter), not a .npy file.")
    if not folder and not out.endswith(".npy"):
        raise UsageError(f"OUT {out!r} must be a path ending in .npy (the file to write).")
    parent = os.path.dirname(os.path.abspath(out.rstrip("/\\")))
    if not os.path.isdir(parent):  # before the model is built or probed
        raise UsageError(f"OUT {out!r}: the directory {parent} does not exist.")
    fn = load_factory(args.factory)
    inputs = _load_inputs(inputs_paths)
    opts = _call_options(args)
    before = _done_samples(os.path.join(out, "jacobians") if folder else out) if not args.no_resume else 0
    launched = launch_world() > 1
    if launched and launch_rank() != 0:  # one of torchrun's processes: rank 0 reports (see [Sharded dumps])
        run = compute if "part" not in opts else hessian
        run(fn, inputs, out=out, resume=not args.no_resume, progress=False, **opts)
        return 0
    # Under torchrun rank 0 plans inside the call, after every process has joined, and logs the plan.
    p = plan(fn, inputs, out=out, **opts) if not launched else None
    if launched:
        print(f"sharded dump: {launch_world()} processes (torchrun), one plan made by rank 0", flush=True)
    elif before:
        print(f"plan: the chunks and AD plan recorded in {out}.chunkjac.json (resuming)", flush=True)
    else:
        print(f"plan: {p}", flush=True)
        if args.project is not None:
            size = p.batch_size * math.prod(p.out_shape) * args.project * (2 if args.project_dtype == "float16" else
                                                                          p.dtype.itemsize)
        elif p.part is None:
            size = p.batch_size * math.prod(p.out_shape) * sum(p.in_numels) * p.dtype.itemsize
        else:
            size = sum(math.prod(s) for s in p.part.result_shapes(p.batch_size, p.out_shape)) * p.dtype.itemsize
        print(f"      the estimate is compute only; writing {format_bytes(size)} to {out} comes on top "
              "(at the disk's speed)", flush=True)
    t = time.perf_counter()
    with warnings.catch_warnings(), _MemoryWatch() as watch:
        warnings.simplefilter("ignore", CouplingWarning)  # plan() above has shown it
        run = compute if "part" not in opts else hessian
        # (the decision plan() made is remembered: the run reuses it and times its trials on its first chunks)
        J = run(fn, inputs, out=out, resume=not args.no_resume, progress=not args.quiet, **opts)
    dt = time.perf_counter() - t
    first = next(iter(J.values())) if isinstance(J, dict) else J
    ran = first.shape[0] - before
    if isinstance(J, dict):
        print(f"wrote: {out}  one .npy per parameter, {first.dtype}:")
        for k, v in J.items():
            print(f"  {os.path.join(out, k + '.npy')}  {tuple(v.shape)}")
    else:
        print(f"wrote: {out}  {tuple(J.shape)} {J.dtype}  (np.load({out!r}, mmap_mode='r'))")
    done = f" ({before:,} were already on disk)" if before else ""
    rate = f", {ran / dt:,.0f} samples/s" if ran else ""
    print(f"time: {dt:.2f} s for {ran:,} samples{rate}{done}")
    print(f"peak memory: {watch.report(args.device)}")
    return 0


def _done_samples(out: str) -> int:
    from . import _manifest
    try:
        m = _manifest.load(out)
    except _manifest.ManifestError:
        return 0  # compute() reports it
    return 0 if m is None else sum(b - a for i, (a, b) in enumerate(m["chunks"]) if i in m["done"])


def _add_call_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("factory", metavar="FACTORY",
                   help="package.module:callable or path/to/file.py:callable; called with no arguments, it "
                        "returns the model or function")
    p.add_argument("--budget", default=None, help="memory chunkjac may use on the compute device: 20GB, 512MiB, "
                                                  "80%% (default: half of the free memory)")
    p.add_argument("--wrt", default=None, help="input index (default 0), parameter name, or 'params' (every trainable parameter: OUT is a "
                        "folder with one .npy per parameter)")
    p.add_argument("--output", default=None, help="index or key of the output, when fn returns several")
    p.add_argument("--mode", default="auto", choices=["auto", "reverse", "forward"], help="AD mode (default auto)")
    p.add_argument("--coupling", default="auto", choices=["auto", "independent", "coupled", "unsplittable"],
                   help="which samples interact (default auto: checked)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: where the model is)")
    p.add_argument("--chunk-size", type=_positive_int, default=None, help="samples per chunk (default: planned)")
    p.add_argument("--part", default=None, choices=["laplacian", "diagonal", "full"],
                   help="second derivatives instead of the Jacobian: the Laplacian (B, *out), the Hessian's "
                        "diagonal (B, *out, *in) or the full Hessian (B, *out, *in, *in)")
    p.add_argument("--project", type=_positive_int, default=None, metavar="DIM",
                   help="the rows projected to DIM numbers (chunkjac.Projection): with --wrt params, per-sample "
                        "gradients for data attribution in one (B, *out, DIM) .npy")
    p.add_argument("--seed", type=int, default=0, help="with --project: the projection's seed (default 0)")
    p.add_argument("--projection", default="rademacher", choices=["rademacher", "gaussian", "kronecker"],
                   help="with --project: the projection's kind (default rademacher)")
    p.add_argument("--project-dtype", default=None, choices=["float16", "float32"],
                   help="with --project: the dtype of the dump (default: the model's)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="refuse coupled runs predicted to take longer (default 3600)")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True): the plan is chosen without timing, so every "
                        "run and process computes the same bits")


def _values_that_start_with_a_dash(argv: list[str]) -> list[str]:
    """``--budget -3GB``: argparse takes -3GB for an option and says "expected one argument"; joined as
    ``--budget=-3GB`` it reaches the budget's own check, which says what a budget looks like."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--budget", "--max-seconds", "--chunk-size") and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chunkjac",
        description="Exact per-sample Jacobians of PyTorch models over very large batches.",
        epilog="Example: chunkjac dump model.py:make x.npy jac.npy --budget 2GB   (then kill it and run it again: "
               "it resumes)")
    parser.add_argument("--version", action="version", version=f"chunkjac {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", help="per-sample Jacobians of a PINN-style MLP over a large batch of points",
        description="Builds a PINN-style MLP (3 -> 128 -> 128 -> 128 -> 3, tanh), computes the "
                    "per-sample Jacobians of SAMPLES random points and prints shape, time and throughput.")
    demo.add_argument("--samples", type=_positive_int, default=1_000_000, help="number of points (default 1e6)")
    demo.set_defaults(run=_demo)
    dump = sub.add_parser(
        "dump", help="write the per-sample Jacobians of a dataset to a .npy file (resumable)",
        usage="chunkjac dump FACTORY INPUTS [INPUTS ...] OUT [options]",
        description="Computes J[i] = d fn(x)_i / d x_i for every sample of the INPUTS (.npy files, one per "
                    "positional input of fn, read chunk by chunk) and writes them to OUT, a .npy file created at "
                    "its final shape and filled chunk by chunk. A manifest next to it (OUT.chunkjac.json) records "
                    "the finished chunks: run the same command again after a crash or a kill and it resumes; a "
                    "finished dump is not redone. A dump written by a different model or inputs is refused.")
    _add_call_options(dump)
    dump.add_argument("paths", nargs="+", metavar="INPUTS... OUT", help="input .npy files, then the .npy to write")
    dump.add_argument("--no-resume", action="store_true", help="start OUT over instead of resuming it")
    dump.add_argument("--quiet", action="store_true", help="no progress bar")
    dump.set_defaults(run=_dump_cmd)
    pl = sub.add_parser("plan", help="print what dump would do, without computing",
                        usage="chunkjac plan FACTORY INPUTS [INPUTS ...] [options]",
                        description="Probes fn on a few samples and prints the plan: strategy, AD mode, chunks, "
                                    "predicted peak memory and time.")
    _add_call_options(pl)
    pl.add_argument("inputs", nargs="+", metavar="INPUTS", help="input .npy files, one per positional input")
    pl.set_defaults(run=_plan_cmd)
    args = parser.parse_args(_values_that_start_with_a_dash(sys.argv[1:] if argv is None else list(argv)))
    if getattr(args, "deterministic", False):
        torch.use_deterministic_algorithms(True)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    log = logging.getLogger("chunkjac")  # "resuming: ..." and "complete: nothing to do" go to stderr
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    level, log.level = log.level, logging.INFO
    try:
        return args.run(args)
    except UsageError as e:
        print(f"chunkjac: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a dump says what it saved (see _call.run)
        print(str(e) if str(e).startswith("chunkjac:") else "chunkjac: interrupted.", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        # chunkjac's errors say what to do. Anything else was most likely raised by fn on these
        # inputs (a wrong width, a dtype it does not take): one paragraph too, unless asked.
        if os.environ.get("CHUNKJAC_TRACEBACK"):
            raise
        notes = "".join(f"\n{n}" for n in getattr(e, "__notes__", ()))
        text = str(e) if str(e).startswith("chunkjac:") else (
            f"chunkjac: error: {type(e).__name__}: {e}{notes}\n(raised while running fn on the inputs; set "
            "CHUNKJAC_TRACEBACK=1 for the traceback)")
        print(text, file=sys.stderr)
        return 2
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
