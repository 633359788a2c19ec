"""What the benchmark scripts share: one measurement in a fresh Python process; an interleaved run
of several methods in this one, reported as a table of medians, ratios and peaks."""
import json
import statistics
import subprocess
import sys
import time


def run_child(child: str, args: list, timeout: float, env=None) -> dict:
    """Run ``python -c child *args``; its last stdout line that is a JSON object is the record.
    A process killed by a signal (the kernel's out-of-memory killer) is reported as such."""
    r = subprocess.run([sys.executable, "-c", child, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode < 0:
        return {"seconds": None, "note": f"killed by signal {-r.returncode} (out of memory?)"}
    return json.loads(lines[-1]) if lines else {"seconds": None, "note": r.stderr.strip()[-100:]}


def interleaved_table(name: str, methods: dict, rounds: int) -> None:
    """Time ``methods`` (name -> callable; "chunkjac" first) in ``rounds`` rounds, every method once
    per round in an order rotating from round to round, then print medians, ratios to chunkjac's
    median and the peak memory of one call (chunkjac's profiler-based count, result included)."""
    import torch
    from chunkjac._memory import measure_peak

    times = {k: [] for k in methods}
    for r in range(rounds):
        order = list(methods)[r % len(methods):] + list(methods)[:r % len(methods)]
        for k in order:
            t = time.perf_counter()
            methods[k]()
            times[k].append(time.perf_counter() - t)
    peaks = {}
    for k, f in methods.items():
        peak, result = measure_peak(f, torch.device("cpu"))
        del result  # one method's result at a time: some are gigabytes
        peaks[k] = peak
    base = statistics.median(times["chunkjac"])
    print(f"## {name}")
    print("| method | median s | x chunkjac's time | peak MB |")
    print("| --- | ---: | ---: | ---: |")
    for k in methods:
        t = statistics.median(times[k])
        print(f"| {k} | {t:.3f} | {t / base:.2f} | {peaks[k] / 1e6:,.0f} |")
    print(flush=True)
    return {k: statistics.median(v) for k, v in times.items()}
