"""The CUDA sources compile with nvcc for sm_90 without register spills (no GPU needed)."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernels_compile_for_hopper_without_spills(repo_root: pathlib.Path) -> None:
    proc = subprocess.run(
        ["bash", str(repo_root / "scripts" / "compile_cuda.sh")], capture_output=True, text=True, timeout=240
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_90'", report)
    assert {"gs_xor", "gs_xor_gather", "gs_gf_2", "gs_gf_gather_8"} <= set(entries), report
    spills = re.findall(r"(\d+) bytes spill stores", report)
    assert spills and all(s == "0" for s in spills), report
