"""Hybrid-recovery planner: recompute the first r chunks of a request while the sidecar rebuilds the rest.

Pure Python (stdlib only): the sidecar's PlanRecovery RPC calls it, and everything here is a function of
plain numbers, testable without a sidecar (tests/sidecar/test_planner.py).

Cost model (GhostServe paper, MLSys 2026, ``get_recompute_units``): recomputing chunk ``i`` is a
prefill of T tokens over a prefix of ``i*T`` tokens, so its cost grows with position:

    recompute_chunk(i) = T * per_token_s + T * (i*T + (T+1)/2) * per_token_pair_s

Rebuilding a chunk moves ``lost_ranks * shard_bytes`` through the decoder at ``rebuild_bytes_per_s``.
Recomputing chunks ``[0, r)`` runs on the engine while the sidecar rebuilds the protected chunks
``>= r``; the two overlap, so the plan minimises

    max(recompute(0..r), rebuild(protected chunks >= r)) + recompute(unprotected chunks >= r) + tail

where the last two terms run after the rebuild because they attend to rebuilt KV. The unprotected
tail (tokens after the last committed chunk) is always recomputed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

from ghostserve.kernels import protection


class PlanError(ValueError):
    """Inputs that cannot describe a recovery (negative sizes, chunks out of range)."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Measured speeds of the replacement rank and the sidecar's decoder.

    per_token_s: seconds per prefilled token that do not depend on position (projections, MLP).
    per_token_pair_s: seconds per (query token, key token) pair of attention; makes cost rise with position.
    rebuild_bytes_per_s: throughput of rebuilding lost shards; 0 or inf means rebuild is free.
    """

    per_token_s: float
    per_token_pair_s: float
    rebuild_bytes_per_s: float

    def __post_init__(self) -> None:
        for name in ("per_token_s", "per_token_pair_s", "rebuild_bytes_per_s"):
            value = getattr(self, name)
            if not (value >= 0.0) or math.isnan(value):
                raise PlanError(f"{name} must be >= 0, got {value!r}")

    @classmethod
    def from_prefill_speed(cls, prefill_tokens_per_s: float, rebuild_bytes_per_s: float) -> Calibration:
        """A position-independent model from one measured prefill speed (what PlanRecovery carries).

        prefill_tokens_per_s == 0 means "unknown": recompute is treated as infinitely slow, so every
        protected chunk is rebuilt.
        """
        if prefill_tokens_per_s < 0:
            raise PlanError(f"prefill_tokens_per_s must be >= 0, got {prefill_tokens_per_s!r}")
        per_token = math.inf if prefill_tokens_per_s == 0 else 1.0 / prefill_tokens_per_s
        return cls(per_token_s=per_token, per_token_pair_s=0.0, rebuild_bytes_per_s=rebuild_bytes_per_s)

    @classmethod
    def fit(
        cls,
        samples: Iterable[tuple[int, int, float]],
        *,
        rebuild_bytes_per_s: float,
    ) -> Calibration:
        """Least-squares fit of the cost model to measured prefill chunks.

        samples: (prefix_tokens, chunk_tokens, seconds) of timed prefill forward passes; at least two with
        different prefixes give the position-dependent term. Coefficients are clamped at 0.
        Raises PlanError with fewer than one sample.
        """
        rows = [(t, t * (p + (t + 1) / 2.0), s) for p, t, s in samples]
        if not rows:
            raise PlanError("calibration needs at least one timed prefill")
        sxx = sum(a * a for a, _, _ in rows)
        sxy = sum(a * b for a, b, _ in rows)
        syy = sum(b * b for _, b, _ in rows)
        sxs = sum(a * s for a, _, s in rows)
        sys_ = sum(b * s for _, b, s in rows)
        det = sxx * syy - sxy * sxy
        if det <= 1e-12 * max(sxx * syy, 1e-300):
            # Every sample at the same position: only the linear term is identifiable.
            per_token = sxs / sxx if sxx else 0.0
            return cls(max(per_token, 0.0), 0.0, rebuild_bytes_per_s)
        per_token = (sxs * syy - sys_ * sxy) / det
        per_pair = (sxx * sys_ - sxy * sxs) / det
        if per_pair < 0:
            per_token, per_pair = sxs / sxx, 0.0
        if per_token < 0:
            per_token, per_pair = 0.0, (sys_ / syy if syy else 0.0)
        return cls(max(per_token, 0.0), max(per_pair, 0.0), rebuild_bytes_per_s)

    def prefill_seconds(self, start: int, tokens: int) -> float:
        """Seconds to prefill positions [start, start+tokens)."""
        if tokens <= 0:
            return 0.0
        pairs = tokens * start + tokens * (tokens + 1) / 2.0
        return _mul(tokens, self.per_token_s) + _mul(pairs, self.per_token_pair_s)

    def rebuild_seconds(self, nbytes: int) -> float:
        """Seconds to rebuild nbytes of lost shards."""
        if nbytes <= 0 or self.rebuild_bytes_per_s == 0 or math.isinf(self.rebuild_bytes_per_s):
            return 0.0
        return nbytes / self.rebuild_bytes_per_s


def _mul(count: float, rate: float) -> float:
    # inf * 0 is nan in IEEE; zero work costs nothing even at an unknown (infinite) rate.
    return 0.0 if count == 0 else count * rate


@dataclasses.dataclass(frozen=True)
class RequestLedger:
    """What the planner needs to know about one request.

    total_chunks: chunks every rank committed (chunk c = tokens [c*T, (c+1)*T)).
    unprotected: indices < total_chunks without usable parity (encoder behind, evicted, code NONE).
    tail_tokens: tokens after the last committed chunk that have KV (always recomputed).
    """

    request_id: str
    total_chunks: int
    unprotected: frozenset[int] = frozenset()
    tail_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class RequestPlan:
    """Plan for one request; mirrors ghostserve.v1.RequestPlan."""

    request_id: str
    total_chunks: int
    recompute_chunks: int
    rebuild_chunks: tuple[int, ...]
    unprotected_chunks: tuple[int, ...]
    tail_tokens: int
    estimated_seconds: float


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """Plans of every request of a group plus the estimated wall time of the whole recovery."""

    lost_ranks: tuple[int, ...]
    requests: tuple[RequestPlan, ...]
    estimated_seconds: float


def request_cost(
    ledger: RequestLedger,
    r: int,
    *,
    chunk_tokens: int,
    rebuild_chunk_bytes: int,
    calibration: Calibration,
) -> float:
    """Estimated seconds to recover ``ledger`` when its first ``r`` chunks are recomputed."""
    t = chunk_tokens
    recompute = calibration.prefill_seconds(0, r * t)
    protected_after = sum(1 for c in range(r, ledger.total_chunks) if c not in ledger.unprotected)
    rebuild = calibration.rebuild_seconds(protected_after * rebuild_chunk_bytes)
    after = sum(calibration.prefill_seconds(c * t, t) for c in ledger.unprotected if c >= r)
    after += calibration.prefill_seconds(ledger.total_chunks * t, ledger.tail_tokens)
    return max(recompute, rebuild) + after


def choose_recompute_chunks(
    ledger: RequestLedger,
    *,
    chunk_tokens: int,
    rebuild_chunk_bytes: int,
    calibration: Calibration,
    rebuildable: bool = True,
) -> tuple[int, float]:
    """The paper's get_recompute_units: the smallest r in [0, n] minimising the recovery time.

    rebuildable=False (code NONE, or more ranks lost than parity shards) forces r = n.
    Returns (r, estimated seconds). O(n) with prefix sums; request_cost is the O(n^2) reference.
    """
    _check_ledger(ledger, chunk_tokens)
    n, t = ledger.total_chunks, chunk_tokens
    tail = calibration.prefill_seconds(n * t, ledger.tail_tokens)
    if not rebuildable:
        return n, calibration.prefill_seconds(0, n * t) + tail
    # protected_from[r]: protected chunks >= r; after_from[r]: cost of unprotected chunks >= r.
    protected_from = [0] * (n + 1)
    after_from = [0.0] * (n + 1)
    for c in range(n - 1, -1, -1):
        bad = c in ledger.unprotected
        protected_from[c] = protected_from[c + 1] + (0 if bad else 1)
        after_from[c] = after_from[c + 1] + (calibration.prefill_seconds(c * t, t) if bad else 0.0)
    best_r, best = 0, math.inf
    for r in range(n + 1):
        recompute = calibration.prefill_seconds(0, r * t)
        rebuild = calibration.rebuild_seconds(protected_from[r] * rebuild_chunk_bytes)
        cost = max(recompute, rebuild) + after_from[r] + tail
        # A larger r must win clearly: near-ties (float rounding) keep the smaller recompute.
        if cost < best - 1e-9 * abs(best) - 1e-15 or (best == math.inf and cost < best):
            best_r, best = r, cost
    return best_r, best


def plan_group(
    ledgers: Sequence[RequestLedger],
    *,
    lost_ranks: Sequence[int],
    world_size: int,
    parity_shards: int,
    chunk_tokens: int,
    shard_bytes: int,
    calibration: Calibration,
    code: str = "xor",
) -> GroupPlan:
    """Plan the recovery of every request of a group after ``lost_ranks`` lost their KV.

    shard_bytes: bytes of one rank's shard of one chunk (layout.shard_nbytes(chunk_tokens)).
    code: "none" recomputes everything; "replicate" tolerates any losses; codes tolerate
    ``parity_shards`` losses. Raises PlanError on bad input; returns a new GroupPlan.
    """
    lost = tuple(sorted(set(lost_ranks)))
    if not lost:
        raise PlanError("no lost ranks to plan for")
    if any(r < 0 or r >= world_size for r in lost):
        raise PlanError(f"lost ranks {list(lost)} out of range for world size {world_size}")
    if shard_bytes < 0 or parity_shards < 0:
        raise PlanError("shard_bytes and parity_shards must be >= 0")
    rebuildable = protection.tolerates(code.lower(), parity_shards, len(lost), world_size)
    rebuild_chunk_bytes = len(lost) * shard_bytes
    plans = []
    total_recompute = total_rebuild = total_after = 0.0
    for ledger in ledgers:
        r, seconds = choose_recompute_chunks(
            ledger,
            chunk_tokens=chunk_tokens,
            rebuild_chunk_bytes=rebuild_chunk_bytes,
            calibration=calibration,
            rebuildable=rebuildable,
        )
        rebuild = tuple(c for c in range(r, ledger.total_chunks) if c not in ledger.unprotected)
        unprotected = tuple(sorted(c for c in ledger.unprotected if c >= r))
        plans.append(
            RequestPlan(
                ledger.request_id, ledger.total_chunks, r, rebuild, unprotected, ledger.tail_tokens, seconds
            )
        )
        t = chunk_tokens
        total_recompute += calibration.prefill_seconds(0, r * t)
        total_rebuild += calibration.rebuild_seconds(len(rebuild) * rebuild_chunk_bytes)
        total_after += sum(calibration.prefill_seconds(c * t, t) for c in unprotected)
        total_after += calibration.prefill_seconds(ledger.total_chunks * t, ledger.tail_tokens)
    # Requests are recomputed one after another on the engine and rebuilt one after another by the
    # sidecar; the two streams overlap, the post-rebuild recompute does not.
    estimate = max(total_recompute, total_rebuild) + total_after
    return GroupPlan(lost, tuple(plans), estimate)


def _check_ledger(ledger: RequestLedger, chunk_tokens: int) -> None:
    if chunk_tokens <= 0:
        raise PlanError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    if ledger.total_chunks < 0 or ledger.tail_tokens < 0:
        raise PlanError(f"request {ledger.request_id!r}: negative chunk or tail count")
    bad = [c for c in ledger.unprotected if c < 0 or c >= ledger.total_chunks]
    if bad:
        raise PlanError(f"request {ledger.request_id!r}: unprotected chunks {sorted(bad)} out of range")
