"""The plugin's pure parts: settings, chunk bookkeeping, version check, peer-fault classification.

None of these import sglang, so they also run in the main .venv.
"""

from __future__ import annotations

import pytest
import torch.distributed
from ghostserve.engine.sglang import chunks, compat, survivors
from ghostserve.engine.sglang import settings as settings_mod


def test_settings_defaults_are_inert() -> None:
    s = settings_mod.PluginSettings.from_env({})
    assert not s.enabled
    assert s.protection.code == "xor" and s.protection.m == 1 and s.protection.chunk_tokens == 256
    assert s.survivor_policy is settings_mod.SurvivorPolicy.DETACH_EXIT
    assert s.rank is None and s.world_size is None


def test_settings_parse_everything() -> None:
    s = settings_mod.PluginSettings.from_env(
        {
            "GHOSTSERVE_SGLANG": "1",
            "GHOSTSERVE_SIDECAR": "unix:///tmp/x.sock",
            "GHOSTSERVE_GROUP": "ns/name-g0",
            "GHOSTSERVE_CODE": "RS",
            "GHOSTSERVE_PARITY_SHARDS": "3",
            "GHOSTSERVE_CHUNK_TOKENS": "64",
            "GHOSTSERVE_SURVIVOR_POLICY": "sglang",
            "GHOSTSERVE_RPC_TIMEOUT": "2.5",
            "GHOSTSERVE_RANK": "1",
            "GHOSTSERVE_WORLD_SIZE": "4",
        }
    )
    assert s.enabled and s.sidecar == "unix:///tmp/x.sock" and s.group == "ns/name-g0"
    assert (s.protection.code, s.protection.m, s.protection.chunk_tokens) == ("rs", 3, 64)
    assert s.survivor_policy is settings_mod.SurvivorPolicy.SGLANG
    assert (s.rpc_timeout, s.rank, s.world_size) == (2.5, 1, 4)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GHOSTSERVE_SGLANG", "maybe"),
        ("GHOSTSERVE_GROUP", "bad group!"),
        ("GHOSTSERVE_CODE", "raid5"),
        ("GHOSTSERVE_PARITY_SHARDS", "two"),
        ("GHOSTSERVE_CHUNK_TOKENS", "0"),
        ("GHOSTSERVE_SURVIVOR_POLICY", "pray"),
        ("GHOSTSERVE_RPC_TIMEOUT", "-1"),
        ("GHOSTSERVE_WORLD_SIZE", "0"),
    ],
)
def test_settings_errors_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(settings_mod.SettingsError, match=name.split("_", 1)[1].split("_")[0]):
        settings_mod.PluginSettings.from_env({name: value})


def test_chunk_tokens_must_be_whole_pages() -> None:
    s = settings_mod.PluginSettings.from_env({"GHOSTSERVE_CHUNK_TOKENS": "24"})
    settings_mod.check_page_size(s, 8)
    with pytest.raises(settings_mod.SettingsError, match="multiple of sglang's --page-size 16"):
        settings_mod.check_page_size(s, 16)


def no_prefix(begin: int, end: int) -> list[int]:
    raise AssertionError(f"prefix read [{begin}, {end}) not expected")


def test_tracker_prefill_chunks_then_decode() -> None:
    t = chunks.ChunkTracker(4)
    tokens = list(range(100, 110))
    t.observe("r", start=0, new_slots=[8, 9, 10, 11, 12, 13], prefix_slots=no_prefix)
    got = t.ready("r", tokens[:6])
    assert got == [chunks.Chunk("r", 0, (8, 9, 10, 11), (100, 101, 102, 103))]
    assert t.ready("r", tokens[:6]) == []  # handed out once
    t.observe("r", start=6, new_slots=[14], prefix_slots=no_prefix)
    assert t.ready("r", tokens[:7]) == []
    t.observe("r", start=7, new_slots=[15], prefix_slots=no_prefix)
    assert [c.index for c in t.ready("r", tokens[:8])] == [1]
    assert t.committed("r") == 2 and t.written("r") == 8


def test_tracker_waits_for_token_ids_under_overlap() -> None:
    # The KV of token 3 is written, but its id reaches output_ids one pass later.
    t = chunks.ChunkTracker(4)
    t.observe("r", start=0, new_slots=[4, 5, 6, 7], prefix_slots=no_prefix)
    assert t.ready("r", [1, 2, 3]) == []
    assert [c.token_ids for c in t.ready("r", [1, 2, 3, 4])] == [(1, 2, 3, 4)]


def test_tracker_reads_prefix_from_radix_hit() -> None:
    t = chunks.ChunkTracker(2)
    calls = []

    def prefix(begin: int, end: int) -> list[int]:
        calls.append((begin, end))
        return [40 + i for i in range(begin, end)]

    t.observe("r", start=3, new_slots=[7, 8], prefix_slots=prefix)
    assert calls == [(0, 3)]
    assert [c.slots for c in t.ready("r", [0] * 5)] == [(40, 41), (42, 7)]


def test_tracker_retraction_recommits_relaid_chunks() -> None:
    t = chunks.ChunkTracker(2)
    t.observe("r", start=0, new_slots=[1, 2, 3, 4], prefix_slots=no_prefix)
    assert len(t.ready("r", [0] * 4)) == 2
    t.observe("r", start=1, new_slots=[9, 10, 11], prefix_slots=no_prefix)  # re-laid from token 1
    again = t.ready("r", [0] * 4)
    assert [(c.index, c.slots) for c in again] == [(0, (1, 9)), (1, (10, 11))]


def test_tracker_bad_input_changes_nothing() -> None:
    t = chunks.ChunkTracker(2)
    with pytest.raises(ValueError, match="start"):
        t.observe("r", start=-1, new_slots=[], prefix_slots=no_prefix)
    with pytest.raises(ValueError, match="returned 1 slots"):
        t.observe("r", start=3, new_slots=[5], prefix_slots=lambda b, e: [1])
    assert t.written("r") == 0
    assert t.forget("r") and not t.forget("r")
    with pytest.raises(ValueError):
        chunks.ChunkTracker(0)


def test_version_check() -> None:
    assert compat.check_version("0.5.23") == "0.5.23"
    with pytest.raises(compat.UnsupportedSGLangError, match=r"sglang 0\.5\.22 is not supported.*0\.5\.23"):
        compat.check_version("0.5.22")
    with pytest.raises(compat.UnsupportedSGLangError, match="not installed"):
        compat.check_version(None)


@pytest.mark.parametrize(
    ("exc", "peer"),
    [
        (torch.distributed.DistBackendError("boom"), True),
        (RuntimeError("NCCL error: unhandled system error, remote process exited"), True),
        (RuntimeError("[../gloo/transport/tcp/pair.cc] Connection closed by peer"), True),
        (ValueError("bad sampling params"), False),
        (KeyError("rid"), False),
    ],
)
def test_peer_fault_classification(exc: BaseException, peer: bool) -> None:
    assert survivors.is_peer_fault(exc) is peer


def test_peer_fault_seen_through_cause() -> None:
    try:
        try:
            raise torch.distributed.DistNetworkError("store down")
        except Exception as inner:
            raise RuntimeError("scheduler step failed") from inner
    except RuntimeError as outer:
        assert survivors.is_peer_fault(outer)


class Exited(Exception):
    pass


def exit_raises(code: int):
    raise Exited(code)


def test_react_detaches_and_exits_only_for_peer_faults() -> None:
    detached = []
    peer = RuntimeError("NCCL communicator aborted")
    with pytest.raises(Exited) as info:
        survivors.react(peer, policy=settings_mod.SurvivorPolicy.DETACH_EXIT,
                        detach=lambda: detached.append(1), exit_process=exit_raises)
    assert info.value.args == (survivors.EXIT_PEER_FAULT,) and detached == [1]
    # sglang's own policy, or a bug of our own: return, the caller re-raises, sglang's handling goes on.
    survivors.react(peer, policy=settings_mod.SurvivorPolicy.SGLANG, detach=lambda: detached.append(2),
                    exit_process=exit_raises)
    survivors.react(ValueError("x"), policy=settings_mod.SurvivorPolicy.DETACH_EXIT,
                    detach=lambda: detached.append(3), exit_process=exit_raises)
    assert detached == [1]


def test_react_exits_even_if_detach_fails() -> None:
    def broken() -> None:
        raise ConnectionError("sidecar gone")

    with pytest.raises(Exited):
        survivors.react(RuntimeError("gloo: Connection reset by peer"),
                        policy=settings_mod.SurvivorPolicy.DETACH_EXIT, detach=broken,
                        exit_process=exit_raises)


def test_settings_budget_device_and_grace() -> None:
    env = {"GHOSTSERVE_PARITY_BUDGET": "1048576", "GHOSTSERVE_RESUME_GRACE_PASSES": "50",
           "NVIDIA_VISIBLE_DEVICES": "GPU-aaa,GPU-bbb"}
    s = settings_mod.PluginSettings.from_env(env)
    assert s.parity_budget_bytes == 1 << 20 and s.resume_grace_passes == 50
    assert (s.device_uuid(0), s.device_uuid(1), s.device_uuid(2)) == ("GPU-aaa", "GPU-bbb", "")
    plain = settings_mod.PluginSettings.from_env({"NVIDIA_VISIBLE_DEVICES": "0,1"})
    assert plain.parity_budget_bytes == 0 and plain.device_uuid(0) == ""  # indices, not UUIDs
    assert settings_mod.device_uuids("all") == () == settings_mod.device_uuids("")
    for name, value in [("GHOSTSERVE_PARITY_BUDGET", "-1"), ("GHOSTSERVE_PARITY_BUDGET", "1Gi"),
                        ("GHOSTSERVE_RESUME_GRACE_PASSES", "0")]:
        with pytest.raises(settings_mod.SettingsError, match=name):
            settings_mod.PluginSettings.from_env({name: value})


def test_tracker_seeded_request_never_recommits_the_ledgers_chunks() -> None:
    t = chunks.ChunkTracker(4)
    t.seed("r", floor=2)  # the ledger holds chunks 0 and 1 (restored, pinned)
    tokens = list(range(100, 113))
    # The resubmission matched 4 tokens of the restored prefix and recomputed 4..10 at new slots.
    t.observe("r", start=4, new_slots=[70, 71, 72, 73, 74, 75, 76],
              prefix_slots=lambda b, e: [40, 41, 42, 43])
    assert t.ready("r", tokens[:11]) == []  # chunk 1 was recomputed at other slots: not committed again
    t.observe("r", start=11, new_slots=[77], prefix_slots=lambda b, e: [])
    assert [(c.index, c.slots) for c in t.ready("r", tokens[:12])] == [(2, (74, 75, 76, 77))]
    t.observe("r", start=2, new_slots=[90, 91], prefix_slots=lambda b, e: [])  # retraction: re-laid
    assert t.committed("r") == 2  # never below the floor
    with pytest.raises(ValueError, match="already tracked"):
        t.seed("r", floor=1)
    with pytest.raises(ValueError, match="floor"):
        t.seed("s", floor=-1)


def test_token_view_reads_prompt_and_output_without_copying() -> None:
    import types

    from ghostserve.engine.sglang import capture

    view = capture.TokenView(types.SimpleNamespace(origin_input_ids=[1, 2, 3], output_ids=[4, 5]))
    assert len(view) == 5 and view[0] == 1 and view[3] == 4 and view[-1] == 5
    assert view[1:4] == [2, 3, 4] and view[:] == [1, 2, 3, 4, 5] and view[4:9] == [5]
