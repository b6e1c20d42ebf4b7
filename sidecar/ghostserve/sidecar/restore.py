"""Start-up: re-adopt the groups of a previous sidecar run.

Pools come back from the state file (a segment that vanished becomes a fresh pool marked for rebuild),
chunk records from the ledger journal (as unprotected), parity from the spill dir (as protected, checked
by the same checksums at rebuild time). Runs before the server accepts calls.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from ghostserve.sidecar import coding, core, errors, group, ledger, persist

log = logging.getLogger("ghostserve.sidecar")


def restore(c: core.Custodian) -> int:
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
                log.warning(json.dumps({"event": "restore-failed", "group": name, "error": str(exc)}))
        c.save_state()
        return len(c.groups)


def _restore_group(c: core.Custodian, name: str, data: dict[str, Any]) -> None:
    settings = group.settings_from_state(data)
    group.check_settings(settings)
    g = group.Group(name, settings, codec=coding.make_codec(settings.protection, settings.world_size))
    custody = c.custody(settings.kind)
    for rp, rank_data in zip(g.ranks, data["ranks"], strict=True):
        rp.generation = int(rank_data["generation"])
        rp.valid = bool(rank_data["valid"])
        if rank_data["shm_name"]:
            try:
                rp.segment = custody.adopt(rank_data["shm_name"], g.layout.pool_nbytes)
            except errors.NotFound:
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
    if c.journal:
        c.journal.rewrite(
            name,
            [
                core.chunk_record(rid, c)
                for rid, req in g.ledger.requests.items()
                for c in req.complete_chunks()
            ],
        )
    log.info(json.dumps({"event": "group-restored", "group": name, "requests": len(g.ledger.requests)}))


def _replay_journal(c: core.Custodian, g: group.Group) -> None:
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


def _restore_spill(c: core.Custodian, g: group.Group) -> None:
    assert c.spill is not None
    for meta, path in c.spill.load_group(g.name):
        rid, idx = str(meta["request_id"]), int(meta["index"])
        known = g.ledger.requests.get(rid)
        if c.journal is not None and (known is None or idx not in known.chunks):
            # The journal is written before any spill: a record it lacks was released or dropped.
            c.spill.delete_chunk(g.name, rid, idx)
            continue
        slots = np.asarray(meta["slots"], dtype=np.int64)
        tokens = np.asarray(meta["token_ids"], dtype=np.int64)
        try:
            for rank in range(g.settings.world_size):
                g.ledger.commit(rank, rid, idx, slots=slots, token_ids=tokens)
            chunk = g.ledger.requests[rid].chunks[idx]
            item = c.store.reserve(
                g.owner(rid), idx, g.parity_nbytes, tokens_of=c._tokens_of, on_evict=c._on_evict
            )
        except errors.SidecarError:
            c.spill.delete_chunk(g.name, rid, idx)
            continue
        with open(path, "rb") as f:
            f.readinto(item.buf.data)
        c.store.commit(item)
        chunk.state, chunk.checksums = ledger.State.PROTECTED, tuple(int(s) for s in meta["checksums"])
        chunk.parity_bytes = g.parity_nbytes
