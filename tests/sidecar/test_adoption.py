"""Safe adoption and file modes (issue 13 item 4). Before the fix a restarted sidecar adopted a
world-writable file owned by nobody as a valid pool and followed a symlink (pool writes landed
elsewhere); journal, state and spill files were 0644 and existing directories were not tightened."""

from __future__ import annotations

import os
import pathlib
import stat
from collections.abc import Iterator

import kv
import numpy as np
import pytest
from ghostserve.sidecar import config, convert, custodian, group, pools, restore

N = 2
SETTINGS = group.Settings(
    N, convert.layout_from(kv.LAYOUT), convert.protection_from(kv.protection("xor", 1), N)
)


@pytest.fixture
def cfg(short_tmp: pathlib.Path, shm_prefix: str) -> Iterator[config.Config]:
    yield config.Config(
        budget_bytes=1 << 20,
        state_dir=short_tmp / "state",
        spill_dir=short_tmp / "spill",
        keep_pools=True,
        shm_prefix=shm_prefix,
    )


def first_run(cfg: config.Config) -> list[str]:
    """Attach a group, commit a chunk, stop keeping everything; returns the segment names."""
    c = custodian.Custodian(cfg)
    names = []
    for r in range(N):
        c.attach("g", r, SETTINGS, worker_id="w")
        seg = c.groups["g"].ranks[r].segment
        assert seg is not None
        seg.array[:] = kv.pool_content(r, seg.nbytes)
        names.append(seg.name)
    slots = np.arange(kv.CHUNK, dtype=np.int64)
    for r in range(N):
        c.commit_chunk("g", r, "req", 0, slots=slots, token_ids=np.arange(kv.CHUNK, dtype=np.int64))
    assert c.flush("g", timeout=30)[0]
    c.close()
    return names


def restart(cfg: config.Config) -> custodian.Custodian:
    c = custodian.Custodian(cfg)
    restore.restore(c)
    return c


def cleanup(c: custodian.Custodian) -> None:
    for g in list(c.groups):
        c.delete_group(g)
    c.close()


@pytest.mark.parametrize("kind", ["symlink", "world-writable", "other-owner"])
def test_untrusted_segments_are_discarded_not_adopted(
    cfg: config.Config, short_tmp: pathlib.Path, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    names = first_run(cfg)
    path = pools.SHM_DIR / names[1]
    target = short_tmp / "elsewhere.bin"
    if kind == "symlink":
        target.write_bytes(b"\x00" * path.stat().st_size)
        path.unlink()
        path.symlink_to(target)
    elif kind == "world-writable":
        path.chmod(0o666)
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to give the file away")
        os.chown(path, 65534, 65534)
    c = restart(cfg)
    try:
        rank1 = c.groups["g"].ranks[1]
        assert not rank1.valid and rank1.segment is not None and rank1.segment.name != names[1]
        assert c.groups["g"].ranks[0].valid and c.groups["g"].ranks[0].segment.name == names[0]  # type: ignore[union-attr]
        assert not path.exists() and not path.is_symlink()  # the untrusted name is gone
        assert "pool-discarded" in caplog.text
        if kind == "symlink":
            rank1.segment.array[:] = 0xAB
            assert target.read_bytes() == b"\x00" * target.stat().st_size  # nothing written through it
    finally:
        cleanup(c)


def test_files_and_directories_are_private(cfg: config.Config, short_tmp: pathlib.Path) -> None:
    assert cfg.spill_dir is not None and cfg.state_dir is not None
    cfg.spill_dir.mkdir(mode=0o755)  # an existing directory with loose modes is tightened
    os.chmod(cfg.spill_dir, 0o755)
    first_run(cfg)
    c = restart(cfg)
    try:
        files = [p for d in (cfg.state_dir, cfg.spill_dir) for p in d.rglob("*") if p.is_file()]
        assert files
        for p in files:
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        for d in [cfg.spill_dir, *(p for p in cfg.spill_dir.rglob("*") if p.is_dir())]:
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
        assert stat.S_IMODE(cfg.state_dir.stat().st_mode) & 0o007 == 0
    finally:
        cleanup(c)


def test_a_state_file_that_is_not_ours_is_ignored(cfg: config.Config) -> None:
    assert cfg.state_dir is not None
    first_run(cfg)
    state = cfg.state_dir / "sidecar-state.json"
    state.chmod(0o666)
    c = restart(cfg)
    try:
        assert c.groups == {}  # nothing adopted from a file anyone could have written
    finally:
        cleanup(c)
    # The pools of the first run are still named in the (ignored) file: remove them by hand.
    import json

    for g in json.loads(state.read_text())["groups"].values():
        for rank in g["ranks"]:
            pools.discard(rank["shm_name"])
