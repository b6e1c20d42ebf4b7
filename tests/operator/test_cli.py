"""`ghostserve operator` flags: scope, mTLS, sidecar addressing, GPU conditions."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ghostserve.operator import faults, main


def test_flags_build_the_config() -> None:
    args = main.parse_args(
        [
            "-n",
            "a",
            "-n",
            "b",
            "--sidecar-address-template",
            "unix:///run/gs.sock",
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "c.pem",
            "--tls-key",
            "k.pem",
            "--gpu-condition",
            "MyGpuBroken",
            "--resync-seconds",
            "7",
        ]
    )
    config = main.config_from(args)
    assert args.namespace == ["a", "b"] and not args.all_namespaces
    assert config.sidecar_address_template == "unix:///run/gs.sock"
    assert config.tls is not None and (config.tls.ca, config.tls.cert, config.tls.key) == (
        "ca.pem",
        "c.pem",
        "k.pem",
    )
    assert config.gpu_conditions == frozenset({"MyGpuBroken"}) and config.resync_seconds == 7
    assert main.config_from(main.parse_args(["-A"])).gpu_conditions == faults.DEFAULT_GPU_CONDITIONS


@pytest.mark.parametrize(
    "argv",
    [
        [],  # no scope given
        ["-n", "a", "-A"],  # both scopes
        ["-A", "--tls-ca", "ca.pem"],  # half of the mTLS files
    ],
)
def test_bad_flags_are_rejected(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main.parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cli_help_runs_without_a_cluster() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ghostserve.cli.main", "operator", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "--sidecar-address-template" in out.stdout and "--metrics-port" in out.stdout
