"""Every ```python block of README.md runs as written, each in a fresh interpreter.

Blocks run in a temporary directory (files they write land there) with the repository on
PYTHONPATH, so ``import chunkjac`` finds this checkout. ```text and ```bash blocks are not run.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def _blocks() -> list[tuple[str, str]]:
    """(id, code) of each ```python block: the id is the section heading above it ("intro" before
    the first), numbered within it."""
    text = README.read_text(encoding="utf-8")
    headings = [(m.start(), m.group(1).strip()) for m in re.finditer(r"^#{2,6} +(.+)$", text, re.M)]
    found, seen = [], {}
    for m in FENCE.finditer(text):
        if m.group(1) != "python":
            continue
        title = next((h for pos, h in reversed(headings) if pos < m.start()), "intro")
        slug = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower() or "intro"
        seen[slug] = seen.get(slug, 0) + 1
        found.append((f"{slug}-{seen[slug]}", m.group(2)))
    return found


BLOCKS = _blocks()


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 5, "README.md lost its ```python blocks (or this test's parser broke)"


def test_readme_links_stay_inside_the_repository():
    text = README.read_text(encoding="utf-8")
    assert "../shared" not in text and "ANCHORS.md" not in text
    for target in re.findall(r"\]\(([^)#]+)[^)]*\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links {target}, which is not in the repository"


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_readme_block_runs(code, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=env)
    first = code.strip().splitlines()[0]
    assert r.returncode == 0, (f"README block starting {first!r} exited with {r.returncode}:\n"
                               f"{r.stderr[-3000:]}")
