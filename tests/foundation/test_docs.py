"""The repository reads on its own: docs and comments cite files inside it, and every
`docs/design.md §N` they cite is a section that exists."""

from __future__ import annotations

import fnmatch
import os
import pathlib
import re

TEXT = ("*.py", "*.md", "*.sh", "*.proto", "*.toml", "*.yaml", "*.tpl", "*.cu")
SKIP = {".git", ".venv", ".venv-sglang", "build", "results", "__pycache__", ".mypy_cache", ".ruff_cache"}


def repo_files(root: pathlib.Path) -> list[pathlib.Path]:
    out = []
    for top, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIP and not d.startswith(".venv")]
        out += [pathlib.Path(top, f) for f in files if any(fnmatch.fnmatch(f, pat) for pat in TEXT)]
    return out


def test_nothing_points_outside_the_repository(repo_root: pathlib.Path) -> None:
    outside = re.compile(r"\.\./shared|/work/shared|shared/DESIGN|DESIGN §|DESIGN\.md")
    this = pathlib.Path(__file__).resolve()
    hits = [
        f"{p.relative_to(repo_root)}:{n}"
        for p in repo_files(repo_root)
        if p.resolve() != this
        for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if outside.search(line)
    ]
    assert hits == []


def test_design_sections_cited_exist(repo_root: pathlib.Path) -> None:
    design = (repo_root / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\. ", design, flags=re.M))
    cited = {
        (f"{p.relative_to(repo_root)}", ref)
        for p in repo_files(repo_root)
        for ref in re.findall(r"design\.md,? §(\d+(?:\.\d+)?)", p.read_text(errors="replace"))
    }
    assert cited, "nothing cites docs/design.md sections: the pattern is stale"
    assert sorted(c for c in cited if c[1] not in sections) == []
