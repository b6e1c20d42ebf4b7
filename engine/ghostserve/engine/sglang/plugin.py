"""Entry point of the `sglang.srt.plugins` group: registers GhostServe's hooks in every sglang process.

sglang 0.5.23 calls `load_plugins()` early in the launcher and in every spawned scheduler process;
it runs each entry point of the group, then `HookRegistry.apply_hooks()`. `register` only registers
hooks (HookRegistry patches them itself); it does nothing unless GHOSTSERVE_SGLANG=1.
"""

from __future__ import annotations

import logging
import os

from ghostserve.engine.sglang import compat, runtime
from ghostserve.engine.sglang import settings as settings_mod
from sglang.srt.plugins import hook_registry

log = logging.getLogger(__name__)

# Hook targets, each checked against sglang 0.5.23 (docs/sglang.md says what each relies on).
CREATE_BUFFERS = "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers_normal"
FORWARD = "sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation"
RELEASE = "sglang.srt.mem_cache.common.release_kv_cache"
SCHEDULER_INIT = "sglang.srt.managers.scheduler.Scheduler.__init__"
EVENT_LOOP = "sglang.srt.managers.scheduler.Scheduler.run_event_loop"

RUNTIME: runtime.Runtime | None = None


def register() -> None:
    """Entry point. Reads GHOSTSERVE_* settings, checks the sglang version, registers the hooks.

    Sets the module's RUNTIME. Raises SystemExit with the reason for an unsupported sglang or bad
    settings when GHOSTSERVE_SGLANG=1: sglang's loader logs and ignores ordinary exceptions, which
    would leave a deployment that asked for protection silently unprotected.
    """
    global RUNTIME
    try:
        settings = settings_mod.PluginSettings.from_env(os.environ)
        if not settings.enabled:
            log.info("GhostServe plugin installed but inactive (GHOSTSERVE_SGLANG is not 1)")
            return
        compat.check_version(compat.installed_version())
    except (settings_mod.SettingsError, compat.UnsupportedSGLangError) as exc:
        log.error("GhostServe: %s", exc)
        raise SystemExit(f"GhostServe: {exc}") from exc
    if RUNTIME is not None:
        return
    rt = runtime.Runtime(settings)
    registry = hook_registry.HookRegistry
    hook_type = hook_registry.HookType
    registry.register(CREATE_BUFFERS, rt.create_buffers, hook_type.AROUND)
    registry.register(FORWARD, rt.after_forward, hook_type.AFTER)
    registry.register(RELEASE, rt.after_release, hook_type.AFTER)
    registry.register(SCHEDULER_INIT, rt.after_scheduler_init, hook_type.AFTER)
    registry.register(EVENT_LOOP, rt.guard_event_loop, hook_type.AROUND)
    RUNTIME = rt
    log.info("GhostServe plugin active: group %s, %s", settings.group, settings.protection)
