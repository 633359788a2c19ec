"""The pages tell the truth: every figure the README and docs/ quote is held by a recorded run in
docs/results/ that the page names; the signatures in ```text blocks are the functions' own; the
command lines in ```bash blocks use options the command has, and its synopsis lists them all.
(tests/test_readme.py runs the ```python blocks.)"""
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import chunkjac

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
CODE = re.compile(r"`[^`\n]*`")
# A measured figure: a number with a unit of time, memory or ratio. Numbers in `code` are settings
# (budget="1GB", --budget 256MB), not measurements.
FIGURE = re.compile(r"(?<![\w.^/=-])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?\s?(ms|s|min|MB|GB|kB|×)(?![\w^])")
CELL = re.compile(r"^\s*(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?\s*(ms|s|min|MB|GB|kB|×)?\s*$")
NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?:e([+-]?\d+))?")
SCALE = {"ms": [1, 1e-3], "s": [1, 1e3], "min": [1, 60], "MB": [1, 1e-3, 1e6], "GB": [1, 1e3, 1e9],
         "kB": [1, 1e-3, 1e3], "×": [1], None: [1]}


def _prose(page: Path) -> str:
    return CODE.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))


def _figures(text: str) -> list[tuple[str, float, int, str | None]]:
    """(as written, value, decimals, unit) of every figure: numbers with a unit, and numeric table cells."""
    found = []
    for line in text.splitlines():
        if line.lstrip().startswith("|") and not re.match(r"^\s*\|[\s:|-]+\|\s*$", line):
            for cell in line.strip().strip("|").split("|"):
                m = CELL.match(cell)
                if m:
                    found.append((cell.strip(), float(m.group(1).replace(",", "") + (m.group(2) or "")),
                                  len(m.group(2) or ".") - 1, m.group(3)))
                    continue
                for m in FIGURE.finditer(cell):
                    found.append((m.group(0), float(m.group(1).replace(",", "") + (m.group(2) or "")),
                                  len(m.group(2) or ".") - 1, m.group(3)))
            continue
        for m in FIGURE.finditer(line):
            found.append((m.group(0), float(m.group(1).replace(",", "") + (m.group(2) or "")),
                          len(m.group(2) or ".") - 1, m.group(3)))
    return found


def _sources(page: Path) -> list[Path]:
    """The records a page names: links or mentions of docs/results files."""
    text = page.read_text(encoding="utf-8")
    names = set(re.findall(r"results/([\w.-]+\.(?:md|jsonl))", text))
    return [RESULTS / n for n in sorted(names) if (RESULTS / n).exists()]


def _recorded(paths: list[Path]) -> list[float]:
    values = []
    for p in paths:
        for m in NUMBER.finditer(p.read_text(encoding="utf-8")):
            v = float(m.group(1).replace(",", "") + (m.group(2) or ""))
            values.append(v * 10 ** int(m.group(3)) if m.group(3) else v)
    return values


def _held(value: float, decimals: int, unit: str | None, recorded: list[float]) -> bool:
    """Whether some recorded number, in this unit or a neighbouring one, rounds to the page's figure."""
    for factor in SCALE[unit]:
        want = value * factor
        step = 10.0 ** -decimals * factor
        if any(abs(r - want) <= step / 2 + 1e-12 * max(abs(want), 1) for r in recorded):
            return True
    return False


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_figure_is_held_by_the_records_the_page_names(page):
    figures = _figures(_prose(page))
    if not figures:
        return
    sources = _sources(page)
    assert sources, f"{page.name} quotes figures ({figures[0][0]}, ...) but names no record in docs/results/"
    recorded = _recorded(sources)
    missing = [f for f, v, d, u in figures if not _held(v, d, u, recorded)]
    assert not missing, (f"{page.name} quotes figures that {', '.join(p.name for p in sources)} do not hold: "
                         f"{missing[:12]}")


def test_every_record_names_its_command():
    for p in RESULTS.glob("*.md"):
        text = p.read_text(encoding="utf-8")
        assert "Command:" in text or "python -m benchmarks" in text or text.startswith("Device "), \
            f"{p.name} does not say which command produced it"


# ```text blocks: signatures ------------------------------------------------------------------------

SIGNATURE = re.compile(r"chunkjac\.(\w+)\(((?:[^()]|\([^()]*\))*)\)", re.S)


def _signatures():
    for page in PAGES:
        for lang, block in FENCE.findall(page.read_text(encoding="utf-8")):
            if lang != "text":
                continue
            for name, params in SIGNATURE.findall(block):
                if "*" in params and hasattr(chunkjac, name):
                    yield page.name, name, params


def _parameters(text: str) -> dict:
    """name -> default as written (None without one) of a documented signature's parameter list."""
    out, depth, part = {}, 0, ""
    for ch in text + ",":
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            item = " ".join(part.split())
            part = ""
            if not item or item in ("*", "/") or item.startswith("**"):
                continue
            name, _, default = item.partition("=")
            out[name.strip()] = default.strip() or None
        else:
            part += ch
    return out


@pytest.mark.parametrize("where, name, params", list(_signatures()))
def test_documented_signatures_are_the_functions_own(where, name, params):
    documented = _parameters(params)
    actual = inspect.signature(getattr(chunkjac, name)).parameters
    assert list(documented) == list(actual), f"{where}: chunkjac.{name} takes {list(actual)}"
    for k, p in actual.items():
        if p.default is not inspect.Parameter.empty:
            assert documented[k] is not None, f"{where}: chunkjac.{name}'s {k} has a default, {p.default!r}"
            assert eval(documented[k], {"MAX_SECONDS": 3600.0}) == p.default, \
                f"{where}: chunkjac.{name}({k}={documented[k]}), but the default is {p.default!r}"


def test_the_signatures_are_documented():
    names = {n for _, n, _ in _signatures()}
    assert {"compute", "plan", "hessian", "laplacian", "jacobian_of", "hops"} <= names


# ```bash blocks: the command line ------------------------------------------------------------------

def _help(command: str) -> str:
    r = subprocess.run([sys.executable, "-m", "chunkjac", command, "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _options(command: str) -> set:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", _help(command))) - {"--help"}


def _command_lines():
    for page in PAGES:
        for lang, block in FENCE.findall(page.read_text(encoding="utf-8")):
            if lang != "bash":
                continue
            for line in block.splitlines():
                m = re.search(r"(?:^|\s)(?:-m\s+)?chunkjac\s+(dump|plan|demo)\b(.*)", line.split("#")[0])
                if m:
                    yield page.name, m.group(1), m.group(2)


@pytest.mark.parametrize("where, command, rest", list(_command_lines()))
def test_documented_command_lines_use_options_the_command_has(where, command, rest):
    used = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest))
    assert used <= _options(command), f"{where}: chunkjac {command} has no {sorted(used - _options(command))}"


def test_the_synopsis_lists_every_option():
    text = (ROOT / "docs" / "dumps.md").read_text(encoding="utf-8")
    synopsis = next(block for lang, block in FENCE.findall(text) if lang == "text" and "chunkjac dump" in block)
    for command in ("dump", "plan"):
        missing = _options(command) - set(re.findall(r"(--[a-z][a-z-]*)", synopsis))
        assert not missing, f"docs/dumps.md's synopsis lacks {sorted(missing)} of chunkjac {command}"


# The plan printout -----------------------------------------------------------------------------------

PLAN_LINE = re.compile(r"[\d,]+ samples in [\d,]+ chunks? of (?:≤ )?[\d,]+ · .+ · peak ≈ [\d.]+ (?:B|kB|MB|GB|TB)"
                       r"(?: of [\d.]+ (?:B|kB|MB|GB|TB))?(?: \+ the result's [\d.]+ (?:kB|MB|GB|TB))? on \w+")


def test_plan_printouts_in_the_docs_have_the_plans_form():
    import torch
    printed = str(chunkjac.plan(torch.nn.Linear(3, 2), torch.randn(100, 3), budget="64MB"))
    assert PLAN_LINE.search(printed), printed  # the pattern itself follows the code
    for page in PAGES:
        for lang, block in FENCE.findall(page.read_text(encoding="utf-8")):
            for line in block.splitlines():
                if lang == "text" and " samples in " in line and " chunk" in line:
                    assert PLAN_LINE.search(line), f"{page.name}: {line.strip()} is not what print(plan) gives"
