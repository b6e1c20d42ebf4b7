"""Randomized fault campaign over the reference engine: a seed picks the code, the fault kind, when it
hits and which ranks; the injector fires it from the driver's fault points (engine.fault_hook) while
the ranks are mid-operation. Every fault kind keeps at most M ranks lost at any moment, including
during a recovery (a second device fault during a recovery loses the same rank again when M = 1).

Kinds:
- ``process@step``: SIGKILL a random rank mid-step.
- ``device@step``: SIGKILL + MarkLost of 1..M random ranks mid-step.
- ``process@finish``: SIGKILL a rank while the driver finishes a request (Digest/Drop).
- ``process@replay``: device fault, then a rank SIGKILLed during the recovery's replay.
- ``device@replay``: device fault, then another device fault during the recovery's replay.
- ``process@restore``: device fault, then a rank SIGKILLed right after the restart (resume).
- ``sidecar@rebuild``: device fault, then the sidecar SIGKILLed and restarted while it rebuilds.
- ``sidecar@step``: the sidecar SIGKILLed and restarted mid-serving, then a device fault.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

from ghostserve.engine.reference import engine as engine_mod
from ghostserve.kernels import protection
from ghostserve.sidecar import client as client_mod

KINDS = (
    "process@step",
    "device@step",
    "process@finish",
    "process@replay",
    "device@replay",
    "process@restore",
    "sidecar@rebuild",
    "sidecar@step",
)
CODES = {code: protection.resolve_parity(code) for code in protection.ERASURE_CODES}  # code -> its M
TP = {"xor": 2, "rdp": 4, "rs": 4}


@dataclasses.dataclass(frozen=True)
class Scenario:
    seed: int
    code: str
    kind: str
    at_step: int
    first: tuple[int, ...]  # ranks of the first fault
    second: tuple[int, ...]  # ranks of the fault during recovery (if any)

    @property
    def tp(self) -> int:
        return TP[self.code]

    @property
    def m(self) -> int:
        return CODES[self.code]


def scenario(seed: int, *, code: str, kind: str, steps: int) -> Scenario:
    """The run ``seed`` of (code, kind): a fault step inside [2, steps - 2] and ranks, never more than M
    lost at once. Pure."""
    rng = random.Random(f"{seed}/{code}/{kind}")
    tp, m = TP[code], CODES[code]
    at = rng.randrange(2, max(3, steps - 2))
    ranks = list(range(tp))
    if kind.startswith("device") or kind in ("process@replay", "process@restore", "sidecar@rebuild"):
        first = tuple(sorted(rng.sample(ranks, rng.randint(1, m))))
    else:
        first = (rng.randrange(tp),)
    second: tuple[int, ...] = ()
    if kind == "device@replay":
        # Lost at any moment: first ∪ second <= M (with M = 1 the replacement of the same rank dies).
        second = (rng.choice(first),) if m == 1 or len(first) == m else (rng.randrange(tp),)
    elif kind in ("process@replay", "process@restore"):
        second = (rng.randrange(tp),)
    return Scenario(seed, code, kind, at, first, second)


class Injector:
    """Fires one scenario from the engine's fault points. ``fired`` lists what it did, in order."""

    def __init__(self, sc: Scenario, *, sidecar: Any) -> None:
        self.sc, self.sidecar = sc, sidecar
        self.fired: list[str] = []
        self._first_done = False
        self._second_done = False

    def attach(self, eng: engine_mod.ReferenceEngine) -> None:
        eng.fault_hook = lambda point: self.hook(eng, point)

    def hook(self, eng: engine_mod.ReferenceEngine, point: str) -> None:
        sc = self.sc
        kind, where = sc.kind.split("@")
        if not self._first_done:
            if sc.kind == "process@finish":
                if point == "finish":
                    self._kill(eng, sc.first)
                    self._first_done = True
                return
            if point != "step" or eng.counters.steps < sc.at_step:
                return
            self._first_done = True
            if sc.kind == "process@step":
                self._kill(eng, sc.first)
            elif sc.kind == "sidecar@step":
                self._restart_sidecar()
                # A device fault a few steps later finds part of the parity gone with the old sidecar.
                self.sc = dataclasses.replace(sc, kind="device@step", at_step=eng.counters.steps + 3)
                self._first_done = False
            else:
                self._device(eng, sc.first)
            return
        if self._second_done or (not sc.second and sc.kind != "sidecar@rebuild"):
            return
        if sc.kind == "sidecar@rebuild" and point == "rebuild":
            self._second_done = True
            self._restart_sidecar()
        elif sc.kind == "process@restore" and point == "restore":
            self._second_done = True
            self._kill(eng, sc.second)
        elif where == "replay" and point == "replay":
            self._second_done = True
            if kind == "device":
                self._device(eng, sc.second)
            else:
                self._kill(eng, sc.second)

    def _kill(self, eng: engine_mod.ReferenceEngine, ranks: tuple[int, ...]) -> None:
        assert eng.cluster is not None
        for r in ranks:
            eng.cluster.kill(r)
        self.fired.append(f"kill {list(ranks)}")

    def _device(self, eng: engine_mod.ReferenceEngine, ranks: tuple[int, ...]) -> None:
        self._kill(eng, ranks)
        with client_mod.SidecarClient(self.sidecar.address) as c:
            c.mark_lost(group=eng.group, ranks=list(ranks), reason="campaign device fault")
        self.fired.append(f"lost {list(ranks)}")

    def _restart_sidecar(self) -> None:
        self.sidecar.kill()
        self.sidecar.start()
        self.fired.append("sidecar restarted")


def run_kinds(kinds: tuple[str, ...], runs_per: int, seed0: int) -> list[tuple[int, str, str]]:
    """(seed, code, kind) of a campaign: ``runs_per`` seeds for every code x kind."""
    return [(seed0 + i, code, kind) for code in CODES for kind in kinds for i in range(runs_per)]


Hook = Callable[[engine_mod.ReferenceEngine, str], None]
