"""The reference engine's driver: continuous batching, greedy decode, fault injection and recovery.

The driver is the scheduler (every rank runs its decisions, so slot ids agree on all ranks) and the
only holder of request state; rank processes are disposable. On any rank death the driver kills the
whole generation of ranks, starts a new one (pools survive in the sidecar) and runs
``recovery.recover``, which rebuilds what a device fault destroyed and recomputes the rest. Every
operation that talks to the ranks runs in ``resilience.guarded``, which starts recovery over on any
further fault.
"""

from __future__ import annotations

import functools
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Sequence

import grpc
from ghostserve.engine import adapter
from ghostserve.engine.reference import cluster as cluster_mod
from ghostserve.engine.reference import config as config_mod
from ghostserve.engine.reference import devices, kvpool, recovery, resilience, schedule
from ghostserve.engine.reference import rank as rank_mod
from ghostserve.engine.reference.records import (  # re-exported: engine.Request etc. are the public names
    Counters,
    DeviceLost,
    EngineError,
    Fault,
    Options,
    Request,
)
from ghostserve.kernels import layout as layout_mod
from ghostserve.sidecar import client as client_mod


class ReferenceEngine:
    """Serves requests on ``opts.tp`` rank processes whose KV pools the sidecar at ``sidecar`` holds."""

    def __init__(
        self,
        cfg: config_mod.ModelConfig,
        opts: Options,
        *,
        sidecar: str,
        group: str,
        workdir: pathlib.Path,
    ) -> None:
        cfg.check_tp(opts.tp)
        self.cfg, self.opts, self.group, self.workdir = cfg, opts, group, workdir
        self.sidecar = sidecar
        self.protection = adapter.Protection(opts.code, opts.parity_shards, opts.chunk_tokens)
        self.shape = kvpool.PoolShape.for_model(
            cfg, tp=opts.tp, pool_slots=opts.pool_slots, page_size=opts.page_size
        )
        self.layout = layout_mod.KVLayout(
            self.shape.layers,
            self.shape.kv_heads,
            self.shape.head_dim,
            kvpool.DTYPE,
            opts.page_size,
            opts.pool_slots,
        )
        self.client = client_mod.SidecarClient(sidecar)
        self.session = adapter.SidecarSession(
            self.client,
            group,
            rank=0,
            world_size=opts.tp,
            layout=self.layout,
            protection=self.protection,
            worker_id=f"driver-{os.getpid()}",
        )
        self.alloc = kvpool.PageAllocator(opts.pool_slots, opts.page_size)
        self.requests: dict[str, Request] = {}
        self.finished: dict[str, Request] = {}
        self.faults: list[Fault] = []
        self.recoveries: list[recovery.RecoveryReport] = []
        self.counters = Counters()
        self.cluster: cluster_mod.Cluster | None = None
        self.needs_rebuild: list[bool] = []
        self.on_recovered: Callable[[recovery.RecoveryReport], None] | None = None
        # Ranks whose pools a device fault destroyed and that no recovery has finished restoring yet:
        # a fault during that recovery must not make the next one take them for intact.
        self.pending_lost: set[int] = set()
        # Called at named points of driver operations ("step", "finish", "replay", "restore",
        # "rebuild") while ranks are mid-operation: tests inject faults there.
        self.fault_hook: Callable[[str], None] | None = None
        self.last_recovery_end = 0.0  # perf_counter() when the last recovery finished
        self._t0 = time.monotonic()

    # ---- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or restart) the rank processes; sets needs_rebuild per rank."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        gen = self.counters.generations
        store = str(self.workdir / f"gloo-{gen}")
        specs = [
            rank_mod.RankSpec(
                self.cfg,
                self.opts.tp,
                r,
                store,
                self.sidecar,
                self.group,
                self.shape,
                self.protection,
                self.opts.threads_per_rank,
                protect=self.opts.protect,
                device=self.opts.devices[r] if r < len(self.opts.devices) else devices.Device(),
            )
            for r in range(self.opts.tp)
        ]
        self.cluster = cluster_mod.Cluster(specs)
        self.counters.generations += 1
        self.needs_rebuild = self.cluster.start()
        pathlib.Path(store).unlink(missing_ok=True)

    def close(self, *, delete_group: bool = True) -> None:
        """Stop the ranks; release every request's parity; delete the group (frees the pools)."""
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
        for rid in list(self.requests) + list(self.finished):
            self.session.release(rid)
        if delete_group:
            try:
                # A fresh channel: the driver's own may still be in reconnect backoff after a sidecar restart.
                with client_mod.SidecarClient(self.sidecar) as fresh:
                    fresh.wait_ready(timeout=self.opts.sidecar_wait_s)
                    fresh.delete_group(group=self.group)
            except grpc.RpcError as exc:
                # NOT_FOUND: the group was never created (the ranks failed to attach); nothing to free.
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
        self.client.close()

    def replace_client(self, client: client_mod.SidecarClient) -> None:
        """Use a fresh sidecar channel from now on (after the sidecar restarted)."""
        old, self.client = self.client, client
        self.session.client = client
        old.close()

    def hook(self, point: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(point)

    @property
    def rank_pids(self) -> list[int]:
        return self.cluster.pids if self.cluster else []

    # ---- requests ---------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        """Queue a request (admitted once ``arrival_s`` seconds passed since the engine started)."""
        if request.request_id in self.requests or request.request_id in self.finished:
            raise EngineError(f"duplicate request id {request.request_id!r}")
        if any(not 0 <= t < self.cfg.vocab for t in request.prompt):
            raise EngineError(f"request {request.request_id!r} has token ids outside [0, {self.cfg.vocab})")
        need = len(request.prompt) + request.max_new_tokens
        if -(-need // self.opts.page_size) > self.opts.pool_slots // self.opts.page_size:
            raise EngineError(
                f"request {request.request_id!r} needs {need} slots, the pool has {self.opts.pool_slots}"
            )
        self.requests[request.request_id] = request

    def active(self) -> list[Request]:
        now = time.monotonic() - self._t0
        return [r for r in self.requests.values() if r.arrival_s <= now]

    def reset_clock(self) -> None:
        self._t0 = time.monotonic()

    # ---- stepping ---------------------------------------------------------------------------------

    def _piece(self, req: Request) -> rank_mod.Work:
        a, b = schedule.next_piece(req.kv_len, len(req.prompt), self.opts.chunk_tokens)
        slots = self.alloc.ensure(req.request_id, b)
        return rank_mod.Work(req.request_id, tuple(req.tokens[a:b]), a, tuple(slots[a:b]))

    def guarded(self, op: Callable[[], resilience.T], *, what: str) -> resilience.T:
        """Run ``op`` in the recover-and-retry scope (resilience.guarded). Raises EngineError when
        serving cannot go on (resilience.DeviceLost when a rank's GPU died)."""
        try:
            return resilience.guarded(self, op, what=what)
        except resilience.Unrecoverable as exc:
            if isinstance(exc, resilience.DeviceLost):
                raise DeviceLost(exc.ranks) from exc
            raise EngineError(str(exc)) from exc

    def step(self) -> int:
        """One continuous-batching step over every admitted request; returns requests stepped.

        A rank fault during the step (or while finishing a request) triggers recovery and that part is
        redone.
        """
        batch = self.active()
        if not batch:
            return 0
        work = [self._piece(r) for r in batch]
        prefill = all(w.start < len(self.requests[w.request_id].prompt) for w in work)
        t0 = time.perf_counter()

        def forward() -> list[int]:
            assert self.cluster is not None
            self._prepare_faults()
            self.cluster.broadcast(rank_mod.Step(tuple(work)))
            self._maybe_inject()
            self.hook("step")
            replies = self.cluster.collect()
            return list(replies[0])

        tokens = self.guarded(forward, what=f"step {self.counters.steps}")
        # A recovery during the step is not step time.
        t0 = max(t0, self.last_recovery_end)
        for req in self._advance(batch, work, tokens):
            self.guarded(functools.partial(self._finish, req), what=f"finishing {req.request_id}")
        # Step time includes the driver's bookkeeping (token records, releases): part of the overhead.
        seconds = time.perf_counter() - t0
        c = self.counters
        c.steps += 1
        ntok = sum(len(w.tokens) for w in work)
        c.step_tokens += ntok
        c.step_seconds += seconds
        if prefill:
            c.prefill_tokens += ntok
            c.prefill_seconds += seconds
        elif all(len(w.tokens) == 1 for w in work):
            c.decode_tokens += ntok
            c.decode_seconds += seconds
        return len(batch)

    def _advance(
        self, batch: Sequence[Request], work: Sequence[rank_mod.Work], next_tokens: list[int]
    ) -> list[Request]:
        """Driver bookkeeping after a step (no rank calls, so never redone); returns finished requests."""
        t = self.opts.chunk_tokens
        done = []
        for req, w, tok in zip(batch, work, next_tokens, strict=True):
            end = w.start + len(w.tokens)
            req.kv_len = end
            if end == len(req.tokens):
                req.tokens.append(tok)
            if self.opts.protect and schedule.completed_chunks(w.start, end, t):
                self.session.record_tokens(
                    req.request_id,
                    req.tokens,
                    prompt_tokens=len(req.prompt),
                    max_new_tokens=req.max_new_tokens,
                )
            if req.done:
                done.append(req)
        return done

    def _finish(self, req: Request) -> None:
        assert self.cluster is not None
        if self.opts.record_digests:
            self.cluster.broadcast(rank_mod.Digest(req.request_id, req.kv_len))
            self.hook("finish")
            req.digests = self.cluster.collect()
        self.cluster.broadcast(rank_mod.Drop(req.request_id))
        self.hook("finish")
        self.cluster.collect()
        self.session.release(req.request_id)
        self.alloc.free(req.request_id)
        req.finished_s = time.monotonic() - self._t0
        self.finished[req.request_id] = self.requests.pop(req.request_id)

    def run(
        self, *, on_step: Callable[[ReferenceEngine], None] | None = None, max_steps: int = 10**7
    ) -> None:
        """Step until every submitted request finished. Waits for arrivals by polling the clock."""
        for _ in range(max_steps):
            if not self.requests:
                return
            if not self.step():
                nxt = min(r.arrival_s for r in self.requests.values())
                time.sleep(max(0.0, min(0.05, nxt - (time.monotonic() - self._t0))))
            if on_step:
                on_step(self)
        raise EngineError(f"requests still unfinished after {max_steps} steps")

    # ---- faults -----------------------------------------------------------------------------------

    def inject(self, faults: Iterable[Fault]) -> None:
        self.faults.extend(faults)

    def _prepare_faults(self) -> None:
        """Before the step a fault hits: let queued commits land and (flush=True) encoding drain."""
        due = [f for f in self.faults if f.at_step == self.counters.steps]
        if not due:
            return
        assert self.cluster is not None
        # The sidecar may have restarted: wait out the channel's reconnect backoff.
        self.client.wait_ready(timeout=60.0)
        if any(f.flush for f in due):
            self.cluster.call(rank_mod.Drain())
            self.client.flush(self.group, wait=60.0)

    def _maybe_inject(self) -> None:
        due = [f for f in self.faults if f.at_step == self.counters.steps]
        for f in due:
            self.faults.remove(f)
            assert self.cluster is not None
            for r in f.ranks:
                self.cluster.kill(r)
            if f.kind == "device":
                self.client.mark_lost(group=self.group, ranks=list(f.ranks), reason="injected device fault")
            elif f.kind != "process":
                raise EngineError(f"unknown fault kind {f.kind!r}")

    # ---- replay (recompute) -----------------------------------------------------------------------

    def replay(self, ranges: dict[str, list[tuple[int, int]]], *, commit: bool = False) -> int:
        """Recompute positions of requests exactly as they were first computed; returns tokens computed.

        ranges: per request, position ranges [start, end) in order (each starting at a chunk boundary or
        the prompt end). Prefill pieces are replayed as they ran; runs of decode steps are replayed in one
        row-wise pass (bit-identical, one set of collectives). Every request's passes run one per step,
        batched across requests.
        """
        assert self.cluster is not None
        queues: dict[str, list[tuple[int, int, bool]]] = {}
        for rid, spans in ranges.items():
            req = self.requests[rid]
            queues[rid] = [
                p
                for a, b in spans
                for p in schedule.replay_passes(
                    a, b, prompt_len=len(req.prompt), chunk_tokens=self.opts.chunk_tokens
                )
            ]
        total = 0
        while any(queues.values()):
            work = []
            for rid, q in queues.items():
                if not q:
                    continue
                a, b, rowwise = q.pop(0)
                req = self.requests[rid]
                slots = self.alloc.slots(rid)
                work.append(rank_mod.Work(rid, tuple(req.tokens[a:b]), a, tuple(slots[a:b]), commit, rowwise))
                total += b - a
            self.cluster.broadcast(rank_mod.Step(tuple(work), want_tokens=False))
            self.hook("replay")
            self.cluster.collect()
        return total

    def resume_all(self) -> None:
        """Tell every rank about every active request (EngineAdapter.resume on each rank)."""
        assert self.cluster is not None
        for req in self.requests.values():
            if req.kv_len:
                slots = self.alloc.slots(req.request_id)[: req.kv_len]
                self.cluster.call(
                    rank_mod.Resume(req.request_id, tuple(req.tokens), tuple(slots), len(req.prompt))
                )

    def prefill_tokens_per_s(self) -> float:
        """Measured prefill throughput (or the configured override) for the recovery planner."""
        if self.opts.plan_prefill_tokens_per_s is not None:
            return self.opts.plan_prefill_tokens_per_s
        c = self.counters
        return c.prefill_tokens / c.prefill_seconds if c.prefill_seconds else 0.0
