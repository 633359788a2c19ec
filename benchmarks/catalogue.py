"""Catalogue sweep: chunkjac.compute on every operator and module of PyTorch's own test catalogues.

What it checks. Every sample input of PyTorch's OpInfo database (``op_db``, float64, CPU, ops that
support autograd) and ModuleInfo database (``module_db``, training and eval) is read as a batch:
the sample's first tensor x is the batched input (batch dim 0, B = x.shape[0]); everything else is
shared. For op samples whose positional args hold tensors, a second variant passes those args to
chunkjac as extra inputs with ``in_dims=None``; for modules, the forward's other args always travel
that way. The reference is the diagonal of the full Jacobian from
``torch.autograd.functional.jacobian`` (shape (B, *out, B, *in)): J_ref[i] = full[i, ..., i, ...].
chunkjac must return exactly that (rtol 1e-6, atol 1e-8 times the largest |J_ref|, non-finite
entries at the same positions with the same values), warning CouplingWarning when samples interact,
or raise an error whose message starts with "chunkjac:". Each case is classified:

    exact      matches the reference
    refused    raised an exception whose message starts with "chunkjac:" (a clear error)
    raw_error  any other exception escaped chunkjac (a defect)
    wrong      returned a result that differs from the reference (the worst defect)
    crash      the worker process died (segfault, abort, out-of-memory kill)
    hang       the case ran past --timeout seconds
    skipped    not applicable (the reason says why; "not a batch: ..." when the output's leading
               dim does not hold the samples, or the output is not a single float tensor)

Every case also records whether chunkjac warned CouplingWarning (``warned``), whether the reference
has nonzero off-diagonal blocks (``coupled_ref``) and whether the function is random (two calls on
the same input differ: then no single exact answer exists).

Crash safety: cases run in worker processes (``--worker``, reading one op or module at a time from
stdin and streaming one JSON line per case). The parent survives segfaults and timeouts: it marks the
case that was running as ``crash`` or ``hang``, starts a fresh worker and resumes after that case.
(To see it work: CATALOGUE_CRASH_ON=<case key substring> or CATALOGUE_HANG_ON=... make a worker
segfault or sleep on the matching cases.)

Run it from the repository root (torch's test catalogues need the ``expecttest`` package):

    python benchmarks/catalogue.py                     # everything, 2 workers (about an hour on 2 cores)
    python benchmarks/catalogue.py --quick             # a representative subset, under 3 minutes (CI)
    python benchmarks/catalogue.py --ops --filter conv # only ops whose name contains "conv"
    python benchmarks/catalogue.py --modules --limit 10 --out /tmp/mods.jsonl
    python benchmarks/catalogue.py --summary /tmp/mods.jsonl   # re-print the summary of a past run

Output: a JSON-lines file (``--out``, default $TMPDIR/chunkjac_catalogue.jsonl), one object per case (kind, name,
variant, sample, shapes, class, message, warned, coupled_ref, random, seconds, ...), and a summary
on stdout: counts per class, the crash/hang/wrong/raw_error cases grouped by message, refusals on
independent samples, refusal messages by frequency and the most common skip reasons. The exit status
is 1 when any case is a crash, hang, wrong or raw_error, else 0.
"""
from __future__ import annotations

import argparse
import collections
import copy
import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings

MAGIC = "@@catalogue@@ "          # worker protocol lines on stdout start with this
DEFECTS = ("crash", "hang", "wrong", "raw_error")
CLASSES = ("exact", "refused", "skipped") + DEFECTS
RTOL, ATOL = 1e-6, 1e-8
MAX_REF_ELEMENTS = 20_000_000      # full Jacobian entries (B*out x B*in) the reference may build
VECTORIZE_ROWS = 2_000             # above this many output entries, the reference uses vmap'd VJPs

# --quick: elementwise, reductions, matrix products, scans and sorts along dims, indexing, broadcasting,
# convolutions, normalizations, random ops, linear algebra; modules with and without batch coupling.
QUICK_OPS = {"sin", "abs", "sqrt", "add", "mul", "pow", "clamp", "matmul", "bmm", "einsum", "sum", "mean", "amax",
             "cumsum", "cumprod", "sort", "topk", "flip", "roll", "where", "index_select", "gather", "masked_fill",
             "expand", "reshape", "transpose", "linalg.det", "linalg.solve", "cdist", "fft.fft",
             "nn.functional.softmax", "nn.functional.linear", "nn.functional.conv2d", "nn.functional.pad",
             "nn.functional.layer_norm", "nn.functional.batch_norm", "nn.functional.dropout",
             "nn.functional.normalize", "nn.functional.embedding", "nn.functional.interpolate",
             # cases chunkjac refuses or that need care: shared args that broadcast over the batch, a wrong
             # forward-mode formula, a non-differentiable op, NaN from 0 * NaN in reverse mode, sparse outputs
             "addmm", "squeeze", "trapezoid", "nn.functional.max_unpool2d", "scatter", "__rpow__", "to_sparse"}
QUICK_MODULES = {"nn.Linear", "nn.Conv2d", "nn.ConvTranspose1d", "nn.BatchNorm1d", "nn.LayerNorm", "nn.GroupNorm",
                 "nn.InstanceNorm1d", "nn.Softmax", "nn.MaxPool2d", "nn.LSTM", "nn.GRUCell", "nn.MultiheadAttention",
                 "nn.TransformerEncoderLayer", "nn.Embedding", "nn.PReLU", "nn.MSELoss"}


# ----------------------------------------------------------------------------------------------------
# The catalogues (imported by the parent to list units, and by each worker to run them)
# ----------------------------------------------------------------------------------------------------

def catalogues():
    """(op_db, module_db), importing torch's test helpers only when needed (about 7 s)."""
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import module_db
    return op_db, module_db


def op_name(op) -> str:
    return op.name + (f".{op.variant_test_name}" if op.variant_test_name else "")


def list_units(args) -> list:
    """The ops and modules to run, as (kind, index in its database, name)."""
    import torch
    op_db, module_db = catalogues()
    both = not (args.ops or args.modules)
    units = []
    if args.ops or both:
        for i, op in enumerate(op_db):
            if not op.supports_autograd or torch.float64 not in op.supported_dtypes("cpu"):
                continue
            if args.quick and op.name not in QUICK_OPS:
                continue
            units.append(("op", i, op_name(op)))
    if args.modules or both:
        for i, mi in enumerate(module_db):
            if args.quick and mi.name not in QUICK_MODULES:
                continue
            units.append(("module", i, mi.name))
    if args.filter:
        units = [u for u in units if args.filter in u[2]]
    return units[: args.limit] if args.limit else units


# ----------------------------------------------------------------------------------------------------
# One case (in a worker)
# ----------------------------------------------------------------------------------------------------

def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def where(e: BaseException) -> str:
    """The innermost chunkjac frame of the traceback (file:line function), else the innermost frame."""
    frames = traceback.extract_tb(e.__traceback__)
    ours = [f for f in frames if os.sep + "chunkjac" + os.sep in f.filename]
    f = (ours or frames or [None])[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" if f else ""


def shape_of(v):
    import torch
    if isinstance(v, torch.Tensor):
        return list(v.shape)
    if isinstance(v, (tuple, list)):
        return [shape_of(a) for a in v]
    return type(v).__name__


def reference(f, x, forward=False):
    """(diagonal blocks J_ref of shape (B, *out, *in), whether off-diagonal blocks hold finite nonzeros,
    whether they hold non-finite values). Reverse mode (one VJP per output entry) unless ``forward``."""
    import torch
    y = f(x)
    if y.numel() == 0 or x.numel() == 0:  # (functional.jacobian cannot stack zero rows or columns)
        return torch.zeros(*y.shape, *x.shape[1:], dtype=y.dtype), False, False
    if forward:
        full = torch.autograd.functional.jacobian(f, x, vectorize=True, strategy="forward-mode")
    else:
        full = torch.autograd.functional.jacobian(f, x, vectorize=y.numel() > VECTORIZE_ROWS)
    b, n_out, n_in = x.shape[0], y[0].numel(), x[0].numel()
    blocks = full.reshape(b, n_out, b, n_in)
    i = torch.arange(b)
    diag = blocks[i, :, i].reshape(*y.shape, *x.shape[1:])
    off = blocks.clone()
    off[i, :, i] = 0
    # Non-finite off-diagonal entries alone do not make samples interact: a reverse-mode reduction over
    # a broadcast dim multiplies the zero cotangents of other samples by NaN/inf (0 * NaN = NaN).
    finite = torch.isfinite(off)
    return diag, bool((off[finite] != 0).any()), bool((~finite).any())


def compare(j, ref) -> str:
    """'' when j matches ref, else what differs (prefixed 'non-finite:' or 'values:' or 'shape:')."""
    import torch
    if tuple(j.shape) != tuple(ref.shape):
        return f"shape: got {tuple(j.shape)}, reference {tuple(ref.shape)}"
    j = j.detach().to(torch.float64)
    fin_j, fin_r = torch.isfinite(j), torch.isfinite(ref)
    nonfin = ~fin_r
    same_nonfinite = torch.equal(fin_j, fin_r) and bool(
        ((j[nonfin] == ref[nonfin]) | (j[nonfin].isnan() & ref[nonfin].isnan())).all())
    if not same_nonfinite:
        bad = (fin_j != fin_r) | (nonfin & ~((j == ref) | (j.isnan() & ref.isnan())))
        flat_j, flat_r = j.flatten(), ref.flatten()
        pos = int(bad.flatten().nonzero()[0])
        return (f"non-finite: {int(bad.sum())} of {ref.numel()} entries differ in finiteness "
                f"(e.g. got {flat_j[pos].item()}, reference {flat_r[pos].item()})")
    if not fin_r.any():
        return ""
    rj, rr = j[fin_r], ref[fin_r]
    scale = max(1.0, float(rr.abs().max()))
    err = (rj - rr).abs()
    bad = err > ATOL * scale + RTOL * rr.abs()
    if bad.any():
        pos = int(err.argmax())
        return (f"values: {int(bad.sum())} of {ref.numel()} entries differ, max abs error {float(err.max()):.3g} "
                f"(got {rj[pos].item():.6g}, reference {rr[pos].item():.6g}, scale {scale:.3g})")
    return ""


def run_case(rec: dict, call, f, x) -> dict:
    """Fill rec: call() runs chunkjac.compute; f(x) is the same function of the batched input alone."""
    import torch
    import chunkjac
    if not isinstance(x, torch.Tensor):
        return dict(rec, cls="skipped", message=f"input is {type(x).__name__}, not a tensor")
    rec["in_shape"] = list(x.shape)
    if x.dim() == 0 or not x.is_floating_point() or x.shape[0] == 0:
        return dict(rec, cls="skipped", message=f"input is a {x.dtype} tensor of shape {tuple(x.shape)}, "
                                                "not a batch of float samples")
    try:
        y2 = f(x)           # a random fn gives another draw here; the seeded calls below share one
        torch.manual_seed(1)
        y = f(x)
    except Exception as e:
        return dict(rec, cls="skipped", message=f"fn fails on the sample itself: {first_line(e)}")
    rec["out_shape"] = shape_of(y)
    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
        what = f"a {y.dtype} tensor" if isinstance(y, torch.Tensor) else type(y).__name__
        return dict(rec, cls="skipped", message=f"not a batch: the output is {what}, not a single float tensor")
    if y.dim() == 0 or y.shape[0] != x.shape[0]:
        return dict(rec, cls="skipped", message=f"not a batch: output shape {tuple(y.shape)} does not lead "
                                                f"with B={x.shape[0]}")
    d1, d2 = (v.to_dense() if v.layout != torch.strided else v for v in (y, y2))
    rec["random"] = not (d1.shape == d2.shape and torch.equal(d1.isnan(), d2.isnan())
                         and bool((d1.nan_to_num() == d2.nan_to_num()).all()))
    if x.layout != torch.strided or y.layout != torch.strided:
        rec["sparse"] = True
    if y.numel() * x.numel() > MAX_REF_ELEMENTS:
        return dict(rec, cls="skipped", message=f"too large for the reference ({y.numel()} x {x.numel()})")

    # chunkjac
    t0 = time.perf_counter()
    j, error = None, None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.manual_seed(1)
            j = call()
        except Exception as e:  # noqa: BLE001 - every escape is classified
            error = e
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    rec["warned"] = any(issubclass(w.category, chunkjac.CouplingWarning) for w in caught)
    rec["warnings"] = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}" for w in caught
                              if str(w.message).startswith("chunkjac")})
    chunkjac.probe_cache.clear()
    if error is not None:
        msg = str(error).strip()
        rec.update(cls="refused" if msg.startswith("chunkjac:") else "raw_error",
                   message=first_line(error), where=where(error))
    elif not isinstance(j, torch.Tensor):
        rec.update(cls="wrong", message=f"returned {type(j).__name__}, not a tensor")

    # the reference
    try:
        torch.manual_seed(1)
        ref, rec["coupled_ref"], nonfinite_off = reference(f, x)
        if nonfinite_off:
            rec["offdiag_nonfinite"] = True
    except Exception as e:
        if rec.get("cls") in ("refused", "raw_error"):
            rec["note"] = f"the reference fails too: {first_line(e)}"
            return rec
        return dict(rec, cls="skipped", message=f"reference failed: {first_line(e)}",
                    chunkjac="returned" if j is not None else rec.get("cls"))
    if "cls" in rec:
        return rec
    diff = compare(j, ref)
    if diff.startswith("non-finite:"):
        # NaN/inf where the two AD modes legitimately differ (0 * NaN in a reverse-mode reduction over a
        # broadcast dim, an inf times a zero tangent): an answer that matches the forward-mode
        # reference exactly counts, with a note.
        try:
            torch.manual_seed(1)
            if not compare(j, reference(f, x, forward=True)[0]):
                rec["note"] = f"matches the forward-mode reference; the reverse-mode one differs: {diff}"
                diff = ""
        except Exception:
            pass
    rec.update(cls="wrong" if diff else "exact", message=diff)
    return rec


# ----------------------------------------------------------------------------------------------------
# The cases of one op / module (in a worker)
# ----------------------------------------------------------------------------------------------------

def op_cases(op, n_samples):
    """(key, record, call, f, x) for the first n samples of an OpInfo, lazily."""
    import torch
    import chunkjac
    name = op_name(op)
    torch.manual_seed(0)
    # The first n samples whose input can be a batch (a non-empty float tensor of dim >= 1): many ops
    # list 0-d samples first. Only when none of the first 10 n is, the first sample runs (and is skipped).
    samples = list(itertools.islice(op.sample_inputs("cpu", torch.float64, requires_grad=False), 10 * n_samples))
    usable = [(k, s) for k, s in enumerate(samples) if isinstance(s.input, torch.Tensor) and s.input.dim() >= 1
              and s.input.is_floating_point() and s.input.shape[0] > 0]
    for k, s in (usable[:n_samples] or list(enumerate(samples))[:1]):
        x, args, kwargs = s.input, tuple(s.args), dict(s.kwargs)

        def f(z, args=args, kwargs=kwargs):
            return op(z, *args, **kwargs)

        base = dict(kind="op", name=name, sample=k, args=shape_of(args), kwargs=sorted(kwargs))
        yield (f"op:{name}#{k}:batched", dict(base, variant="batched"),
               lambda f=f, x=x: chunkjac.compute(f, x), f, x)
        if any(isinstance(a, torch.Tensor) for a in args):
            def g(z, *a, kwargs=kwargs):
                return op(z, *a, **kwargs)
            yield (f"op:{name}#{k}:shared_args", dict(base, variant="shared_args"),
                   lambda g=g, x=x, args=args: chunkjac.compute(g, (x, *args), in_dims=(0,) + (None,) * len(args)),
                   f, x)


def module_cases(mi, n_samples):
    """(key, record, call, f, x) for the first n inputs of a ModuleInfo, in training and in eval mode."""
    import torch
    import chunkjac
    for training in (True, False):
        variant = "train" if training else "eval"
        torch.manual_seed(0)
        inputs = mi.module_inputs_func(mi, device="cpu", dtype=torch.float64, requires_grad=False,
                                       training=training)[:n_samples]
        for k, mod_in in enumerate(inputs):
            key = f"module:{mi.name}#{k}:{variant}"
            rec = dict(kind="module", name=mi.name, variant=variant, sample=k, desc=mod_in.desc)
            fwd = mod_in.forward_input
            if fwd is None or not (fwd.args or fwd.kwargs):
                yield key, dict(rec, cls="skipped", message="no forward input"), None, None, None
                continue
            if fwd.args:
                x, rest, kwargs = fwd.args[0], tuple(fwd.args[1:]), dict(fwd.kwargs)
                m_call = lambda m, z, r, kw: m(z, *r, **kw)  # noqa: E731
            else:  # the input given by keyword (nn.Linear's forward_input is input=...)
                kwargs = dict(fwd.kwargs)
                x = kwargs.pop(next(iter(kwargs)))
                rest = ()
                m_call = lambda m, z, r, kw, name=next(iter(fwd.kwargs)): m(*r, **{name: z}, **kw)  # noqa: E731
            rec.update(args=shape_of(rest), kwargs=sorted(kwargs))
            try:
                torch.manual_seed(0)
                c = mod_in.constructor_input
                m = mi.module_cls(*c.args, **c.kwargs).to(dtype=torch.float64).train(training)
                # One forward first: lazy modules materialize their parameters; and is the output a tuple?
                with torch.no_grad():
                    pick = 0 if isinstance(m_call(m, x, rest, kwargs), (tuple, list)) else None
            except Exception as e:
                yield key, dict(rec, cls="skipped", message=f"the module fails on the sample itself: {first_line(e)}"), \
                    None, None, None
                continue
            m_ref = copy.deepcopy(m)  # chunkjac's calls must not change what the reference sees

            def f_ref(z, m=m_ref, rest=rest, kwargs=kwargs, m_call=m_call):
                out = m_call(m, z, rest, kwargs)
                return out[0] if isinstance(out, (tuple, list)) else out

            if rest or kwargs or not fwd.args:
                def call(m=m, x=x, rest=rest, kwargs=kwargs, pick=pick, m_call=m_call):
                    return chunkjac.compute(lambda z, *r: m_call(m, z, r, kwargs), (x, *rest),
                                            in_dims=(0,) + (None,) * len(rest), output=pick)
            else:
                def call(m=m, x=x, pick=pick):
                    return chunkjac.compute(m, x, output=pick)
            yield key, rec, call, f_ref, x


def worker() -> None:
    """Read units (JSON lines) from stdin; stream MAGIC-prefixed JSON lines: ready, start, case, done."""
    import torch
    torch.set_num_threads(1)
    op_db, module_db = catalogues()
    warnings.filterwarnings("ignore")  # the catalogues are noisy; run_case records chunkjac's own warnings

    def say(obj):
        sys.stdout.write(MAGIC + json.dumps(obj) + "\n")
        sys.stdout.flush()

    say({"ready": True})
    for line in sys.stdin:
        task = json.loads(line)
        kind, index = task["unit"]
        skip = set(task["skip"])
        try:
            if kind == "op":
                cases = op_cases(op_db[index], task["samples"])
            else:
                cases = module_cases(module_db[index], task["samples"])
            for key, rec, call, f, x in cases:
                if key in skip:
                    continue
                say({"start": key})
                if os.environ.get("CATALOGUE_CRASH_ON") and os.environ["CATALOGUE_CRASH_ON"] in key:
                    os.kill(os.getpid(), signal.SIGSEGV)  # to test the parent's crash handling
                if os.environ.get("CATALOGUE_HANG_ON") and os.environ["CATALOGUE_HANG_ON"] in key:
                    time.sleep(3600)                      # to test the parent's timeout handling
                rec["key"] = key
                if call is not None:  # (None: rec already says why it is skipped)
                    try:
                        rec = run_case(rec, call, f, x)
                    except Exception as e:  # a bug of this script, or an op that fails strangely
                        rec.update(cls="skipped", message=f"harness error: {first_line(e)}", where=where(e))
                say({"case": rec})
        except Exception as e:  # sample generation failed: one record for the unit
            say({"case": {"key": f"{kind}:{index}:samples", "kind": kind, "name": task["name"], "variant": "-",
                          "sample": -1, "cls": "skipped", "message": f"sample inputs failed: {first_line(e)}"}})
        say({"done": True})


# ----------------------------------------------------------------------------------------------------
# The parent: workers, crash and hang handling, the JSON-lines file
# ----------------------------------------------------------------------------------------------------

class Worker:
    """A ``--worker`` subprocess; messages arrive on a queue (None at end of output)."""

    def __init__(self, slot: int):
        self.stderr = tempfile.TemporaryFile("w+")  # read back when the worker dies
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1, cwd=os.getcwd())
        self.messages = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(MAGIC):
                self.messages.put(json.loads(line[len(MAGIC):]))
        self.messages.put(None)

    def send(self, task: dict):
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()

    def death(self) -> str:
        """Why the process ended: its signal or exit status and the last line of its stderr."""
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            rc = None
        self.stderr.flush()
        self.stderr.seek(0)
        lines = [l.strip() for l in self.stderr.read().splitlines() if l.strip()]
        fatal = next((l for l in lines if "Fatal Python error" in l or "Error" in l or "Abort" in l), "")
        how = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit status {rc}"
        return f"worker died ({how}){': ' + fatal if fatal else ''}"

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.stderr.close()


class Driver:
    def __init__(self, units, args):
        self.pending = collections.deque(
            {"unit": [kind, index], "name": name, "skip": [], "samples": args.samples} for kind, index, name in units)
        self.total = len(units)
        self.args = args
        self.lock = threading.Lock()
        self.records = []
        self.units_done = 0
        self.out = open(args.out, "w")
        self.t0 = time.time()

    def record(self, rec: dict):
        with self.lock:
            self.records.append(rec)
            self.out.write(json.dumps(rec) + "\n")
            self.out.flush()

    def next_task(self):
        with self.lock:
            return self.pending.popleft() if self.pending else None

    def slot(self, n: int):
        w = None
        while (task := self.next_task()) is not None:
            if w is None:
                w = Worker(n)
                if w.messages.get(timeout=300) is None:
                    raise SystemExit(f"a worker failed to start: {w.death()}")
            w.send(task)
            current, done_keys = None, []
            deadline = time.time() + max(self.args.timeout, 120)  # generating the samples
            while True:
                try:
                    msg = w.messages.get(timeout=max(0.1, deadline - time.time()))
                except queue.Empty:
                    msg = "timeout"
                if msg is None or msg == "timeout":
                    reason = w.death() if msg is None else f"no answer after {self.args.timeout:g} s"
                    if msg == "timeout":
                        w.proc.kill()
                    w.kill()
                    w = None
                    key = current or f"{task['unit'][0]}:{task['unit'][1]}:samples"
                    kind, name = task["unit"][0], task["name"]
                    variant, sample = (key.split(":")[-1], int(key.split("#")[-1].split(":")[0])) if current else ("-", -1)
                    self.record({"key": key, "kind": kind, "name": name, "variant": variant, "sample": sample,
                                 "cls": "crash" if msg is None else "hang", "message": reason})
                    if current:  # resume after the case that killed the worker
                        with self.lock:
                            self.pending.appendleft(dict(task, skip=task["skip"] + done_keys + [current]))
                    else:
                        self._progress(task)
                    break
                if "start" in msg:
                    current, deadline = msg["start"], time.time() + self.args.timeout
                elif "case" in msg:
                    done_keys.append(msg["case"]["key"])
                    current = None
                    self.record(msg["case"])
                elif "done" in msg:
                    self._progress(task)
                    break
        if w is not None:
            w.proc.stdin.close()
            w.kill()

    def _progress(self, task):
        with self.lock:
            self.units_done += 1
            counts = collections.Counter(r["cls"] for r in self.records)
        print(f"[{self.units_done}/{self.total} {time.time() - self.t0:6.0f}s] {task['name']:<40} "
              + " ".join(f"{c}={counts[c]}" for c in CLASSES if counts[c]), file=sys.stderr, flush=True)

    def run(self):
        threads = [threading.Thread(target=self.slot, args=(n,)) for n in range(self.args.jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.out.close()
        return self.records


# ----------------------------------------------------------------------------------------------------
# The summary
# ----------------------------------------------------------------------------------------------------

def normalized(msg: str) -> str:
    """A message with its numbers and shapes blanked, to group cases that fail the same way."""
    msg = re.sub(r"\(([\d, ]*)\)|\[([\d, ]*)\]", "(..)", msg or "")
    return re.sub(r"-?\d+(\.\d+)?(e-?\d+)?", "N", msg)[:150]


def summarize(records: list, out=sys.stdout) -> None:
    counts = collections.Counter(r["cls"] for r in records)
    p = lambda *a: print(*a, file=out)  # noqa: E731
    p(f"\n{len(records)} cases: " + ", ".join(f"{c} {counts[c]}" for c in CLASSES))
    for kind in ("op", "module"):
        c = collections.Counter(r["cls"] for r in records if r["kind"] == kind)
        if c:
            p(f"  {kind + 's':<8} " + ", ".join(f"{k} {c[k]}" for k in CLASSES))
    ran = [r for r in records if "coupled_ref" in r]
    if ran:
        interact = lambda r: any("samples interact" in w for w in r.get("warnings", []))  # noqa: E731
        mixes = lambda r: any("mixes samples" in w for w in r.get("warnings", []))  # noqa: E731
        p(f"coupling: reference coupled in {sum(r['coupled_ref'] for r in ran)} of {len(ran)} graded cases; "
          f"'samples interact' warnings {sum(map(interact, ran))} (on independent samples: "
          f"{sum(interact(r) and not r['coupled_ref'] for r in ran)}); 'mixes samples' warnings "
          f"{sum(map(mixes, ran))}; coupled without a warning: {sum(r['coupled_ref'] and not r['warned'] for r in ran)} "
          f"(exact {sum(r['coupled_ref'] and not r['warned'] and r['cls'] == 'exact' for r in ran)}); "
          f"random functions {sum(r.get('random', False) for r in ran)}")
        fwd = [r for r in records if r["cls"] == "exact" and "forward-mode reference" in r.get("note", "")]
        if fwd:
            p("exact only against the forward-mode reference (NaN/inf from the reverse-mode one): "
              + ", ".join(r["key"] for r in fwd))
    for cls in DEFECTS:
        cases = [r for r in records if r["cls"] == cls]
        if not cases:
            continue
        p(f"\n== {cls} ({len(cases)}) ==")
        groups = collections.defaultdict(list)
        for r in cases:
            groups[normalized(r.get("message", "")) + " @ " + re.sub(r":\d+", "", r.get("where", ""))].append(r)
        for _, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            p(f"  [{len(rs)}] {rs[0].get('message', '')[:200]}" + (f"  ({rs[0]['where']})" if rs[0].get("where") else ""))
            for r in rs:
                flags = "".join([" coupled" if r.get("coupled_ref") else "", " warned" if r.get("warned") else "",
                                 " random" if r.get("random") else "", " sparse" if r.get("sparse") else "",
                                 " (reference fails too)" if r.get("note") else ""])
                p(f"      {r['key']}  in={r.get('in_shape')} out={r.get('out_shape')}{flags}")
    maybe = [r for r in records if r["cls"] == "refused" and r.get("coupled_ref") is False and not r.get("random")]
    if maybe:
        p(f"\n== refused although the reference shows independent samples ({len(maybe)}) ==")
        groups = collections.defaultdict(list)
        for r in maybe:
            groups[normalized(r["message"])[:110]].append(r)
        for msg, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            p(f"  [{len(rs)}] {rs[0]['message'][:200]}")
            p("      " + ", ".join(f"{r['name']}#{r['sample']}:{r['variant']} in={r.get('in_shape')}" for r in rs))
    for cls, top in (("refused", 40), ("skipped", 15)):
        groups = collections.Counter(normalized(r.get("message", "")) for r in records if r["cls"] == cls)
        if groups:
            p(f"\n== {cls}: most common messages ==")
            for msg, n in groups.most_common(top):
                p(f"  {n:5d}  {msg}")


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ops", action="store_true", help="only op_db (default: op_db and module_db)")
    ap.add_argument("--modules", action="store_true", help="only module_db")
    ap.add_argument("--filter", help="only ops/modules whose name contains this substring")
    ap.add_argument("--limit", type=int, help="at most this many ops/modules")
    ap.add_argument("--samples", type=int, default=3, help="sample inputs per op (per module and mode); default 3")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "chunkjac_catalogue.jsonl"),
                    help="the JSON-lines file of every case (default: chunkjac_catalogue.jsonl in the temp dir)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--quick", action="store_true", help="a representative subset, under 3 minutes")
    ap.add_argument("--summary", metavar="JSONL", help="only print the summary of an earlier run's file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker()
    if args.summary:
        with open(args.summary) as fh:
            return summarize([json.loads(l) for l in fh if l.strip()])
    units = list_units(args)
    print(f"{len(units)} ops/modules, up to {args.samples} samples each, {args.jobs} workers -> {args.out}",
          file=sys.stderr)
    t0 = time.time()
    records = Driver(units, args).run()
    summarize(records)
    print(f"\n{time.time() - t0:.0f} s; every case in {args.out}")
    return 1 if any(r["cls"] in DEFECTS for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
