"""What the benchmark scripts share: one measurement in a fresh Python process."""
import json
import subprocess
import sys


def run_child(child: str, args: list, timeout: float, env=None) -> dict:
    """Run ``python -c child *args``; its last stdout line that is a JSON object is the record.
    A process killed by a signal (the kernel's out-of-memory killer) is reported as such."""
    r = subprocess.run([sys.executable, "-c", child, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode < 0:
        return {"seconds": None, "note": f"killed by signal {-r.returncode} (out of memory?)"}
    return json.loads(lines[-1]) if lines else {"seconds": None, "note": r.stderr.strip()[-100:]}
