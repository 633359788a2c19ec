"""The chunkjac command and the examples, smoke-run as a user would."""
import pathlib
import subprocess
import sys

import pytest

from chunkjac._cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_prints_shape_time_and_throughput(capsys):
    assert main(["demo", "--samples", "2000"]) == 0
    out = capsys.readouterr().out
    assert "jacobians:   (2000, 3, 3)" in out
    assert "time:" in out and "samples/s" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_bad_sample_count_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--samples", "0"])
    assert e.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "chunkjac", "demo", "--samples", "500"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "(500, 3, 3)" in r.stdout


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_example_runs(example):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / example)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip()
