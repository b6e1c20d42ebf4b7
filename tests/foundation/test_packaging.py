"""pyproject.toml states ranges, constraints.txt pins the tested set: every pin must sit inside the
ranges of every extra that names the package, and every dependency must be pinned."""

from __future__ import annotations

import pathlib
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def test_constraints_pin_every_dependency_inside_its_ranges(repo_root: pathlib.Path) -> None:
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    pins: dict[str, str] = {}
    for line in (repo_root / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    extras = project["optional-dependencies"].values()
    wanted = [*project["dependencies"], *(r for extra in extras for r in extra)]
    problems = []
    for text in wanted:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        # Self-references; sglang lives in .venv-sglang; cupy only on GPU machines (not the CI set).
        if name in ("ghostserve", "sglang", "cupy-cuda12x"):
            continue
        if name not in pins:
            problems.append(f"{req.name} is not pinned in constraints.txt")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}=={pins[name]} is outside {req.specifier}")
    assert problems == []


def test_license_is_an_spdx_string(repo_root: pathlib.Path) -> None:
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
