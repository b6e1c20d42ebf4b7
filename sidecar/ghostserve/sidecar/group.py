"""One group of tensor-parallel ranks as the sidecar holds it: settings, a pool per rank, the ledger."""

from __future__ import annotations

import dataclasses
import re
import secrets
import threading
from typing import Any

from ghostserve.kernels import layout as kvlayout
from ghostserve.sidecar import coding, errors, ledger, persist, pools

GROUP_ID = re.compile(r"^[A-Za-z0-9._/-]{1,200}$")
MAX_DIM = {"layers": 4096, "kv_heads": 4096, "head_dim": 65536, "page_size": 1 << 20, "pool_slots": 1 << 31}


def check_group_id(group: str) -> None:
    if not GROUP_ID.match(group):
        raise errors.InvalidArgument(f"group id must match [A-Za-z0-9._/-]{{1,200}}, got {group[:64]!r}")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the first Attach fixes for a group; later attaches must match it."""

    world_size: int
    layout: kvlayout.KVLayout
    protection: coding.Protection
    kind: str = "cpu"


def check_settings(settings: Settings) -> None:
    """Raises InvalidArgument for sizes or chunk lengths the sidecar cannot hold (codes and parity
    counts were checked when the Protection was made: ghostserve.kernels.protection)."""
    n, lay, prot = settings.world_size, settings.layout, settings.protection
    if not 1 <= n <= 256:
        raise errors.InvalidArgument(f"world_size must be in [1, 256], got {n}")
    for name, limit in MAX_DIM.items():
        if getattr(lay, name) > limit:
            raise errors.InvalidArgument(f"layout.{name} {getattr(lay, name)} exceeds {limit}")
    if prot.chunk_tokens < 1 or prot.chunk_tokens % lay.page_size or prot.chunk_tokens > lay.pool_slots:
        raise errors.InvalidArgument(
            f"chunk_tokens {prot.chunk_tokens} must be a positive multiple of page_size {lay.page_size} "
            f"and at most pool_slots {lay.pool_slots}"
        )


@dataclasses.dataclass(eq=False)
class RankPool:
    segment: pools.Segment | None = None
    generation: int = 0
    attached: bool = False
    worker_id: str = ""
    valid: bool = True
    # GPU UUID given by the rank's last Attach ("" = unknown), and when it attached (a sidecar-wide
    # counter): health events name the rank that holds a GPU now (ghostserve.sidecar.devices).
    device_uuid: str = ""
    attach_seq: int = 0


class Group:
    """A group's pools and ledger, guarded by its own `lock` (taken before the custodian's lock, never
    after it). `creator` is the identity whose Attach created it (authz: its owner)."""

    def __init__(
        self, name: str, settings: Settings, *, codec: Any, uid: str = "", creator: str = ""
    ) -> None:
        self.name = name
        self.lock = threading.RLock()
        self.creator = creator
        # This incarnation of the group (kept by a move): the same id from another deployment differs.
        self.uid = uid or secrets.token_hex(8)
        # The group's own parity budget within the sidecar's (0 = none); set by Attach or a move.
        self.budget_bytes = 0
        # What Rebuild restored into these pools, by any caller (DescribeGroup reports it): lets the
        # operator count a rebuild that happened before its own Rebuild call (which then finds nothing).
        self.bytes_rebuilt = 0
        self.chunks_rebuilt = 0
        self.key = persist.key_of(name)
        self.settings = settings
        self.codec = codec
        self.ranks = [RankPool() for _ in range(settings.world_size)]
        lay, prot = settings.layout, settings.protection
        self.ledger = ledger.Ledger(
            world_size=settings.world_size, chunk_tokens=prot.chunk_tokens, pool_slots=lay.pool_slots
        )
        self.shard_nbytes = lay.shard_nbytes(prot.chunk_tokens)
        self.parity_nbytes = prot.stored_shards(settings.world_size) * self.shard_nbytes

    @property
    def layout(self) -> kvlayout.KVLayout:
        return self.settings.layout

    @property
    def protection(self) -> coding.Protection:
        return self.settings.protection

    def check_rank(self, rank: int) -> RankPool:
        if not 0 <= rank < self.settings.world_size:
            raise errors.InvalidArgument(f"rank {rank} out of range [0, {self.settings.world_size})")
        return self.ranks[rank]

    def pool_info(self, rank: int) -> pools.PoolInfo | None:
        rp = self.ranks[rank]
        if rp.segment is None:
            return None
        return pools.PoolInfo(
            self.settings.kind, rp.segment.name, rp.segment.nbytes, self.layout.row_bytes, rp.generation
        )

    def generations(self) -> tuple[int, ...]:
        return tuple(rp.generation for rp in self.ranks)

    def healthy(self) -> bool:
        """Every rank holds a valid pool (nothing to rebuild)."""
        return all(rp.valid and rp.segment is not None for rp in self.ranks)

    def pool_bytes(self) -> int:
        return sum(rp.segment.nbytes for rp in self.ranks if rp.segment is not None)

    def owner(self, request_id: str) -> tuple[str, str]:
        """The parity store's owner key of one request."""
        return (self.name, request_id)

    def to_state(self) -> dict[str, Any]:
        s = self.settings
        return {
            "world_size": s.world_size,
            "layout": dataclasses.asdict(s.layout),
            "protection": dataclasses.asdict(s.protection),
            "kind": s.kind,
            "uid": self.uid,
            "creator": self.creator,
            "budget_bytes": self.budget_bytes,
            "ranks": [
                {
                    "shm_name": rp.segment.name if rp.segment else None,
                    "generation": rp.generation,
                    "valid": rp.valid,
                    "device_uuid": rp.device_uuid,
                }
                for rp in self.ranks
            ],
        }


def settings_from_state(data: dict[str, Any]) -> Settings:
    return Settings(
        world_size=int(data["world_size"]),
        layout=kvlayout.KVLayout(**data["layout"]),
        protection=coding.Protection(**data["protection"]),
        kind=str(data.get("kind", "cpu")),
    )
