"""The benchmark suite: workloads x methods, each method in a fresh process under one memory cap,
rounds interleaved, medians after a warm-up, peak memory, correctness on a slice, a timeout per
method. Writes JSON lines, a markdown table and (with matplotlib, the `bench` extra) PNG charts.

    python -m benchmarks [--quick] [--device cpu|cuda] [--rounds 3] [--out DIR] [WORKLOAD-SUBSTRING ...]

Per (workload, method, round) one child process builds the workload (benchmarks/workloads.py), runs
the method once (the warm-up), then once more, timed, while a thread samples its resident memory,
and checks the result against an independent reference on its first 64 samples. Peak = the highest
resident memory during the timed call above the child's level before the warm-up (on CUDA: torch.
cuda.max_memory_allocated over the allocated level); the result counts for every method. A child whose
memory grows past --cap-gb is stopped and reported as "over the memory cap": an out-of-memory is a
result, not a crash. Methods marked extrapolated (per-sample loops) run on 200 samples, scaled.

Outputs, for device D, under --out (default docs/results; --quick: a temporary folder):
D.jsonl (every record), D.md (the table: median s, x chunkjac's time, peak MB, relative error;
for first-order workloads chunkjac's ratio to the ideal of one forward and min(in, out) batched
products with no chunking), D-time.png, D-memory.png, D-scaling.png (the PINN MLP from 10^3 to 10^7
samples under a 1 GB budget: time and peak memory of chunkjac and the peers).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# (workload, samples, quick samples or None when not in --quick, timeout s per method)
QUICK_METHODS = 3  # --quick: chunkjac and the first two peers of each workload
FULL = [
    ("seed000", 1_000_000, None, 120),
    ("seed001_sin", 1_000_000, 100_000, 300),
    ("seed002_seq", 100_000, None, 300),
    ("pinn", 100_000, 10_000, 300),
    ("mlp784", 10_000, None, 300),
    ("pinn256_1GB", 1_000_000, None, 600),
    ("attention_coupled", 1_024, 128, 300),
    ("attention_groups32", 1_024, None, 300),
    ("laplacian", 100_000, 5_000, 300),
    ("hessian", 100_000, None, 300),
    ("params_conv", 256, 32, 300),
    ("grads_ce", 1_000, 100, 300),
    ("dump_resume", 1_000_000, 5_000, 600),
    ("projected_dump", 1_000_000, None, 900),
]
ERROR_TOLERANCE = 1e-3  # relative, float32 against the reference
SCALING = [1_000, 10_000, 100_000, 1_000_000, 10_000_000]
QUICK_SCALING = [1_000, 10_000]

CHILD = r'''
import gc, json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
import torch
import workloads
name, n, method, device, cap = sys.argv[2], int(sys.argv[3]), sys.argv[4], torch.device(sys.argv[5]), float(sys.argv[6])
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

start = rss()
peak = [0]
base = [start]
stop = [False]
def watch():
    while not stop[0]:
        r = rss()
        peak[0] = max(peak[0], r)
        if r - start > cap:
            print(json.dumps({"status": "over the memory cap", "cap_gb": cap / 1e9}), flush=True)
            os._exit(3)
        time.sleep(0.002)
threading.Thread(target=watch, daemon=True).start()

def sync():
    if device.type == "cuda":
        torch.cuda.synchronize(device)

try:
    w = workloads.build(name, n, device)
    f = w.methods[method]
    gc.collect()
    sync()
    # The peak of the timed call above the level before the warm-up: memory a method freed after
    # its warm-up often stays in the process (the allocator's heap) and is reused by the timed call,
    # whose own growth would then read 0; one-time work of the warm-up (planning) is not counted.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_cuda = torch.cuda.memory_allocated(device)
    base[0] = rss(); peak[0] = base[0]
    t = time.perf_counter()
    r = f()  # the warm-up: the first call in this fresh process (planning, PyTorch's own first use)
    sync()
    first = time.perf_counter() - t
    slice_ = w.slice(r)
    del r
    gc.collect()
    peak[0] = rss()
    t = time.perf_counter()
    r = f()
    sync()
    dt = time.perf_counter() - t
    stop[0] = True
    mem = (torch.cuda.max_memory_allocated(device) - base_cuda) if device.type == "cuda" else peak[0] - base[0]
    del r
    err = workloads.relative_error(slice_, w.reference())
    k = w.extrapolated.get(method)
    print(json.dumps({"status": "ok", "seconds": dt * (w.samples / k if k else 1), "extrapolated": bool(k),
                      "first_seconds": first * (w.samples / k if k else 1), "peak_mb": mem / 1e6, "error": err}),
          flush=True)
except Exception as e:
    oom = "out of memory" in str(e).lower() or isinstance(e, MemoryError)
    print(json.dumps({"status": "out of memory" if oom else "error", "note": f"{type(e).__name__}: {str(e)[:200]}"}),
          flush=True)
'''


def run_child(name, n, method, device, cap, timeout) -> dict:
    try:
        r = subprocess.run([sys.executable, "-c", CHILD, HERE, name, str(n), method, device, str(cap)],
                           capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    except subprocess.TimeoutExpired:
        return {"status": f"timeout ({timeout} s)"}
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    if r.returncode < 0:
        return {"status": f"killed by signal {-r.returncode} (out of memory)"}
    return {"status": "error", "note": (r.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def methods_of(jobs, device) -> dict[str, list[str]]:
    """The method names of each job's workload, read in one child (building them here would import
    torch and allocate inputs in the parent)."""
    code = (f"import json, sys; sys.path.insert(0, {HERE!r}); import torch, workloads; "
            f"print(json.dumps({{name: list(workloads.build(name, 64, torch.device({device!r})).methods) "
            f"for name in {sorted({j[1] for j in jobs})!r}}}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    if r.returncode:
        raise SystemExit(f"benchmarks: the workloads cannot be built: {r.stderr.strip()[-500:]}")
    names = json.loads(r.stdout.strip().splitlines()[-1])
    return {label: names[name] for label, name, *_ in jobs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a reduced set in under 2 minutes (the tests run it)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    ap.add_argument("--cap-gb", type=float, default=None, help="memory cap per method (default: 16 on the CPU; "
                    "the scaling curve: 2)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-scaling", action="store_true")
    ap.add_argument("--replot", metavar="JSONL", help="no measuring: the table and charts of a run's records")
    ap.add_argument("only", nargs="*")
    a = ap.parse_args(argv)
    rounds = a.rounds or (1 if a.quick else 3)
    if a.replot:
        records = [json.loads(line) for line in open(a.replot)]
        out, dev = os.path.dirname(os.path.abspath(a.replot)), records[0]["device"].split(":")[0]
        table = markdown(records, 1 + max(r["round"] for r in records), records[0]["device"])
        with open(os.path.join(out, f"{dev}.md"), "w") as f:
            f.write(table)
        print(table)
        print("charts:", ", ".join(make_charts(records, out, dev)) or "none (pip install matplotlib)")
        return 0
    out = a.out or (tempfile.mkdtemp(prefix="chunkjac-bench-") if a.quick else os.path.join(ROOT, "docs", "results"))
    os.makedirs(out, exist_ok=True)
    dev = a.device.split(":")[0]
    cap = (a.cap_gb or 16.0) * 1e9
    jobs = []  # (workload label, name, n, timeout, cap)
    for name, n, nq, timeout in FULL:
        if a.quick and nq is None or a.only and not any(s in name for s in a.only):
            continue
        size = nq if a.quick else n
        jobs.append((f"{name} ({size:,})", name, size, timeout, cap))
    if not a.no_scaling and (not a.only or any(s in "scaling" for s in a.only)):
        for n in (QUICK_SCALING if a.quick else SCALING):
            jobs.append((f"scaling ({n:,})", "scaling", n, 900, (a.cap_gb or 2.0) * 1e9))
    records = []
    jsonl = open(os.path.join(out, f"{dev}.jsonl"), "w")
    methods = methods_of(jobs, a.device)
    if a.quick:
        methods = {k: v[:QUICK_METHODS] for k, v in methods.items()}
    t0 = time.perf_counter()
    for r in range(rounds):
        for label, name, n, timeout, c in jobs:
            ms = methods[label]
            for m in ms[r % len(ms):] + ms[:r % len(ms)]:  # the order rotates from round to round
                if r > 0 and any(x["label"] == label and x["method"] == m and x["status"] != "ok" for x in records):
                    continue  # failed once (over the cap, timeout): not again
                rec = {"label": label, "workload": name, "samples": n, "method": m, "round": r, "device": a.device,
                       **run_child(name, n, m, a.device, c, timeout)}
                records.append(rec)
                jsonl.write(json.dumps(rec) + "\n")
                jsonl.flush()
                print(f"[{time.perf_counter() - t0:6.0f} s] {label} · {m}: {_short(rec)}", file=sys.stderr, flush=True)
    jsonl.close()
    table = markdown(records, rounds, a.device)
    with open(os.path.join(out, f"{dev}.md"), "w") as f:
        f.write(table)
    print(table)
    charts = make_charts(records, out, dev)
    print(f"\nwritten: {out}/{dev}.jsonl, {dev}.md" + (f", {', '.join(charts)}" if charts else
                                                       " (no charts: pip install matplotlib, the `bench` extra)"))
    # A peer over the cap is a result; chunkjac failing, or any method disagreeing with the reference, is not.
    bad = [r for r in records if (r["method"].startswith("chunkjac") and r["status"] != "ok")
           or (r["status"] == "ok" and r["error"] > ERROR_TOLERANCE)]
    for r in bad:
        print(f"FAILED: {r['label']} · {r['method']}: {_short(r)}", file=sys.stderr)
    return 1 if bad else 0


def _short(rec) -> str:
    if rec["status"] != "ok":
        return rec["status"] + (f" ({rec['note']})" if rec.get("note") else "")
    return f"{rec['seconds']:.4g} s, {rec['peak_mb']:,.0f} MB, error {rec['error']:.1e}"


def summary(records) -> dict:
    """(label, method) -> median seconds, median peak MB, max error, status, extrapolated."""
    out = {}
    for rec in records:
        out.setdefault((rec["label"], rec["method"]), []).append(rec)
    res = {}
    for key, recs in out.items():
        ok = [r for r in recs if r["status"] == "ok"]
        if not ok:
            res[key] = {"status": recs[0]["status"], "samples": recs[0]["samples"], "workload": recs[0]["workload"]}
            continue
        firsts = [r["first_seconds"] for r in ok if r.get("first_seconds") is not None]
        res[key] = {"status": "ok", "seconds": statistics.median(r["seconds"] for r in ok),
                    "first": statistics.median(firsts) if firsts else None,
                    "peak_mb": statistics.median(r["peak_mb"] for r in ok), "error": max(r["error"] for r in ok),
                    "extrapolated": ok[0]["extrapolated"], "samples": ok[0]["samples"], "workload": ok[0]["workload"]}
    return res


def markdown(records, rounds, device) -> str:
    s = summary(records)
    import torch
    lines = [f"Device {device}, torch {torch.__version__}, {rounds} interleaved round(s), a fresh process per "
             "method and round; median s of the timed call after a warm-up; first call s: the warm-up, the "
             "first call in the fresh process (planning and PyTorch's own first use included); x chunkjac = the "
             "method's time / chunkjac's (above 1: chunkjac is faster); peak MB: memory growth during the call; "
             "error: max relative difference to the reference on the first 64 samples.", "",
             "| workload | method | median s | first call s | x chunkjac | peak MB | error |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    labels = list(dict.fromkeys(r["label"] for r in records))
    for label in labels:
        ours = s.get((label, "chunkjac")) or s.get((label, "chunkjac dump"))
        for (lab, m), v in s.items():
            if lab != label:
                continue
            if v["status"] != "ok":
                lines.append(f"| {label} | {m} | {v['status']} | | | | |")
                continue
            ratio = f"{v['seconds'] / ours['seconds']:.2f}" if ours and ours["status"] == "ok" else ""
            ext = " (extrapolated)" if v["extrapolated"] else ""
            first = "" if v.get("first") is None else f"{v['first']:.4g}"
            lines.append(f"| {label} | {m} | {v['seconds']:.4g}{ext} | {first} | {ratio} | {v['peak_mb']:,.0f} | "
                         f"{v['error']:.0e} |")
    ideal = [(lab, v["seconds"], s[(lab, "chunkjac")]["seconds"]) for (lab, m), v in s.items()
             if m == "ideal" and v["status"] == "ok" and s.get((lab, "chunkjac"), {}).get("status") == "ok"]
    if ideal:
        lines += ["", "chunkjac against the limit (one forward and min(in, out) batched products, no chunking):", "",
                  "| workload | ideal s | chunkjac s | chunkjac / ideal |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {lab} | {i:.4g} | {c:.4g} | {c / i:.2f} |" for lab, i, c in ideal]
    return "\n".join(lines) + "\n"


def make_charts(records, out, dev) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    s = summary(records)
    labels = [lab for lab in dict.fromkeys(r["label"] for r in records) if not lab.startswith("scaling")]
    methods = list(dict.fromkeys(m for (lab, m) in s if lab in labels))
    written = []
    for what, key, unit in (("time", "seconds", "seconds (log scale)"), ("memory", "peak_mb", "peak MB (log scale)")):
        fig, ax = plt.subplots(figsize=(12, 5.5))
        width = 0.8 / max(1, len(methods))
        for j, m in enumerate(methods):
            xs, ys = [], []
            for i, lab in enumerate(labels):
                v = s.get((lab, m))
                if v and v["status"] == "ok" and v[key] > 0:
                    xs.append(i + j * width)
                    ys.append(v[key])
            if xs:
                ax.bar(xs, ys, width, label=m)
        ax.set_yscale("log")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))])
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(f"chunkjac and the peers, {what} per workload ({dev}); missing bars: over the cap or timed out")
        ax.legend(fontsize=7, ncol=3)
        fig.tight_layout()
        path = os.path.join(out, f"{dev}-{what}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(os.path.basename(path))
    scale = {(v["samples"], m): v for (lab, m), v in s.items() if lab.startswith("scaling")}
    if scale:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for m in dict.fromkeys(m for _, m in scale):
            pts = sorted((n, v) for (n, mm), v in scale.items() if mm == m and v["status"] == "ok")
            if pts:
                ax1.plot([n for n, _ in pts], [v["seconds"] for _, v in pts], "o-", label=m)
                ax2.plot([n for n, _ in pts], [v["peak_mb"] for _, v in pts], "o-", label=m)
        for ax, yl in ((ax1, "seconds"), (ax2, "peak MB (result included)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("samples (PINN MLP 3 -> 128 x 3 -> 3)")
            ax.set_ylabel(yl)
            ax.legend(fontsize=8)
        ax1.set_title("time; a line ends where the method went over the memory cap")
        ax2.set_title("peak memory (chunkjac: budget 1 GB)")
        fig.tight_layout()
        path = os.path.join(out, f"{dev}-scaling.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(os.path.basename(path))
    return written


if __name__ == "__main__":
    sys.exit(main())
