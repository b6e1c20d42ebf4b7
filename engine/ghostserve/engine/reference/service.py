"""The serving loop of `ghostserve serve`: one driver thread owns the engine; HTTP handlers talk to it
through an inbox and per-request event callbacks.

Requests arrive and finish continuously (the engine batches every admitted request into each step).
A request is admitted once its whole length (prompt + max_new_tokens) fits in free pages; until then
it waits in arrival order.

**Held requests and resubmission (the contract with the gateway).** A request whose client went
away (its stream was cut), and every request the sidecar's ledger lists when the process tree starts
(the pod was restarted, rescheduled after a GPU fault or moved to another node), is *held*: its
pages stay reserved and its ledger entry (tokens, chunks, parity) stays in the sidecar for
``GHOSTSERVE_RESUME_WAIT_S`` seconds (default 120). When the client resubmits it with the same
``rid`` and ``input_ids`` = prompt + the tokens it received, the engine reuses the KV the sidecar still
holds (``meta_info.cached_tokens``), recomputes the rest exactly as first computed and continues; the
output is the uninterrupted run's, token for token. A held request nobody resubmits in time is
released (pages freed, ledger entry and parity dropped). A resubmission whose prompt differs from the
held one is served as a new request (the held one is released first).

Shutdown (SIGTERM) keeps every in-flight request in the ledger (the next process tree holds it); only
a finished or expired request is released. The group itself is never deleted here: it belongs to the
deployment, the operator deletes it.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from ghostserve.engine.reference import engine as engine_mod
from ghostserve.engine.reference import kvpool, resume, serveargs
from ghostserve.engine.reference import rank as rank_mod
from ghostserve.engine.reference.jobs import Event, Failure, Held, Job, Output  # noqa: F401 (re-exported)

log = logging.getLogger("ghostserve.serve")


class Service:
    """Owns the engine on its own thread. ``submit``/``cancel`` are safe from any thread."""

    def __init__(self, cfg: serveargs.ServeConfig, *, opts: engine_mod.Options | None = None) -> None:
        self.cfg = cfg
        self.opts = opts or engine_mod.Options(
            tp=cfg.tp,
            code=cfg.protection.code,
            parity_shards=cfg.protection.parity_shards,
            chunk_tokens=cfg.protection.chunk_tokens,
            page_size=cfg.page_size,
            pool_slots=cfg.pool_slots,
            devices=cfg.devices,
        )
        if cfg.workdir is None:
            raise ValueError("Service needs a workdir for the ranks' gloo stores")
        self.engine = engine_mod.ReferenceEngine(
            cfg.model, self.opts, sidecar=cfg.sidecar, group=cfg.group, workdir=cfg.workdir
        )
        self.engine.client.timeout = cfg.rpc_timeout
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.jobs: dict[str, Job] = {}
        self.waiting: list[Job] = []
        self.held: dict[str, Held] = {}
        self.ready = threading.Event()
        self.stopped = threading.Event()
        self.exit_code = 0
        self.error = ""
        self.on_exit: Callable[[int], None] | None = None
        self.snapshot: dict[str, Any] = {"ready": False}
        self._thread = threading.Thread(target=self._run, name="gs-driver", daemon=True)

    # ---- any thread -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        self.inbox.put(("submit", job))

    def cancel(self, rid: str) -> None:
        """The client went away: hold the request for a resubmission."""
        self.inbox.put(("cancel", rid))

    def stop(self, *, timeout_s: float = 60.0) -> None:
        self.inbox.put(("stop", None))
        self._thread.join(timeout_s)

    @staticmethod
    def new_rid() -> str:
        return uuid.uuid4().hex

    # ---- driver thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        eng = self.engine
        try:
            eng.guarded(eng.start, what="start")
            self._rebuild_lost()
            self._load_held()
            self.ready.set()
            self._publish_state()
            while self._serve_once():
                pass
            self._shutdown()
        except engine_mod.DeviceLost as exc:
            self._fatal(f"device lost: {exc}", 4)
        except Exception as exc:  # anything else ends this process tree; the pod restarts it
            log.exception("serving failed")
            self._fatal(f"{type(exc).__name__}: {exc}", 1)
        finally:
            self.stopped.set()
            if self.on_exit is not None:
                self.on_exit(self.exit_code)

    def _serve_once(self) -> bool:
        eng = self.engine
        busy = bool(eng.requests)
        try:
            kind, arg = self.inbox.get(timeout=0 if busy else 0.2)
        except queue.Empty:
            kind, arg = "", None
        while kind:
            if kind == "stop":
                return False
            if kind == "submit":
                self._admit(arg)
            elif kind == "cancel":
                self._hold(arg)
            try:
                kind, arg = self.inbox.get_nowait()
            except queue.Empty:
                kind = ""
        self._expire()
        self._admit_waiting()
        if eng.requests:
            eng.step()
            self._publish()
        self._publish_state()
        return True

    def _rebuild_lost(self) -> None:
        """A rank that attached to a fresh pool (device fault before this start) is rebuilt from
        survivors + parity now, for every request in the ledger; what cannot be rebuilt is recomputed
        when its request is resubmitted."""
        eng = self.engine
        lost = [r for r, bad in enumerate(eng.needs_rebuild) if bad]
        if not lost:
            return
        report = eng.guarded(
            lambda: eng.client.rebuild(group=eng.group, lost_ranks=lost, request_ids=[], timeout=600.0),
            what="rebuild at start",
        )
        log.info("rebuilt-at-start", extra={"lost_ranks": lost, "bytes": report.bytes_rebuilt})

    def _load_held(self) -> None:
        eng = self.engine
        try:
            desc = eng.client.describe_group(group=eng.group)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return
            raise
        deadline = time.monotonic() + self.cfg.resume_wait_s
        for rs in desc.requests:
            rid = rs.request_id
            try:
                led = eng.client.describe_request(group=eng.group, request_id=rid)
                layout = resume.page_layout(
                    _chunks(led), page_size=self.opts.page_size, chunk_tokens=self.opts.chunk_tokens
                )
                if led.prompt_tokens <= 0:
                    raise resume.ResumeError("no prompt length recorded")
                eng.alloc.assign(rid, layout)
            except (resume.ResumeError, kvpool.PoolFullError) as exc:
                log.warning("held-request-released", extra={"request": rid, "why": str(exc)})
                eng.session.release(rid)
                continue
            self.held[rid] = Held(rid, int(led.prompt_tokens), tuple(led.token_ids), deadline)
        if self.held:
            log.info("holding-ledger-requests", extra={"requests": len(self.held)})

    def _admit(self, job: Job) -> None:
        eng = self.engine
        running = job.rid in self.jobs or any(j.rid == job.rid for j in self.waiting)
        if running and not self._take_over(job):
            job.emit(Failure(f"request {job.rid!r} is already running", 400))
            return
        if any(not 0 <= t < eng.cfg.vocab for t in job.input_ids):
            job.emit(Failure(f"input_ids outside [0, {eng.cfg.vocab})", 400))
            return
        need = len(job.input_ids) + job.max_new_tokens
        if -(-need // self.opts.page_size) > self.opts.pool_slots // self.opts.page_size:
            job.emit(Failure(f"request needs {need} KV slots, the pool has {self.opts.pool_slots}", 400))
            return
        held = self.held.pop(job.rid, None)
        if held is not None and self._resume(job, held):
            return
        if held is not None:
            self._release(job.rid)
        self.waiting.append(job)

    def _take_over(self, job: Job) -> bool:
        """A resubmission of a request that is still running here: the client lost its stream before
        this server noticed. The running one is held and the new job resumes it (the old job is told it
        was superseded). False when ``job`` is not a continuation of it (a different prompt)."""
        eng = self.engine
        req = eng.requests.get(job.rid)
        if req is None:  # still waiting for room: the new job simply takes its place
            [old] = [j for j in self.waiting if j.rid == job.rid]
            if job.input_ids[: len(old.input_ids)] != old.input_ids:
                return False
            self.waiting.remove(old)
            old.emit(Failure("superseded by a resubmission of the same rid", 409))
            return True
        old = self.jobs[job.rid]
        n = resume.reuse(
            job.input_ids,
            prompt_len=len(req.prompt),
            known_tokens=req.tokens,
            valid_len=req.kv_len,
            chunk_tokens=self.opts.chunk_tokens,
        )
        if n is None:
            return False
        old.emit(Failure("superseded by a resubmission of the same rid", 409))
        self._hold(job.rid)
        return True

    def _admit_waiting(self) -> None:
        eng = self.engine
        while self.waiting:
            job = self.waiting[0]
            need = len(job.input_ids) + job.max_new_tokens
            if -(-need // self.opts.page_size) > eng.alloc.free_pages:
                return
            self.waiting.pop(0)
            eng.alloc.ensure(job.rid, need)
            try:
                eng.submit(engine_mod.Request(job.rid, list(job.input_ids), job.max_new_tokens))
            except engine_mod.EngineError as exc:
                eng.alloc.free(job.rid)
                job.emit(Failure(str(exc), 400))
                continue
            self.jobs[job.rid] = job

    def _resume(self, job: Job, held: Held) -> bool:
        """Admit a resubmission of a held request; False when it is not one (served as new)."""
        eng, t = self.engine, self.opts.chunk_tokens
        try:
            led: Any = eng.client.describe_request(group=eng.group, request_id=job.rid)
        except grpc.RpcError:
            led = None  # unknown to (or unreachable) sidecar: its KV cannot be trusted, recompute
        valid = resume.valid_prefix(_chunks(led), t) if led is not None else 0
        n = resume.reuse(
            job.input_ids,
            prompt_len=held.prompt_len,
            known_tokens=held.tokens,
            valid_len=valid,
            chunk_tokens=t,
        )
        if n is None:
            log.warning("resubmission-mismatch", extra={"request": job.rid, "action": "served as new"})
            return False
        p = held.prompt_len
        try:
            eng.alloc.ensure(job.rid, len(job.input_ids) + job.max_new_tokens)
        except kvpool.PoolFullError:
            return False
        tokens = list(job.input_ids)
        last = len(tokens) - 1
        # Recompute up to where an original forward pass ended: inside the prompt, a chunk boundary.
        end = last if last >= p else last - last % t
        req = engine_mod.Request(job.rid, tokens[:p], len(tokens) - p + job.max_new_tokens, tokens=tokens)
        req.kv_len = n
        eng.requests[job.rid] = req
        slots = eng.alloc.slots(job.rid)

        def restore() -> None:
            assert eng.cluster is not None
            eng.cluster.call(rank_mod.Resume(job.rid, tuple(tokens), tuple(slots[:n]), p))
            if end > n:
                eng.replay({job.rid: [(n, end)]}, commit=True)

        eng.guarded(restore, what=f"resuming {job.rid}")
        req.kv_len = max(n, end)
        eng.session.record_tokens(job.rid, tokens, prompt_tokens=p, max_new_tokens=req.max_new_tokens)
        job.cached_tokens = n
        self.jobs[job.rid] = job
        log.info("resumed", extra={"request": job.rid, "cached": n, "recomputed": max(0, end - n)})
        return True

    def _hold(self, rid: str) -> None:
        eng = self.engine
        self.waiting = [j for j in self.waiting if j.rid != rid]
        self.jobs.pop(rid, None)
        req = eng.requests.get(rid)
        if req is None:
            return
        # Every queued commit must reach the sidecar before the ledger is the request's only record.
        eng.guarded(lambda: eng.cluster.call(rank_mod.Drain()) if eng.cluster else None, what="drain")
        eng.session.record_tokens(
            rid, req.tokens, prompt_tokens=len(req.prompt), max_new_tokens=req.max_new_tokens
        )
        del eng.requests[rid]
        deadline = time.monotonic() + self.cfg.resume_wait_s
        self.held[rid] = Held(rid, len(req.prompt), tuple(req.tokens), deadline)

    def _expire(self) -> None:
        now = time.monotonic()
        for rid in [r for r, h in self.held.items() if h.deadline <= now]:
            del self.held[rid]
            log.info("held-request-released", extra={"request": rid, "why": "not resubmitted in time"})
            self._release(rid)

    def _release(self, rid: str) -> None:
        eng = self.engine
        eng.guarded(lambda: eng.cluster.call(rank_mod.Drop(rid)) if eng.cluster else None, what="drop")
        eng.session.release(rid)
        eng.alloc.free(rid)

    def _publish(self) -> None:
        eng = self.engine
        for rid, job in list(self.jobs.items()):
            req = eng.requests.get(rid)
            done = req is None
            if done:
                req = eng.finished.pop(rid, None)
                del self.jobs[rid]
                if req is None:
                    job.emit(Failure(f"request {rid} vanished", 500))
                    continue
            assert req is not None
            out = req.tokens[len(job.input_ids) :]
            if len(out) != job.sent or done:
                job.sent = len(out)
                job.emit(Output(tuple(out), len(job.input_ids), job.cached_tokens, done, job.max_new_tokens))

    def _publish_state(self) -> None:
        eng = self.engine
        self.snapshot = {
            "ready": self.ready.is_set(),
            "group": eng.group,
            "rank_pids": eng.rank_pids,
            "generations": eng.counters.generations,
            "recoveries": [dataclasses.asdict(r) for r in eng.recoveries],
            "running": sorted(eng.requests),
            "waiting": [j.rid for j in self.waiting],
            "held": sorted(self.held),
            "steps": eng.counters.steps,
        }

    def _shutdown(self) -> None:
        """Graceful stop: in-flight requests stay in the ledger for the next process tree."""
        eng = self.engine
        for req in eng.requests.values():
            eng.session.record_tokens(
                req.request_id, req.tokens, prompt_tokens=len(req.prompt), max_new_tokens=req.max_new_tokens
            )
        for job in list(self.jobs.values()) + self.waiting:
            job.emit(Failure("server shutting down", 503))
        if eng.cluster is not None:
            eng.cluster.stop()
            eng.cluster = None
        eng.client.close()

    def _fatal(self, message: str, code: int) -> None:
        self.error, self.exit_code = message, code
        log.error("stopping", extra={"why": message})
        for job in list(self.jobs.values()) + self.waiting:
            job.emit(Failure(message, 503))
        self.jobs, self.waiting = {}, []
        if self.engine.cluster is not None:
            self.engine.cluster.kill_all()
        self._publish_state()


def _chunks(led: Any) -> list[resume.LedgerChunk]:
    return [resume.LedgerChunk(c.chunk_index, tuple(c.slots), bool(c.kv_valid)) for c in led.chunks]

