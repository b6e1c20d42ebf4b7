"""One group of tensor-parallel ranks as the sidecar holds it: settings, a pool per rank, the ledger."""

from __future__ import annotations

import dataclasses
import re
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
    """Raises InvalidArgument for sizes, codes or chunk lengths the sidecar cannot hold."""
    n, lay, prot = settings.world_size, settings.layout, settings.protection
    if not 1 <= n <= 256:
        raise errors.InvalidArgument(f"world_size must be in [1, 256], got {n}")
    for name, limit in MAX_DIM.items():
        if getattr(lay, name) > limit:
            raise errors.InvalidArgument(f"layout.{name} {getattr(lay, name)} exceeds {limit}")
    if prot.code not in coding.CODES:
        raise errors.InvalidArgument(f"unknown code {prot.code!r}")
    if prot.chunk_tokens < 1 or prot.chunk_tokens % lay.page_size or prot.chunk_tokens > lay.pool_slots:
        raise errors.InvalidArgument(
            f"chunk_tokens {prot.chunk_tokens} must be a positive multiple of page_size {lay.page_size} "
            f"and at most pool_slots {lay.pool_slots}"
        )
    expected = {"xor": (1, 1), "rdp": (2, 2), "rs": (1, 8)}.get(prot.code)
    if expected and not expected[0] <= prot.parity_shards <= expected[1]:
        raise errors.InvalidArgument(
            f"{prot.code} needs {expected[0]}..{expected[1]} parity shards, got {prot.parity_shards}"
        )


@dataclasses.dataclass(eq=False)
class RankPool:
    segment: pools.Segment | None = None
    generation: int = 0
    attached: bool = False
    worker_id: str = ""
    valid: bool = True


class Group:
    """A group's pools and ledger. Not thread safe: the custodian's lock guards it."""

    def __init__(self, name: str, settings: Settings, *, codec: Any) -> None:
        self.name = name
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
            "ranks": [
                {
                    "shm_name": rp.segment.name if rp.segment else None,
                    "generation": rp.generation,
                    "valid": rp.valid,
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
