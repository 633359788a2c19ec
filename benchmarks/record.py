"""Record a measurement for the documentation: run a command, keep its output in docs/results/NAME.md.

Every figure the README and docs/ quote comes from a file in docs/results/ (tests/test_docs.py fails
on a figure that none of the files a page names holds). This runs the command that produces them
and writes its output verbatim, under the command itself, the date, the torch version and the
machine, so that a page can name where each figure comes from and anyone can run it again:

    python -m benchmarks.record bench_second -- python benchmarks/bench_second.py --rounds 3
    python -m benchmarks.record demo -- chunkjac demo

(`python -m benchmarks` writes its own records, docs/results/cpu.jsonl and cpu.md.)
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, Python {platform.python_version()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="docs/results/NAME.md is written")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    a = ap.parse_args(argv)
    command = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not command:
        ap.error("give the command after --")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    r = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    sys.stdout.write(r.stdout)
    if r.returncode != 0:
        print(f"record: the command exited {r.returncode}; nothing recorded", file=sys.stderr)
        return r.returncode
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{a.name}.md")
    with open(path, "w") as f:
        f.write(f"# {a.name}\n\n")
        f.write(f"Command: `{shlex.join(command)}`\n\n")
        f.write(f"Run: {started}, {machine()}.\n\n")
        f.write("```text\n" + r.stdout.rstrip() + "\n```\n")
    print(f"record: {os.path.relpath(path, ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
