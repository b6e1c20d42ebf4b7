"""Entry point of the `sglang.srt.plugins` group: registers GhostServe's hooks in every sglang process.

sglang 0.5.23 calls `load_plugins()` early in the launcher and in every spawned scheduler process;
it imports each entry point's module, calls it, then runs `HookRegistry.apply_hooks()`. Its loader
logs and ignores ordinary exceptions at each of those three steps, which would leave a deployment
that set GHOSTSERVE_SGLANG=1 serving unprotected without a word. So this module imports only the
standard library at import time, `register` turns every failure into SystemExit (which the loader
does not catch) when the plugin is enabled, and it applies its own hooks at once and checks that
each one was patched.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

# Hook targets, each checked against sglang 0.5.23 (docs/sglang.md says what each relies on).
CREATE_BUFFERS = "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers_normal"
FORWARD = "sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation"
RELEASE = "sglang.srt.mem_cache.common.release_kv_cache"
SCHEDULER_INIT = "sglang.srt.managers.scheduler.Scheduler.__init__"
EVENT_LOOP = "sglang.srt.managers.scheduler.Scheduler.run_event_loop"
KILL_TREE = "sglang.srt.utils.common.kill_process_tree"
FLUSH = "sglang.srt.managers.scheduler.Scheduler.flush_cache"

RUNTIME: Any = None  # runtime.Runtime once registered


def register() -> None:
    """Entry point. Reads GHOSTSERVE_* settings, checks the sglang version, registers and applies hooks.

    Sets the module's RUNTIME. With GHOSTSERVE_SGLANG=1 every failure (bad settings, unsupported
    sglang, an import error, a hook that could not be applied) raises SystemExit naming it.
    """
    global RUNTIME
    if os.environ.get("GHOSTSERVE_SGLANG", "0").strip().lower() not in ("1", "true", "yes", "on"):
        log.info("GhostServe plugin installed but inactive (GHOSTSERVE_SGLANG is not 1)")
        return
    if RUNTIME is not None:
        return
    try:
        RUNTIME = _register()
    except SystemExit:
        raise
    except BaseException as exc:
        log.exception("GhostServe plugin failed to load")
        raise SystemExit(f"GhostServe: the plugin failed to load: {type(exc).__name__}: {exc}") from exc


def _register() -> Any:
    from ghostserve.engine.sglang import compat, runtime
    from ghostserve.engine.sglang import settings as settings_mod
    from sglang.srt.plugins import hook_registry

    try:
        settings = settings_mod.PluginSettings.from_env(os.environ)
        compat.check_version(compat.installed_version())
    except (settings_mod.SettingsError, compat.UnsupportedSGLangError) as exc:
        log.error("GhostServe: %s", exc)
        raise SystemExit(f"GhostServe: {exc}") from exc
    rt = runtime.Runtime(settings)
    registry = hook_registry.HookRegistry
    hook_type = hook_registry.HookType
    hooks = {
        CREATE_BUFFERS: (rt.create_buffers, hook_type.AROUND),
        FORWARD: (rt.after_forward, hook_type.AFTER),
        RELEASE: (rt.after_release, hook_type.AFTER),
        SCHEDULER_INIT: (rt.after_scheduler_init, hook_type.AFTER),
        EVENT_LOOP: (rt.guard_event_loop, hook_type.AROUND),
        KILL_TREE: (rt.kill_tree, hook_type.AROUND),
        FLUSH: (rt.after_flush, hook_type.AFTER),
    }
    for target, (fn, kind) in hooks.items():
        registry.register(target, fn, kind)
    # apply_hooks logs and skips a target it cannot patch; it is idempotent, so apply now and check.
    registry.apply_hooks()
    missing = sorted(t for t in hooks if t not in registry._patched)
    if missing:
        raise SystemExit(f"GhostServe: sglang hooks could not be applied: {', '.join(missing)}")
    log.info("GhostServe plugin active: group %s, %s", settings.group, settings.protection)
    return rt
