"""`ghostserve codec-demo` rebuilds real KV-shaped shards and fails loudly on a mismatch; bench/codec.py
writes its JSON with the named ratios."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from ghostserve.kernels import codec, demo

SMALL = [
    "--tp",
    "3",
    "--layers",
    "2",
    "--kv-heads",
    "1",
    "--head-dim",
    "16",
    "--tokens",
    "24",
    "--repeats",
    "1",
]


def test_demo_rebuilds_every_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(SMALL) == 0
    out = capsys.readouterr().out
    assert "all rebuilt shards are bit-identical" in out
    for code in ("xor(3,1)", "rdp(3,2)", "rs(3,2)", "rs(3,3)"):
        assert code in out


def test_demo_exits_nonzero_on_a_mismatch(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = codec.Codec.reconstruct

    def corrupting(self: codec.Codec, shards: Any, out: Any = None) -> None:
        real(self, shards, out)
        first = np.asarray(next(iter(out.values())))
        first[first.size // 2] ^= 1

    monkeypatch.setattr(codec.Codec, "reconstruct", corrupting)
    assert demo.main(SMALL) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_cli_runs_the_demo() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ghostserve.cli.main", "codec-demo", *SMALL],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_bench_writes_ratios(repo_root: pathlib.Path, tmp_path: pathlib.Path) -> None:
    out = tmp_path / "codec.json"
    cmd = [
        sys.executable,
        str(repo_root / "bench" / "codec.py"),
        "--size",
        "1MiB",
        "--rounds",
        "3",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["benchmark"] == "codec" and result["machine"]["cores"] >= 1
    names = {c["name"] for c in result["cases"]}
    assert {"encode_8x1x1MiB", "encode_4x2x1MiB", "reconstruct_4x2x1MiB"} <= names
    for key in (
        "xor8_encode_vs_memcpy",
        "rdp4_encode_vs_memcpy",
        "rs4x2_encode_vs_memcpy",
        "rs4x2_encode_vs_torch",
    ):
        spread = result["spread"][key]
        assert result["summary"][key] == spread["median"] > 0 and len(spread["samples"]) == 3
        assert spread["min"] <= spread["median"] <= spread["max"]
    # memcpy moves 2N*S, an xor N=8 encode 9*S: the bytes each side moves are recorded per case.
    xor = next(c for c in result["cases"] if c["name"] == "encode_8x1x1MiB")
    assert xor["bytes_moved"]["memcpy"] * 9 == xor["bytes_moved"]["ours"] * 16
    assert set(result["load_average_before"]) == set(result["load_average_after"]) == {"1m", "5m", "15m"}
