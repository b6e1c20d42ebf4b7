"""Per-process state of the plugin and the hook bodies that use it.

One Runtime lives in each sglang process that loaded the plugin (the entry point runs in every
scheduler process). Hook bodies are plain functions of the runtime so that tests can call them on
sglang's real objects; plugin.py only registers them with sglang's HookRegistry.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ghostserve.engine import adapter
from ghostserve.engine.sglang import capture, lifecycle, pools, protector, resume, survivors
from ghostserve.engine.sglang import settings as settings_mod
from ghostserve.kernels import layout as layout_mod
from ghostserve.sidecar import client as client_mod

log = logging.getLogger(__name__)


class Runtime:
    """The plugin's state in one process: settings, the rank's sidecar session, the chunk tracker.

    `session` is None until a supported KV pool was placed in custody; while it is None every hook
    leaves sglang alone. `skipped` says why protection is off (an MLA pool, for instance).
    """

    def __init__(self, settings: settings_mod.PluginSettings) -> None:
        self.settings = settings
        self.session: adapter.SidecarSession | None = None
        # Commits, releases and restored requests of this rank; set with the session.
        self.protector: protector.Protector | None = None
        self.skipped: str | None = None
        # Requests restored from the sidecar's ledger at scheduler start (and what a client resubmits).
        self.restored: list[resume.RestoredRequest] = []
        self.readmissions: list[resume.Readmission] = []

    @property
    def chunks_committed(self) -> int:
        return self.protector.chunks_committed if self.protector else 0

    def flush(self) -> None:
        """Wait until every queued sidecar call of this rank was sent (tests, shutdown)."""
        if self.protector is not None:
            self.protector.sender.drain()

    def rank_and_size(self) -> tuple[int, int]:
        """This process's TP rank and size: from settings when given, else sglang's parallel state."""
        if self.settings.rank is not None and self.settings.world_size is not None:
            return self.settings.rank, self.settings.world_size
        from sglang.srt.distributed import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            raise pools.CustodyError(
                "sglang's tensor-parallel state is not initialized; "
                "set GHOSTSERVE_RANK and GHOSTSERVE_WORLD_SIZE"
            )
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            # Each pipeline stage holds other layers: one group per stage is not modelled yet.
            raise pools.CustodyError("pipeline parallelism (--pp-size > 1) is not supported by GhostServe")
        rank = parallel_state.get_tensor_model_parallel_rank()
        return rank, parallel_state.get_tensor_model_parallel_world_size()

    def open_session(self, layout: layout_mod.KVLayout) -> adapter.SidecarSession:
        """Create (not yet attach) this rank's sidecar session for `layout`.

        Raises SettingsError (chunk not whole pages) and CustodyError (rank unknown, pipeline parallel).
        """
        settings_mod.check_page_size(self.settings, layout.page_size)
        rank, world = self.rank_and_size()
        client = client_mod.SidecarClient(self.settings.sidecar, timeout=self.settings.rpc_timeout)
        worker = self.settings.worker_id or f"{os.uname().nodename}/{os.getpid()}"
        return adapter.SidecarSession(
            client,
            self.settings.group,
            rank=rank,
            world_size=world,
            layout=layout,
            protection=self.settings.protection,
            worker_id=worker,
            device_uuid=self.settings.device_uuid(rank),
            parity_budget_bytes=self.settings.parity_budget_bytes,
        )

    # -- hook bodies ---------------------------------------------------------------------------------

    def create_buffers(self, original: Any, pool: Any, *args: Any, **kwargs: Any) -> Any:
        """AROUND MHATokenToKVPool._create_buffers_normal: allocate the pool in sidecar custody.

        Unsupported pools get sglang's own allocation and a logged reason. Raises CustodyError (GPU
        pools), SettingsError and adapter.AdapterError: a deployment that asked for protection and
        cannot get it fails at start rather than serve unprotected.
        """
        if self.session is not None:
            raise pools.UnsupportedPoolError(
                "a second KV pool in one scheduler process (an SWA or hybrid model, or a draft model): "
                "GhostServe protects models with a single MHA KV pool; unset GHOSTSERVE_SGLANG"
            )
        try:
            layout = pools.describe(pool)
        except pools.UnsupportedPoolError as exc:
            self.skip(str(exc))
            return original(pool, *args, **kwargs)
        session = self.open_session(layout)
        result = pools.take_custody(pool, session)
        self.session = session
        self.protector = protector.Protector(session, grace_passes=self.settings.resume_grace_passes)
        log.info(
            "KV pool of rank %d in sidecar custody (%s, %d bytes, created=%s, needs_rebuild=%s)",
            session.rank, result.pool.shm_name, result.pool.nbytes, result.created, result.needs_rebuild,
        )
        return None

    def skip(self, reason: str) -> None:
        """Turn protection off in this process, logging why once."""
        if self.skipped is None:
            log.warning("GhostServe protection is off in this process: %s", reason)
        self.skipped = reason

    def after_scheduler_init(self, result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
        """AFTER Scheduler.__init__: refuse speculative decoding and composite caches, log why an MLA
        pool is unprotected, and insert the requests the sidecar's ledger can restore into the radix
        cache before the event loop admits anything that could take their slots (sets `restored` and
        `readmissions`). Raises resume.ResumeError and grpc.RpcError (sidecar unreachable)."""
        spec = getattr(scheduler.server_args, "speculative_algorithm", None)
        if spec:
            raise capture.SpeculativeDecodingError(
                f"speculative decoding ({spec}) is not supported by GhostServe; serve without "
                "--speculative-algorithm or unset GHOSTSERVE_SGLANG"
            )
        kv = scheduler.token_to_kv_pool_allocator.get_kvcache()
        if self.session is not None and not pools.is_plain_mha(kv):
            raise pools.UnsupportedPoolError(
                f"the pool in custody is part of a composite KV cache ({type(kv).__name__}) whose other "
                "state GhostServe does not protect; unset GHOSTSERVE_SGLANG"
            )
        if self.session is not None:
            self.resume(scheduler)
        if self.session is None and self.skipped is None:
            try:
                pools.describe(kv)
                self.skip("the KV pool was not allocated through the plugin's custody hook")
            except pools.UnsupportedPoolError as exc:
                self.skip(str(exc))

    def resume(self, scheduler: Any) -> None:
        """Insert and pin every request of the group the sidecar can restore in the scheduler's radix
        cache; release the ledger entries that cannot be restored.

        Mutates the scheduler's allocator and tree, `restored` and `readmissions`. Raises
        grpc.RpcError (sidecar unreachable at start: a deployment that asked for protection fails)."""
        session, prot = self.session, self.protector
        if session is None or prot is None:
            return
        self.restored, dropped = resume.read_restored(session.client, session.group)
        allocator = scheduler.token_to_kv_pool_allocator
        pins = resume.restore_all(scheduler.tree_cache, allocator, self.restored)
        prot.adopt(pins, tree_cache=scheduler.tree_cache, allocator=allocator)
        self.readmissions = [p.readmission for p in pins]
        pinned = {p.record.request_id for p in pins}
        for rid in dropped + [r.request_id for r in self.restored if r.request_id not in pinned]:
            prot.sender.release(rid)
        if self.restored or dropped:
            log.info(
                "restored %d of %d requests of %s into the radix cache (%d tokens pinned); released %d",
                len(pins), len(self.restored) + len(dropped), session.group,
                sum(p.inserted for p in pins), len(dropped) + len(self.restored) - len(pins),
            )

    def after_forward(self, result: Any, worker: Any, batch: Any = None, *args: Any, **kwargs: Any) -> None:
        """AFTER TpModelWorker.forward_batch_generation: commit the chunks the pass completed.

        Never raises into sglang: a failure here turns protection off for this rank (logged, counted)
        and serving goes on."""
        batch = kwargs.get("batch", batch)
        prot = self.protector
        if prot is None or batch is None:
            return
        try:
            prot.on_forward(batch, worker.model_runner.req_to_token_pool.req_to_token)
        except capture.SpeculativeDecodingError:
            raise
        except Exception as exc:
            log.exception("GhostServe capture failed")
            prot.turn_off(f"capture failed: {type(exc).__name__}: {exc}")

    def after_release(self, result: Any, req: Any, *args: Any, **kwargs: Any) -> None:
        """AFTER mem_cache.common.release_kv_cache: a finished or retracted request leaves the ledger
        (every rank sends the release after its own commits). Never raises into sglang."""
        if self.protector is None:
            return
        try:
            self.protector.on_release(req)
        except Exception as exc:
            log.exception("GhostServe release failed")
            self.protector.turn_off(f"release failed: {type(exc).__name__}: {exc}")

    def after_flush(self, result: Any, scheduler: Any, *args: Any, **kwargs: Any) -> None:
        """AFTER Scheduler.flush_cache: a successful flush drops the restored prefixes' pins."""
        if result and self.protector is not None:
            self.protector.on_flush()

    def guard_event_loop(self, original: Any, scheduler: Any, *args: Any, **kwargs: Any) -> Any:
        """AROUND Scheduler.run_event_loop: GhostServe's reaction to a peer failure (survivors.py)."""
        return survivors.guard_event_loop(
            original,
            scheduler,
            *args,
            policy=lambda: self.settings.survivor_policy,
            detach=self.detach,
            **kwargs,
        )

    def detach(self) -> None:
        """Leave the group; the sidecar keeps the pool. No-op without a session."""
        if self.session is not None:
            self.session.detach()

    def kill_tree(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        """AROUND sglang's kill_process_tree: tell the sidecar the ranks are going (lifecycle.py)."""
        return lifecycle.around_kill_tree(
            original, *args, settings=self.settings, detach_own=self.detach, **kwargs
        )
