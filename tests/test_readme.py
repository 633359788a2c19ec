"""Every ```python block of README.md and docs/*.md runs as written, each in a fresh interpreter,
so the documentation cannot drift from the code; their links stay inside the repository.

Blocks run in a temporary directory (files they write land there) with the repository on
PYTHONPATH, so ``import chunkjac`` finds this checkout. A block that continues the one before it
(it uses names defined there) starts with the comment ``# continued``: it runs after that block, in
the same interpreter. ```text and ```bash blocks are not run.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def _blocks(page: Path) -> list[tuple[str, str]]:
    """(id, code) of each ```python block: the id is the page and the section heading above it,
    numbered within it; a "# continued" block is appended to the one before."""
    text = page.read_text(encoding="utf-8")
    headings = [(m.start(), m.group(1).strip()) for m in re.finditer(r"^#{1,6} +(.+)$", text, re.M)]
    found, seen = [], {}
    for m in FENCE.finditer(text):
        if m.group(1) != "python":
            continue
        code = m.group(2)
        if code.lstrip().startswith("# continued") and found:
            found[-1] = (found[-1][0], found[-1][1] + "\n" + code)
            continue
        title = next((h for pos, h in reversed(headings) if pos < m.start()), "intro")
        slug = re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()[:40] or "intro"
        key = f"{page.stem}:{slug}"
        seen[key] = seen.get(key, 0) + 1
        found.append((f"{key}-{seen[key]}", code))
    return found


BLOCKS = [b for page in PAGES for b in _blocks(page)]


def test_readme_is_a_first_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "README.md is a newcomer's first ten minutes: depth goes to docs/"
    assert len(_blocks(README)) >= 5, "README.md lost its ```python blocks (or this test's parser broke)"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_stay_inside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    assert "../shared" not in text and "ANCHORS.md" not in text
    for target in re.findall(r"\]\(([^)#]+)[^)]*\)", text):
        if "://" not in target:
            assert (page.parent / target).exists(), f"{page.name} links {target}, which is not in the repository"


@pytest.mark.parametrize("code", [c for _, c in BLOCKS], ids=[i for i, _ in BLOCKS])
def test_block_runs(code, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120, env=env)
    first = code.strip().splitlines()[0]
    assert r.returncode == 0, f"the block starting {first!r} exited with {r.returncode}:\n{r.stderr[-3000:]}"
