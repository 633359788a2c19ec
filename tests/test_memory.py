"""Memory: the budget bounds a fresh process's RSS growth; the live-bytes tracker counts what it should."""
import json
import pathlib
import subprocess
import sys

import torch

from chunkjac._memory import free_bytes, measure_peak

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_rss_growth_of_a_fresh_process_stays_inside_the_budget():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "rss_check.py"), "pinn256", "1e5", "64MB"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["num_chunks"] > 1
    assert rec["predicted_peak"] <= rec["budget"]
    assert rec["rss_growth"] <= rec["budget"] + rec["result_bytes"], rec


def test_tracker_counts_new_storages_and_not_existing_ones():
    x = torch.randn(1000, 100)  # 400 kB

    def work():
        a = x * 2           # +400 kB
        b = a + 1           # +400 kB, peak 800 kB
        del a
        c = b.view(-1)      # a view: nothing new
        return c.sum()

    peak, _ = measure_peak(work, torch.device("cpu"), existing=[x])
    assert peak == 2 * 400_000  # a and b alive together; the sum comes after a is freed


def test_free_bytes_of_the_host():
    assert free_bytes(torch.device("cpu")) > 0
