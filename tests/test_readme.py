"""Every ```python block of README.md and docs/*.md runs as written, each in a fresh interpreter,
so the documentation cannot drift from the code; their links stay inside the repository.

The blocks of a page run in one fresh interpreter, each in a namespace and a temporary directory of
its own (files they write land there), with the repository on PYTHONPATH, so ``import chunkjac``
finds this checkout. A block that continues the one before it
(it uses names defined there) starts with the comment ``# continued``: it runs after that block, in
the same interpreter. ```text and ```bash blocks are not run.
"""
import json
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


DRIVER = r"""
import json, os, sys, tempfile, traceback
blocks = json.load(open(sys.argv[1]))
failed = []
for bid, code in blocks:
    os.chdir(tempfile.mkdtemp())  # files a block writes land in a folder of its own
    try:
        exec(compile(code, bid, "exec"), {"__name__": "__main__"})
    except BaseException:
        failed.append([bid, traceback.format_exc()[-3000:]])
print(json.dumps(failed))
"""


@pytest.mark.parametrize("page", [p for p in PAGES if _blocks(p)], ids=[p.name for p in PAGES if _blocks(p)])
def test_blocks_run(page, tmp_path):
    # One interpreter per page (starting one per block took two minutes of the suite); each block
    # runs in a namespace and a working directory of its own.
    blocks = _blocks(page)
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "blocks.json")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    failed = json.loads(r.stdout.strip().splitlines()[-1])
    assert not failed, "\n\n".join(f"{page.name}, block {bid}:\n{tb}" for bid, tb in failed)
