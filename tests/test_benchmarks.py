"""The benchmark suite (python -m benchmarks) runs, checks its methods and writes its outputs; CI
runs the whole --quick set, the tests a slice of it (the suite's time is capped)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmarks_write_records_tables_and_charts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--no-scaling", "--out", str(tmp_path),
                        "seed001"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "cpu.jsonl").read_text().splitlines()]
    assert {r["workload"] for r in recs} == {"seed001_sin"} and len(recs) == 3
    ours = [r for r in recs if r["method"] == "chunkjac"]
    assert len(ours) == 1 and all(r["status"] == "ok" and r["error"] < 1e-3 and r["seconds"] > 0 for r in ours)
    assert all(r["status"] == "ok" for r in recs), recs  # the peers run at these sizes
    table = (tmp_path / "cpu.md").read_text()
    assert "| seed001_sin (100,000) | chunkjac |" in table and "| seed001_sin (100,000) | vmap(jacrev) |" in table
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "cpu-time.png").stat().st_size > 10_000
        assert (tmp_path / "cpu-memory.png").exists()
