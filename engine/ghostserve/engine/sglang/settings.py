"""Plugin settings from the environment of each scheduler process (pure: no sglang, no I/O).

sglang spawns its scheduler processes, so settings travel as environment variables, which spawned
children inherit. Every variable is optional except that the plugin stays inert unless
GHOSTSERVE_SGLANG=1, so installing GhostServe never changes a plain sglang deployment.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping

from ghostserve.engine import adapter

PREFIX = "GHOSTSERVE_"
_GROUP = re.compile(r"^[A-Za-z0-9._/-]{1,200}$")


class SurvivorPolicy(enum.Enum):
    """What a scheduler does when its event loop dies of a peer rank's failure (docs/design.md §1)."""

    # Detach from the sidecar (the pool stays in custody) and exit with EXIT_PEER_FAULT, without
    # sglang's SIGQUIT to the parent; the operator restarts the rank, which re-attaches its pool.
    DETACH_EXIT = "detach-exit"
    # sglang's own reaction: log, SIGQUIT the parent, which kills the whole process tree.
    SGLANG = "sglang"


class SettingsError(ValueError):
    """A GHOSTSERVE_* variable has a value the plugin cannot use; the message names it."""


@dataclasses.dataclass(frozen=True)
class PluginSettings:
    """Everything the plugin reads from the environment; see docs/sglang.md for each variable."""

    enabled: bool = False
    sidecar: str = "unix:///run/ghostserve/sidecar.sock"
    group: str = "default"
    protection: adapter.Protection = dataclasses.field(default_factory=adapter.Protection)
    # Tensor-parallel rank and size; None = ask sglang's parallel state (set in serving processes).
    rank: int | None = None
    world_size: int | None = None
    survivor_policy: SurvivorPolicy = SurvivorPolicy.DETACH_EXIT
    rpc_timeout: float = 5.0
    worker_id: str = ""
    # Parity budget of this replica's group in bytes (GHOSTSERVE_PARITY_BUDGET; 0 = the sidecar's own).
    parity_budget_bytes: int = 0
    # GPU UUIDs given to the container (NVIDIA_VISIBLE_DEVICES); rank i runs on the i-th one.
    device_uuids: tuple[str, ...] = ()
    # Forward passes a restored prefix stays pinned waiting for its request to be resubmitted.
    resume_grace_passes: int = 10000

    def device_uuid(self, rank: int) -> str:
        """The GPU UUID of TP rank `rank` ("" on CPU or when the container was not given UUIDs)."""
        return self.device_uuids[rank] if rank < len(self.device_uuids) else ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PluginSettings:
        """Parse GHOSTSERVE_* variables. Raises SettingsError naming the first bad variable."""

        def get(name: str, default: str) -> str:
            return env.get(PREFIX + name, default).strip()

        enabled = _flag(get("SGLANG", "0"), "GHOSTSERVE_SGLANG")
        group = get("GROUP", "default")
        if not _GROUP.match(group):
            raise SettingsError(f"GHOSTSERVE_GROUP must match [A-Za-z0-9._/-]{{1,200}}, got {group!r}")
        code = get("CODE", "xor").lower()
        parity_text = get("PARITY_SHARDS", "")
        parity = _int(parity_text, "GHOSTSERVE_PARITY_SHARDS", low=0) if parity_text else None
        chunk = _int(get("CHUNK_TOKENS", "256"), "GHOSTSERVE_CHUNK_TOKENS", low=1)
        try:
            protection = adapter.Protection(code=code, parity_shards=parity, chunk_tokens=chunk)
        except ValueError as exc:
            raise SettingsError(f"GHOSTSERVE_CODE/PARITY_SHARDS/CHUNK_TOKENS: {exc}") from exc
        policy_text = get("SURVIVOR_POLICY", SurvivorPolicy.DETACH_EXIT.value)
        try:
            policy = SurvivorPolicy(policy_text)
        except ValueError as exc:
            allowed = ", ".join(p.value for p in SurvivorPolicy)
            raise SettingsError(
                f"GHOSTSERVE_SURVIVOR_POLICY must be one of {allowed}, got {policy_text!r}"
            ) from exc
        timeout_text = get("RPC_TIMEOUT", "5")
        try:
            timeout = float(timeout_text)
        except ValueError as exc:
            raise SettingsError(
                f"GHOSTSERVE_RPC_TIMEOUT must be a number of seconds, got {timeout_text!r}"
            ) from exc
        if not timeout > 0:
            raise SettingsError(f"GHOSTSERVE_RPC_TIMEOUT must be > 0, got {timeout_text!r}")
        return cls(
            parity_budget_bytes=_int(get("PARITY_BUDGET", "0") or "0", "GHOSTSERVE_PARITY_BUDGET", low=0),
            device_uuids=device_uuids(env.get("NVIDIA_VISIBLE_DEVICES", "")),
            resume_grace_passes=_int(
                get("RESUME_GRACE_PASSES", "10000"), "GHOSTSERVE_RESUME_GRACE_PASSES", low=1
            ),
            enabled=enabled,
            sidecar=get("SIDECAR", cls.sidecar),
            group=group,
            protection=protection,
            rank=_optional_int(get("RANK", ""), "GHOSTSERVE_RANK", low=0),
            world_size=_optional_int(get("WORLD_SIZE", ""), "GHOSTSERVE_WORLD_SIZE", low=1),
            survivor_policy=policy,
            rpc_timeout=timeout,
            worker_id=get("WORKER_ID", ""),
        )


def device_uuids(visible: str) -> tuple[str, ...]:
    """GPU UUIDs listed in NVIDIA_VISIBLE_DEVICES, in order; () for indices, "all", "none" or "void"."""
    items = tuple(x.strip() for x in visible.split(",") if x.strip())
    if not items or not all(x.startswith(("GPU-", "MIG-")) for x in items):
        return ()
    return items


def check_page_size(settings: PluginSettings, page_size: int) -> None:
    """Chunks must be whole pages (docs/design.md §3). Raises SettingsError otherwise."""
    if settings.protection.chunk_tokens % page_size:
        raise SettingsError(
            f"GHOSTSERVE_CHUNK_TOKENS={settings.protection.chunk_tokens} is not a multiple of "
            f"sglang's --page-size {page_size}"
        )


def _flag(text: str, name: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise SettingsError(f"{name} must be 0 or 1, got {text!r}")


def _optional_int(text: str, name: str, *, low: int) -> int | None:
    return _int(text, name, low=low) if text else None


def _int(text: str, name: str, *, low: int) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {text!r}") from exc
    if value < low:
        raise SettingsError(f"{name} must be >= {low}, got {value}")
    return value
