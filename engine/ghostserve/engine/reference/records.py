"""What the reference engine's driver works with: requests, options, fault specs, counters, errors
(plain dataclasses; ``engine`` re-exports them as its public names)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ghostserve.engine.reference import devices


class EngineError(RuntimeError):
    """The engine cannot go on (bad request, unrecoverable fault)."""


@dataclasses.dataclass
class Request:
    """One generation request; ``tokens`` is prompt + generated so far, KV exists for [0, kv_len)."""

    request_id: str
    prompt: list[int]
    max_new_tokens: int
    arrival_s: float = 0.0
    tokens: list[int] = dataclasses.field(default_factory=list)
    kv_len: int = 0
    finished_s: float | None = None
    digests: list[list[str]] | None = None

    def __post_init__(self) -> None:
        if not self.prompt or self.max_new_tokens <= 0:
            raise EngineError(f"request {self.request_id!r} needs a prompt and max_new_tokens > 0")
        if not self.tokens:
            self.tokens = list(self.prompt)

    @property
    def output(self) -> list[int]:
        return self.tokens[len(self.prompt) :]

    @property
    def done(self) -> bool:
        return len(self.output) >= self.max_new_tokens


@dataclasses.dataclass(frozen=True)
class Options:
    tp: int = 2
    code: str = "xor"
    parity_shards: int | None = None
    chunk_tokens: int = 16
    page_size: int = 16
    pool_slots: int = 2048
    threads_per_rank: int = 1
    record_digests: bool = False
    # False: ranks commit nothing (no checkpointing at all), the "protection off" side of the overhead
    # benchmark. The sidecar still holds the pools.
    protect: bool = True
    # Rebuild bandwidth the planner assumes (bytes/s); None = measured by the sidecar. Tests set a low
    # value to force hybrid plans (r > 0) on a machine where rebuilding tiny shards is nearly free.
    plan_rebuild_bytes_per_s: float | None = None
    # Prefill speed the planner assumes (tokens/s); None = measured from this engine's prefill steps.
    plan_prefill_tokens_per_s: float | None = None
    # An operation (step, finish, recovery) that fails this many times in a row is a bug, not a fault.
    max_attempts: int = 8
    # How long a sidecar that stopped answering is waited for before serving ends.
    sidecar_wait_s: float = 60.0
    # Each rank's GPU (devices.Device.for_rank); empty: no GPU (CPU-only runs).
    devices: tuple[devices.Device, ...] = ()


@dataclasses.dataclass(frozen=True)
class Fault:
    """Inject at step ``at_step`` (while that step is in flight): SIGKILL ``ranks``; a device fault
    also destroys their pools in the sidecar (MarkLost)."""

    at_step: int
    kind: str  # "process" | "device"
    ranks: tuple[int, ...]
    # Wait for the sidecar's encode queue first, so every committed chunk is protected when the fault hits.
    flush: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("process", "device"):
            raise EngineError(f"fault kind must be 'process' or 'device', got {self.kind!r}")
        if not self.ranks or self.at_step < 0:
            raise EngineError("a fault needs at least one rank and a step >= 0")


@dataclasses.dataclass
class Counters:
    steps: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    step_tokens: int = 0  # every step, mixed prefill/decode included
    step_seconds: float = 0.0
    generations: int = 0
    recovery_restarts: int = 0  # recoveries started over (a fault or sidecar outage during one)


class DeviceLost(EngineError):
    """A rank's GPU took a fatal fault: this process tree cannot go on (reschedule it without that GPU)."""

    def __init__(self, ranks: Sequence[int]) -> None:
        super().__init__(f"rank(s) {list(ranks)} lost their GPU")
        self.ranks = list(ranks)


@dataclasses.dataclass
class RecoveryReport:
    """What one recovery did and how long each phase took (seconds, measured)."""

    kind: str  # "process" | "device"
    dead_ranks: list[int]
    lost_ranks: list[int]
    restart_s: float = 0.0
    restore_s: float = 0.0  # rebuild + recompute, after the restart
    rebuild_s: float = 0.0  # the sidecar's Rebuild call (overlaps head_s)
    head_s: float = 0.0  # recompute of the planned first r chunks
    after_s: float = 0.0  # recompute after the rebuild: unrebuilt chunks and the tail
    total_s: float = 0.0
    bytes_rebuilt: int = 0
    chunks_rebuilt: int = 0
    chunks_recomputed: int = 0
    tokens_recomputed: int = 0
    failed_chunks: int = 0
    plan: dict[str, int] = dataclasses.field(default_factory=dict)  # request -> r
    failures: dict[str, int] = dataclasses.field(default_factory=dict)  # ChunkFailure name -> chunks
