"""The plugin's hooks are installed by sglang's own loader, where sglang calls them.

sglang's `load_plugins()` runs every `sglang.srt.plugins` entry point and then patches the registered
targets. This runs it in a fresh interpreter (patches are process-wide) after importing the scheduler,
worker and cache modules the way a scheduler process has them, then checks that every target resolves
to a wrapper around the original that calls GhostServe's runtime, and that no module kept a stale
`from ... import` binding of an original. (Added by CLEANUP, issue 15; the SGLANG stream owns tests/sglang.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import sgl_procs

if sgl_procs.sglang_version() != "0.5.23":
    pytest.skip("needs sglang 0.5.23 (.venv-sglang)", allow_module_level=True)

CHECK = r"""
import json, pkgutil, sys
import sglang.srt.managers.scheduler, sglang.srt.managers.tp_worker, sglang.srt.mem_cache.common  # noqa
import sglang.srt.mem_cache.memory_pool  # noqa
from ghostserve.engine.sglang import plugin
targets = {
    plugin.CREATE_BUFFERS: "create_buffers", plugin.FORWARD: "after_forward", plugin.RELEASE: "after_release",
    plugin.SCHEDULER_INIT: "after_scheduler_init", plugin.EVENT_LOOP: "guard_event_loop",
    plugin.KILL_TREE: "kill_tree", plugin.FLUSH: "after_flush",
}
originals = {t: pkgutil.resolve_name(t) for t in targets}
from sglang.srt.plugins import load_plugins
load_plugins()
out = {"runtime": plugin.RUNTIME is not None, "targets": {}}
for target, method in targets.items():
    now = pkgutil.resolve_name(target)
    hook = getattr(plugin.RUNTIME, method, None)
    cells = [c.cell_contents for c in (getattr(now, "__closure__", None) or ())]
    stale = sorted(name for name, mod in list(sys.modules.items())
                   if mod is not None and any(v is originals[target] for v in vars(mod).values()))
    out["targets"][target] = {
        "wrapped": now is not originals[target] and getattr(now, "__wrapped__", None) is originals[target],
        "calls_runtime": hook is not None and any(c == hook for c in cells),
        "stale": stale,
    }
print(json.dumps(out))
"""


def test_sglang_loader_installs_every_hook_where_sglang_calls_it() -> None:
    env = {
        **os.environ,
        "GHOSTSERVE_SGLANG": "1",
        "GHOSTSERVE_SIDECAR": "unix:///nonexistent/sidecar.sock",  # Runtime dials only on first pool
        "GHOSTSERVE_GROUP": "hooks",
        "GHOSTSERVE_CHUNK_TOKENS": "16",
        "GHOSTSERVE_RANK": "0",
        "GHOSTSERVE_WORLD_SIZE": "1",
        "SGLANG_PLUGINS": "ghostserve",
    }
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["runtime"], proc.stderr[-4000:]
    for target, found in result["targets"].items():
        assert found == {"wrapped": True, "calls_runtime": True, "stale": []}, (target, found)
