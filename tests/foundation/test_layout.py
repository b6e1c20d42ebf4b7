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
