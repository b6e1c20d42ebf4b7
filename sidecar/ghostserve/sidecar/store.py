"""Parity store: host buffers for parity, bounded by a byte budget, with eviction (pure: no I/O).

Buffers are allocated once per size, pre-touched, and recycled through per-size free lists (first-touch
page faults halve host-memory throughput). The budget bounds everything held: parity in use, parity
reserved for encodes in flight, free buffers kept for reuse, and the ledger's own memory (slots, token
ids, recorded tokens: `charge`/`uncharge`).

Eviction, when a reservation does not fit: free cached buffers of other sizes first, then drop the parity
of whole requests in order of least recompute time saved per parity byte. Recomputing a request of n
tokens costs about n * (1 + n / ATTENTION_TOKENS) token-units (linear layers + attention), and its parity
grows with n, so short requests go first. The request that asks for room is weighed too (with the new
chunk counted): when it is worth less than every candidate victim, nothing is evicted and the reservation
fails. Reservations (encodes in flight) and pinned items (a rebuild reading them) are never evicted; when
nothing else is left, `reserve` raises ResourceExhausted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable

import numpy as np
import numpy.typing as npt
from ghostserve.kernels import cpu
from ghostserve.sidecar import errors

ATTENTION_TOKENS = 4096.0


def recompute_score(tokens: int, parity_bytes: int) -> float:
    """Recompute cost saved per parity byte when a request of `tokens` tokens keeps its parity."""
    return tokens * (1.0 + tokens / ATTENTION_TOKENS) / max(parity_bytes, 1)


def _add(counts: dict[Hashable, int], owner: Hashable, nbytes: int) -> None:
    """counts[owner] += nbytes, keeping no zero entries (owners come and go with requests)."""
    left = counts.get(owner, 0) + nbytes
    if left:
        counts[owner] = left
    else:
        counts.pop(owner, None)


@dataclasses.dataclass(eq=False)
class Item:
    """Parity of one chunk: `buf` is M parity shards back to back (N shards for REPLICATE)."""

    owner: Hashable  # the request that holds it (eviction drops whole owners)
    key: Hashable  # the chunk
    buf: npt.NDArray[np.uint8]
    reserved: bool = True
    pins: int = 0  # rebuilds reading `buf` outside the lock: never evicted or recycled while > 0


class ParityStore:
    """Holds parity items by (owner, key). Not thread safe: callers hold the sidecar's lock."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise errors.InvalidArgument(f"parity budget must be >= 0, got {budget_bytes}")
        self.budget = budget_bytes
        self._items: dict[Hashable, dict[Hashable, Item]] = {}
        self._free: dict[int, list[npt.NDArray[np.uint8]]] = {}
        self.held_bytes = 0  # items, reserved or not
        # Kept as items change, so a reservation costs O(1) however much is held (a 1M-token request
        # holds 4096 chunks; summing them on every reserve made its encodes O(n^2)).
        self._held_by: dict[Hashable, int] = {}  # bytes held per owner
        self._evictable_by: dict[Hashable, int] = {}  # bytes of items neither reserved nor pinned
        self.evictable_bytes = 0
        self.cached_bytes = 0  # free buffers kept for reuse
        self.meta_bytes = 0  # the ledger's memory, charged by the custodian
        self.evictions = 0

    def used_bytes(self) -> int:
        return self.held_bytes + self.cached_bytes + self.meta_bytes

    def charge(
        self,
        nbytes: int,
        *,
        tokens_of: Callable[[Hashable], int],
        on_evict: Callable[[Hashable, list[Hashable]], None],
    ) -> None:
        """Count `nbytes` of ledger memory against the budget, evicting parity (least valuable first)
        to make room. Raises ResourceExhausted, charging nothing, when even that cannot make room."""
        if nbytes <= 0:
            return
        if self._floor() + nbytes > self.budget:
            # Even evicting everything evictable would not make room: refuse before evicting anything.
            raise errors.ResourceExhausted(
                f"sidecar memory budget full: {nbytes} B more for the ledger does not fit "
                f"({self.meta_bytes} B ledger, {self.held_bytes} B parity of {self.budget} B)"
            )
        while self.used_bytes() + nbytes > self.budget:
            if self._drop_cached(other_than=-1):
                continue
            victim = self._victim(exclude=None, tokens_of=tokens_of)
            if victim is None:
                raise errors.ResourceExhausted(
                    f"sidecar memory budget full ({self.used_bytes()} of {self.budget} B in use; "
                    f"{self.meta_bytes} B of it ledger)"
                )
            on_evict(victim, self._evict(victim))
        self.meta_bytes += nbytes

    def uncharge(self, nbytes: int) -> None:
        self.meta_bytes = max(0, self.meta_bytes - max(nbytes, 0))

    def reserve(
        self,
        owner: Hashable,
        key: Hashable,
        nbytes: int,
        *,
        tokens_of: Callable[[Hashable], int],
        on_evict: Callable[[Hashable, list[Hashable]], None],
    ) -> Item:
        """Reserve a buffer of `nbytes` for (owner, key), evicting other owners' parity if needed.

        tokens_of(owner) gives a request's length for the eviction score; on_evict(owner, keys) is told
        which chunks lost their parity. Raises ResourceExhausted (nothing changed except evictions
        already done) when even evicting everything evictable cannot make room, InvalidArgument for a
        key already held.
        """
        if nbytes <= 0:
            raise errors.InvalidArgument(f"parity size must be positive, got {nbytes}")
        if key in self._items.get(owner, {}):
            raise errors.AlreadyExists(f"parity for {key!r} is already held")
        buf = self._take(nbytes, owner=owner, tokens_of=tokens_of, on_evict=on_evict)
        item = Item(owner, key, buf)
        self._items.setdefault(owner, {})[key] = item
        self.held_bytes += nbytes
        _add(self._held_by, owner, nbytes)
        return item

    def _take(
        self,
        nbytes: int,
        *,
        owner: Hashable,
        tokens_of: Callable[[Hashable], int],
        on_evict: Callable[[Hashable, list[Hashable]], None],
    ) -> npt.NDArray[np.uint8]:
        if nbytes > self.budget:
            raise errors.ResourceExhausted(
                f"one chunk's parity ({nbytes} B) exceeds the budget ({self.budget} B)"
            )
        if self._floor() + nbytes > self.budget:
            raise errors.ResourceExhausted(
                f"parity budget full ({self.used_bytes()} of {self.budget} B held by encodes in flight, "
                "pinned parity and the ledger)"
            )
        while True:
            free = self._free.get(nbytes)
            if free:
                self.cached_bytes -= nbytes
                return free.pop()
            if self.used_bytes() + nbytes <= self.budget:
                buf = cpu.aligned_empty(nbytes)  # aligned: the codec's SIMD paths take it whole
                buf.fill(0)  # pre-touch: the encode must not pay the page faults
                return buf
            if self._drop_cached(other_than=nbytes):
                continue
            victim = self._victim(exclude=owner, tokens_of=tokens_of)
            if victim is None:
                victim = self._victim(exclude=None, tokens_of=tokens_of)
            if victim is None:
                raise errors.ResourceExhausted(
                    f"parity budget full ({self.used_bytes()} of {self.budget} B held by encodes in "
                    "flight, pinned parity and the ledger)"
                )
            if victim != owner and self._worth_less(owner, nbytes, than=victim, tokens_of=tokens_of):
                raise errors.ResourceExhausted(
                    "parity budget full and the new chunk's request saves less recompute per byte "
                    "than any request holding parity"
                )
            on_evict(victim, self._evict(victim))

    def _drop_cached(self, *, other_than: int) -> bool:
        for size, bufs in self._free.items():
            if size != other_than and bufs:
                bufs.pop()
                self.cached_bytes -= size
                return True
        return False

    def _floor(self) -> int:
        """What stays used after evicting every evictable item and dropping every cached buffer."""
        return self.meta_bytes + self.held_bytes - self.evictable_bytes

    def _evictable(self, owner: Hashable) -> int:
        return self._evictable_by.get(owner, 0)

    def _count_evictable(self, item: Item, sign: int) -> None:
        """Add (+1) or remove (-1) a held item that is neither reserved nor pinned from the counts."""
        self.evictable_bytes += sign * item.buf.size
        _add(self._evictable_by, item.owner, sign * item.buf.size)

    def _held(self, item: Item) -> bool:
        return self._items.get(item.owner, {}).get(item.key) is item

    def _worth_less(
        self, owner: Hashable, extra: int, *, than: Hashable, tokens_of: Callable[[Hashable], int]
    ) -> bool:
        """Whether `owner`, holding `extra` more bytes, saves less recompute per byte than `than`."""
        mine = self._held_by.get(owner, 0) + extra
        return recompute_score(tokens_of(owner), mine) < recompute_score(
            tokens_of(than), self._evictable(than)
        )

    def _victim(self, *, exclude: Hashable | None, tokens_of: Callable[[Hashable], int]) -> Hashable | None:
        best: tuple[float, Hashable] | None = None
        for owner in self._items:
            if owner == exclude:
                continue
            held = self._evictable(owner)
            if not held:
                continue
            score = recompute_score(tokens_of(owner), held)
            if best is None or score < best[0]:
                best = (score, owner)
        return None if best is None else best[1]

    def _evict(self, owner: Hashable) -> list[Hashable]:
        items = self._items.get(owner, {})
        keys = [k for k, i in items.items() if not i.reserved and not i.pins]
        for k in keys:
            self._recycle(items.pop(k))
        if not items:
            self._items.pop(owner, None)
        self.evictions += len(keys)
        return keys

    def _recycle(self, item: Item) -> None:
        """Account for `item`, just taken out of `_items`, and keep its buffer for reuse if allowed."""
        self.held_bytes -= item.buf.size
        _add(self._held_by, item.owner, -item.buf.size)
        if not item.reserved and not item.pins:
            self._count_evictable(item, -1)
        if item.reserved or item.pins:
            # An encode may still be writing into it, or a rebuild reading it: never hand it out again.
            return
        if self.used_bytes() + item.buf.size <= self.budget:
            self._free.setdefault(item.buf.size, []).append(item.buf)
            self.cached_bytes += item.buf.size

    def commit(self, item: Item) -> None:
        """The encode into `item` finished: it may now be evicted."""
        if item.reserved and not item.pins and self._held(item):
            self._count_evictable(item, +1)
        item.reserved = False

    def pin(self, item: Item) -> None:
        """A rebuild reads `item` outside the lock: it is neither evicted nor recycled until `unpin`."""
        if not item.reserved and not item.pins and self._held(item):
            self._count_evictable(item, -1)
        item.pins += 1

    def unpin(self, item: Item) -> None:
        item.pins -= 1
        if not item.reserved and not item.pins and self._held(item):
            self._count_evictable(item, +1)

    def get(self, owner: Hashable, key: Hashable) -> Item | None:
        return self._items.get(owner, {}).get(key)

    def release(self, owner: Hashable, key: Hashable | None = None) -> int:
        """Free one chunk's parity, or every chunk of `owner` when key is None. Returns bytes freed."""
        items = self._items.get(owner)
        if not items:
            return 0
        keys = list(items) if key is None else [key] if key in items else []
        freed = 0
        for k in keys:
            item = items.pop(k)
            freed += item.buf.size
            self._recycle(item)
        if not items:
            self._items.pop(owner, None)
        return freed

    def evict_least_valuable(
        self,
        pred: Callable[[Hashable], bool],
        *,
        exclude: Hashable,
        tokens_of: Callable[[Hashable], int],
        on_evict: Callable[[Hashable, list[Hashable]], None],
    ) -> bool:
        """Evict the parity of the least valuable owner `pred` accepts, other than `exclude` (the same
        score as the global policy). Returns False when no such owner holds evictable parity."""
        best: tuple[float, Hashable] | None = None
        for owner in self._items:
            held = self._evictable(owner) if owner != exclude and pred(owner) else 0
            if held:
                score = recompute_score(tokens_of(owner), held)
                if best is None or score < best[0]:
                    best = (score, owner)
        if best is None:
            return False
        on_evict(best[1], self._evict(best[1]))
        return True

    def held_where(self, pred: Callable[[Hashable], bool]) -> int:
        """Bytes held (reserved or not) by the owners `pred` accepts."""
        return sum(n for o, n in self._held_by.items() if pred(o))

    def owners(self) -> list[Hashable]:
        return list(self._items)
