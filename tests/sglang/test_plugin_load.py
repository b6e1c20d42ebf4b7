"""With GHOSTSERVE_SGLANG=1, a plugin that cannot load or hook fails sglang's start loudly.

sglang's own loader (`sglang.srt.plugins.load_plugins`, run in a fresh process as sglang does) logs
and ignores ordinary exceptions when it imports an entry point, calls it or applies hooks.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import sgl_procs

if sgl_procs.sglang_version() != "0.5.23":
    pytest.skip("needs sglang 0.5.23 (.venv-sglang)", allow_module_level=True)

SETUP = {
    "ok": "",
    "bad-hook": "from ghostserve.engine.sglang import plugin; "
    "plugin.FORWARD = 'sglang.srt.managers.tp_worker.TpModelWorker.no_such_method'",
    "import-error": "import sys; sys.modules['ghostserve.engine.sglang.runtime'] = None",
}


def load(case: str, *, enabled: bool) -> subprocess.CompletedProcess[str]:
    code = f"{SETUP[case]}\nfrom sglang.srt.plugins import load_plugins\nload_plugins()\nprint('served')"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GHOSTSERVE_")}
    env["SGLANG_PLUGINS"] = "ghostserve"
    if enabled:
        env["GHOSTSERVE_SGLANG"] = "1"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("case", "message"),
    [("bad-hook", "no_such_method"), ("import-error", "the plugin failed to load: ModuleNotFoundError")],
)
def test_enabled_plugin_that_cannot_load_or_hook_stops_the_process(case: str, message: str) -> None:
    result = load(case, enabled=True)
    assert result.returncode != 0 and "served" not in result.stdout
    assert "GhostServe" in result.stderr and message in result.stderr


def test_disabled_plugin_never_stops_sglang() -> None:
    for case in ("ok", "import-error"):
        result = load(case, enabled=False)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "served" in result.stdout
