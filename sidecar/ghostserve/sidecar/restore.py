"""Start-up: re-adopt the groups of a previous sidecar run.

Pools come back from the state file (a segment that vanished, or that is not a regular file owned by
this uid with mode 0660 or tighter, becomes a fresh pool marked for rebuild), chunk records from the
ledger journal (as unprotected), parity from the spill dir (as protected, checked by the same checksums
at rebuild time). A spill record that does not check out is dropped alone: its chunk stays unprotected
and the rest of the group is restored. Runs before the server accepts calls.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from ghostserve.sidecar import coding, commits, custodian, errors, group, ledger, persist, pools

log = logging.getLogger("ghostserve.sidecar")


def restore(c: custodian.Custodian) -> int:
    """Re-adopt the groups of a previous run from the state dir (pools) and spill dir (parity,
    ledger). A segment that is gone leaves its rank with a fresh pool marked for rebuild. Returns the
    number of groups restored."""
    if c.config.state_dir is None:
        return 0
    state = persist.load_state(c.config.state_dir)
    if not state:
        return 0
    with c.lock:
        for name, data in state.get("groups", {}).items():
            try:
                _restore_group(c, name, data)
            except (errors.SidecarError, KeyError, TypeError, ValueError) as exc:
                log.warning("restore-failed", extra={"group": name, "error": str(exc)})
        c.save_state()
        return len(c.groups)


def _restore_group(c: custodian.Custodian, name: str, data: dict[str, Any]) -> None:
    settings = group.settings_from_state(data)
    group.check_settings(settings)
    g = group.Group(
        name,
        settings,
        codec=coding.make_codec(settings.protection, settings.world_size),
        uid=str(data.get("uid", "")),
        creator=str(data.get("creator", "")),
    )
    g.budget_bytes = int(data.get("budget_bytes", 0))
    custody = c.custody(settings.kind)
    for rp, rank_data in zip(g.ranks, data["ranks"], strict=True):
        rp.generation = int(rank_data["generation"])
        rp.valid = bool(rank_data["valid"])
        rp.device_uuid = str(rank_data.get("device_uuid", ""))
        if rank_data["shm_name"]:
            shm_name = str(rank_data["shm_name"])
            try:
                rp.segment = custody.adopt(shm_name, g.layout.pool_nbytes)
            except (errors.NotFound, errors.FailedPrecondition, errors.InvalidArgument) as exc:
                if not isinstance(exc, errors.NotFound):
                    # Not a segment this sidecar made (a link, another owner, a loose mode): its bytes
                    # are not trusted as KV. The name is removed (a link itself, never its target).
                    log.warning("pool-discarded", extra={"group": name, "segment": shm_name, "why": str(exc)})
                    pools.discard(shm_name)
                rp.segment, rp.generation, rp.valid = (
                    custody.create(g.layout.pool_nbytes),
                    rp.generation + 1,
                    False,
                )
    c.groups[name] = g
    c.metrics.pool_bytes.inc(g.pool_bytes())
    _replay_journal(c, g)
    if c.spill:
        _restore_spill(c, g)
    c.store.meta_bytes += sum(commits.request_cost(req) for req in g.ledger.requests.values())
    if c.journal:
        commits.compact_journal(c, g)
    log.info("group-restored", extra={"group": name, "requests": len(g.ledger.requests)})


def _replay_journal(c: custodian.Custodian, g: group.Group) -> None:
    """Chunks completed before the restart come back committed and unprotected (their parity is
    gone unless the spill dir has it)."""
    if c.journal is None:
        return
    for rec in c.journal.load(g.name):
        rid = str(rec.get("r", ""))
        if rec.get("op") == "release":
            g.ledger.requests.pop(rid, None)
        elif rec.get("op") == "drop":
            req = g.ledger.requests.get(rid)
            if req is not None:
                req.chunks.pop(int(rec["c"]), None)
        elif rec.get("op") == "chunk":
            slots = np.asarray(rec["s"], dtype=np.int64)
            tokens = np.asarray(rec["t"], dtype=np.int64)
            try:
                for rank in range(g.settings.world_size):
                    chunk, _ = g.ledger.commit(rank, rid, int(rec["c"]), slots=slots, token_ids=tokens)
            except errors.SidecarError:
                continue
            chunk.state, chunk.failure = ledger.State.UNPROTECTED, ledger.Failure.NOT_PROTECTED


def _restore_spill(c: custodian.Custodian, g: group.Group) -> None:
    assert c.spill is not None
    for meta, meta_path, bin_path in c.spill.load_group(g.name):
        try:
            rid, idx, slots, tokens, sums = _check_record(g, meta)
        except (KeyError, TypeError, ValueError, OverflowError, errors.SidecarError) as exc:
            log.warning(
                "spill-record-dropped",
                extra={"group": g.name, "path": str(meta_path), "why": str(exc)},
            )
            c.spill.delete_record(meta_path)
            continue
        known = g.ledger.requests.get(rid)
        if c.journal is not None and (known is None or idx not in known.chunks):
            # The journal is written before any spill: a record it lacks was released or dropped.
            c.spill.delete_record(meta_path)
            continue
        if not _adopt_parity(c, g, rid, idx, slots, tokens, sums, bin_path):
            log.warning(
                "spill-record-dropped",
                extra={"group": g.name, "path": str(meta_path), "why": "parity file unusable"},
            )
            c.spill.delete_record(meta_path)


def _check_record(g: group.Group, meta: dict[str, Any]) -> tuple[str, int, Any, Any, tuple[int, ...]]:
    """The fields of a spill record, checked against the group. Raises on anything off."""
    rid, idx = meta["request_id"], meta["index"]
    if not isinstance(rid, str) or not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
        raise ValueError("bad request id or chunk index")
    ledger.check_request_id(rid)
    slots = np.asarray(meta["slots"], dtype=np.int64)
    tokens = np.asarray(meta["token_ids"], dtype=np.int64)
    sums = tuple(int(s) for s in meta["checksums"])
    if slots.ndim != 1 or tokens.ndim != 1:
        raise ValueError("slots and token ids must be lists")
    if len(sums) != g.settings.world_size or any(not 0 <= s < 1 << 64 for s in sums):
        raise ValueError(f"{len(sums)} checksums for {g.settings.world_size} ranks")
    if meta["parity_nbytes"] != g.parity_nbytes:
        raise ValueError(f"parity of {meta['parity_nbytes']} B, the group's is {g.parity_nbytes} B")
    return rid, idx, slots, tokens, sums


def _adopt_parity(
    c: custodian.Custodian,
    g: group.Group,
    rid: str,
    idx: int,
    slots: Any,
    tokens: Any,
    sums: tuple[int, ...],
    path: Any,
) -> bool:
    """Commit the chunk for every rank (ledger checks slots and ids) and load its parity."""
    assert c.spill is not None
    try:
        for rank in range(g.settings.world_size):
            g.ledger.commit(rank, rid, idx, slots=slots, token_ids=tokens)
        chunk = g.ledger.requests[rid].chunks[idx]
        item = c.store.reserve(g.owner(rid), idx, g.parity_nbytes, tokens_of=c.tokens_of, on_evict=c.on_evict)
    except errors.SidecarError:
        return False
    try:
        ok = c.spill.read_parity(path, item.buf)
    except OSError:
        ok = False
    if not ok:
        c.store.release(g.owner(rid), idx)
        chunk.state, chunk.failure = ledger.State.UNPROTECTED, ledger.Failure.NOT_PROTECTED
        return False
    c.store.commit(item)
    chunk.state, chunk.checksums, chunk.parity_bytes = ledger.State.PROTECTED, sums, g.parity_nbytes
    return True
