"""What importing a component loads: the engine adapter runs in every SGLang scheduler process and the
operator in a small image, so neither may drag in the sidecar's server side, a codec or numpy.
(.importlinter checks the static graph; this checks what Python actually loads.)"""

from __future__ import annotations

import json
import subprocess
import sys

# Counted the same way at commit 44a77b5, before the wire layer and the planner move (issue 15).
ADAPTER_GHOSTSERVE_MODULES_BEFORE = 34
# The sidecar modules an engine may load: the gRPC client (hand-written + generated) and pool mapping.
SIDECAR_CLIENT_SIDE = {"ghostserve.sidecar", "ghostserve.sidecar.client", "ghostserve.sidecar.client_rpcs",
                       "ghostserve.sidecar.pools", "ghostserve.sidecar.errors"}  # fmt: skip


def loaded_by(module: str) -> dict[str, list[str]]:
    """The modules a fresh interpreter loads for `import module`: ghostserve ones and all."""
    code = (
        "import json, sys; before = set(sys.modules); import " + module + "; "
        "new = sorted(set(sys.modules) - before); "
        "print(json.dumps({'all': new, 'ours': [m for m in new if m.startswith('ghostserve')]}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded: dict[str, list[str]] = json.loads(out)
    return loaded


def test_engine_adapter_loads_no_sidecar_server_module() -> None:
    loaded = loaded_by("ghostserve.engine.adapter")
    sidecar = {m for m in loaded["ours"] if m.startswith("ghostserve.sidecar")}
    assert sidecar <= SIDECAR_CLIENT_SIDE, sorted(sidecar - SIDECAR_CLIENT_SIDE)
    assert not {"torch", "ghostserve.kernels.codec", "prometheus_client"} & set(loaded["all"])
    print(f"import ghostserve.engine.adapter: {len(loaded['ours'])} ghostserve modules "
          f"(was {ADAPTER_GHOSTSERVE_MODULES_BEFORE}), {len(loaded['all'])} modules in all")  # fmt: skip
    assert len(loaded["ours"]) < ADAPTER_GHOSTSERVE_MODULES_BEFORE


def test_protection_settings_load_without_numpy() -> None:
    """The operator checks specs with the same protection rules as the sidecar, without numpy."""
    loaded = loaded_by("ghostserve.wire.protection")
    assert "numpy" not in loaded["all"]
    kernels = {m for m in loaded["ours"] if m.startswith("ghostserve.kernels.")}
    assert kernels == {"ghostserve.kernels.protection"}


def test_sidecar_client_loads_no_codec() -> None:
    loaded = loaded_by("ghostserve.sidecar.client")
    assert not {"numpy", "ghostserve.kernels.codec", "ghostserve.sidecar.core"} & set(loaded["all"])
