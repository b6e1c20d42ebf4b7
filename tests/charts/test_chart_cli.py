"""The rendered containers run the real programs with arguments those programs accept: the operator's
and the sidecar's own argument parsers read the rendered args, and the sidecar's exec health probe
is run against a real `ghostserve sidecar` process on a Unix socket."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from types import ModuleType
from typing import Any

import chart_support
import pytest
from ghostserve.operator import main as operator_main
from ghostserve.sidecar import config as sidecar_config
from ghostserve.sidecar import flags as sidecar_flags
from ghostserve.sidecar import server as sidecar_server

PROBE_DEADLINE_S = 60.0


def _container(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [workload] = [o for o in objs if o["kind"] == kind]
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


@pytest.mark.parametrize("variant", ["default", *sorted(chart_support.VARIANTS)])
def test_operator_accepts_the_rendered_args(render_script: ModuleType, variant: str) -> None:
    values = None if variant == "default" else chart_support.VARIANTS[variant]
    operator = _container(chart_support.objects(render_script.render(values)), "Deployment", "operator")
    assert operator["command"] == ["ghostserve"] and operator["args"][0] == "operator"
    args = operator_main.parse_args(operator["args"][1:])
    health_port = next(p["containerPort"] for p in operator["ports"] if p["name"] == "health")
    assert args.liveness == f"http://0.0.0.0:{health_port}/healthz"
    assert args.metrics_port == next(p["containerPort"] for p in operator["ports"] if p["name"] == "metrics")
    assert args.sidecar_address_template == "{node_ip}:{port}"
    assert args.first_pass_limit == (values or {}).get("operator", {}).get("firstPassLimit", 4)
    namespaces = (values or {}).get("operator", {}).get("watchNamespaces", [])
    assert (args.all_namespaces, args.namespace) == (not namespaces, namespaces)
    mtls = (values or {}).get("tls", {}).get("mode", "cert-manager") != "insecure"
    assert bool(args.tls_ca and args.tls_cert and args.tls_key) is mtls
    if mtls:
        mounts = {m["name"]: m["mountPath"] for m in operator["volumeMounts"]}
        for path in (args.tls_ca, args.tls_cert, args.tls_key):
            assert pathlib.PurePath(path).parent == pathlib.PurePath(mounts["tls"])
        assert args.tls_server_name == "ghostserve-sidecar"


def _sidecar_args(render_script: ModuleType, values: dict[str, Any] | None) -> list[str]:
    sidecar = _container(chart_support.objects(render_script.render(values)), "DaemonSet", "sidecar")
    assert sidecar["command"] == ["ghostserve"] and sidecar["args"][0] == "sidecar"
    return list(sidecar["args"][1:])


@pytest.mark.parametrize("variant", ["default", "tls-spill-extras", "insecure"])
def test_sidecar_accepts_every_rendered_flag_but_listen(render_script: ModuleType, variant: str) -> None:
    """Every flag the DaemonSet passes exists and parses; --listen is left to the test below."""
    values = None if variant == "default" else chart_support.VARIANTS[variant]
    rendered = _sidecar_args(render_script, values)
    args = sidecar_server.parse_args(rendered)
    assert args.socket == "/run/ghostserve/sidecar.sock"
    budget = (values or {}).get("sidecar", {}).get("hostMemoryBudget", "64Gi")
    assert sidecar_config.parse_bytes(args.budget) == 64 << 30 == sidecar_config.parse_bytes(budget)
    assert args.metrics_port == 9464 and args.log_level == "INFO"
    assert args.keep_pools is (variant != "tls-spill-extras")
    sidecar_flags.check_transport(args)  # the sidecar would refuse (exit 2) what this rejects
    assert args.insecure is (args.tls_ca is None) is (variant == "insecure")
    assert (args.spill_dir is not None) is (variant == "tls-spill-extras")


def test_sidecar_serves_socket_and_tcp_together(render_script: ModuleType) -> None:
    args = sidecar_server.parse_args(_sidecar_args(render_script, None))
    assert args.listen == "0.0.0.0:7443" and args.socket == "/run/ghostserve/sidecar.sock"


def _probe(command: list[str], socket_path: pathlib.Path) -> int:
    code = command[2].replace("unix:///run/ghostserve/sidecar.sock", f"unix://{socket_path}")
    assert code != command[2], "the probe no longer dials the socket the chart mounts"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode


def test_sidecar_health_probe_against_a_real_sidecar(
    default_objects: list[dict[str, Any]], short_tmp: pathlib.Path
) -> None:
    sidecar = _container(default_objects, "DaemonSet", "sidecar")
    command = sidecar["livenessProbe"]["exec"]["command"]
    assert sidecar["readinessProbe"]["exec"]["command"] == command
    socket_path = short_tmp / "sidecar.sock"
    assert _probe(command, socket_path) != 0  # nothing serves yet: the probe must fail
    process = subprocess.Popen(
        [sys.executable, "-m", "ghostserve.cli.main", "sidecar", f"--socket={socket_path}",
         "--budget=64MiB", "--fake-nvml=1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "GHOSTSERVE_LOG_LEVEL": "WARNING"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + PROBE_DEADLINE_S
        while _probe(command, socket_path) != 0:
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "the probe never saw the sidecar SERVING"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert _probe(command, socket_path) != 0  # stopped sidecar: the probe fails again
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
