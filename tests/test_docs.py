"""The README stays a front door and the documentation's links stay whole.

- README.md is under 200 lines and its "Two commands for a fresh machine" section holds the two commands
  exactly (CI runs the second; `.ci/run` must still run its install and test steps).
- Every relative link in README.md and docs/*.md (inline ``[text](target)`` or reference ``[id]: target``,
  outside code) points at a file or folder of the repository, and a ``#fragment`` into a Markdown file names
  one of its headings (GitHub's heading ids).
"""
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

DEMO_COMMAND = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
                'pip install -e ".[demo]" && sora-fast demo')
TEST_COMMAND = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
                'pip install -e ".[test]" && python -m pytest -q')

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REF_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks, with inline code spans blanked out."""
    fenced = None
    for n, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if m:
            if fenced is None:
                fenced = m.group(1)
            elif m.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            yield n, _INLINE_CODE.sub(lambda c: " " * len(c.group(0)), line)


def links(text: str) -> list[tuple[int, str]]:
    """Every link target of a Markdown text, with its line number (code blocks and code spans skipped)."""
    found = []
    for n, line in _prose_lines(text):
        found += [(n, m.group(1)) for m in _INLINE_LINK.finditer(line)]
        m = _REF_LINK.match(line)
        if m:
            found.append((n, m.group(1)))
    return found


def heading_ids(text: str) -> set[str]:
    """GitHub's ids of a Markdown text's ATX headings: lower case, punctuation dropped, spaces to hyphens,
    repeats numbered ``-1``, ``-2`` …"""
    ids, seen = set(), {}
    for _, line in _prose_lines(text.replace("`", "")):
        m = re.match(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1)).strip().lower()
        slug = "".join(c for c in title if c in " -_" or unicodedata.category(c)[0] in "LNM").replace(" ", "-")
        k = seen.get(slug, 0)
        seen[slug] = k + 1
        ids.add(slug if k == 0 else f"{slug}-{k}")
    return ids


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """'file:line: target (why)' for each relative link of ``path`` that does not resolve inside ``root``."""
    text = path.read_text(encoding="utf-8")
    bad = []
    for n, target in links(text):
        if _SCHEME.match(target) or target.startswith("//"):
            continue                                   # http(s), mailto: not checked here
        file_part, _, fragment = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}:{n}: {target}"
        if root.resolve() not in (dest, *dest.parents):
            bad.append(f"{where} (outside the repository)")
        elif not dest.exists():
            bad.append(f"{where} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in heading_ids(dest.read_text(encoding="utf-8")):
            bad.append(f"{where} (no heading with id {fragment!r})")
    return bad


def _doc_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_is_a_front_door_under_200_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines; measurements and notes belong in docs/"


def test_readme_holds_the_two_commands_for_a_fresh_machine():
    text = README.read_text(encoding="utf-8")
    m = re.search(r"^## Two commands for a fresh machine\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, "README.md lost its '## Two commands for a fresh machine' section"
    blocks = re.findall(r"^```bash\n(.*?)^```", m.group(1), re.S | re.M)
    commands = [line for block in blocks for line in block.splitlines() if line.strip()]
    assert commands == [DEMO_COMMAND, TEST_COMMAND]


def test_ci_runs_the_readme_install_and_test_steps():
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install -e ".[test]"' in ci and "python -m pytest -q" in ci
    assert "ruff check ." in ci


def test_readme_links_the_docs_index():
    assert (ROOT / "docs" / "README.md").is_file()
    assert "docs/README.md" in {t.partition("#")[0] for _, t in links(README.read_text(encoding="utf-8"))}


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def test_link_check_reports_what_is_broken(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Second part: `x`\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok anchor](docs/a.md#second-part-x) [web](https://example.com) [self](#top)\n"
        "[missing](docs/b.md) [bad anchor](docs/a.md#nope) [up](../elsewhere.md)\n"
        "`[code](docs/c.md)`\n\n```\n[fenced](docs/d.md)\n```\n\n# Top\n[ref]: docs/e.md\n")
    assert broken_links(page, tmp_path) == [
        "README.md:2: docs/b.md (no such file)",
        "README.md:2: docs/a.md#nope (no heading with id 'nope')",
        "README.md:2: ../elsewhere.md (outside the repository)",
        "README.md:10: docs/e.md (no such file)",
    ]
