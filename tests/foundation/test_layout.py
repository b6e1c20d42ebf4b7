"""The repository layout keeps its promises: the stdlib `operator` is never shadowed and the generated
protobuf code matches the .proto."""

from __future__ import annotations

import pathlib
import subprocess
import sys


def test_import_operator_from_repo_root_is_stdlib(repo_root: pathlib.Path) -> None:
    for flags in ([], ["-S"]):
        out = subprocess.run(
            [sys.executable, *flags, "-c", "import operator, sys; print(operator.__file__ or '')"],
            cwd=repo_root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        assert "ghostserve" not in out and not out.startswith(str(repo_root / "operator")), out
        assert out.endswith("operator.py"), out


def test_generated_protos_match_proto(repo_root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    subprocess.run(
        [sys.executable, str(repo_root / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True
    )
    committed = repo_root / "protos" / "ghostserve" / "v1"
    generated = sorted((tmp_path / "ghostserve" / "v1").glob("*_pb2*"))
    assert generated, "protoc produced nothing"
    for path in generated:
        assert path.read_bytes() == (committed / path.name).read_bytes(), f"{path.name} is stale"


def test_cli_lists_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ghostserve.cli.main", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("demo", "sidecar", "operator"):
        assert command in out


def test_cli_rejects_unknown_command() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ghostserve.cli.main", "frobnicate"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unknown command" in proc.stderr


def test_wheel_ships_every_package_and_kernel_source(repo_root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """pyproject maps packages explicitly: a new sub-package left out of it would vanish from wheels."""
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path),
         str(repo_root)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("ghostserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    roots = ["kernels", "protos", "wire", "sidecar", "engine", "operator", "cli", "cluster", "gateway"]
    for root in roots:
        for init in (repo_root / root).rglob("__init__.py"):
            rel = init.relative_to(repo_root / root).as_posix()
            assert rel in names, f"{rel} missing from the wheel"
        for source in (repo_root / root).rglob("*.cu"):
            assert source.relative_to(repo_root / root).as_posix() in names
    assert "ghostserve/v1/sidecar.proto" in names
