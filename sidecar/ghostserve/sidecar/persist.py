"""What outlives the sidecar process: the state file (groups and their pool segments) and the optional
spill directory (parity + ledger record of every protected chunk).

Layout on disk:
  <state_dir>/sidecar-state.json                      groups, layouts, protection, segment names, generations
  <spill_dir>/<group key>/<request key>/<chunk>.json  request id, slots, token ids, checksums
  <spill_dir>/<group key>/<request key>/<chunk>.bin   the parity (or copies) of that chunk
Writes are atomic (temporary file + rename); a chunk counts only when its .json (written last) exists
and its .bin has the recorded size. Files are created 0600 and directories 0700 (token ids and
replicated KV are nobody else's business); existing ones are tightened at start. Files are opened with
O_NOFOLLOW, and only regular files owned by this uid are read back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
import stat
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

STATE_FILE = "sidecar-state.json"
log = logging.getLogger("ghostserve.sidecar")


def private_dir(path: pathlib.Path, *, keep_group: bool = True) -> None:
    """Create `path` (0700) or tighten it: never world-accessible; group bits are kept when
    `keep_group` (the state dir is the socket's directory by default, which the socket group needs)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(path.stat().st_mode)
    tight = mode & (0o2770 if keep_group else 0o700)
    if tight != mode:
        os.chmod(path, tight)


def _open_private(path: pathlib.Path, flags: int) -> int:
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def read_own(path: pathlib.Path) -> bytes | None:
    """The content of `path` if it is a regular file owned by this uid (not a link), else None (with a
    warning when something else sits there). Raises FileNotFoundError when absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        log.warning("untrusted-file", extra={"path": str(path), "error": str(exc)})
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            log.warning(
                "untrusted-file",
                extra={"path": str(path), "uid": st.st_uid, "mode": oct(st.st_mode)},
            )
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    finally:
        os.close(fd)


def key_of(text: str) -> str:
    """A short file-name-safe key for a group or request id."""
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _atomic_write(path: pathlib.Path, data: bytes | memoryview) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a link left there must not be followed
    fd = _open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def save_state(state_dir: pathlib.Path, state: dict[str, Any]) -> None:
    """Replace the state file with `state` (JSON-able)."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _atomic_write(state_dir / STATE_FILE, json.dumps(state, indent=1, sort_keys=True).encode())


def load_state(state_dir: pathlib.Path) -> dict[str, Any] | None:
    """The saved state, or None when there is none (or it cannot be parsed: then nothing is adopted)."""
    try:
        raw = read_own(state_dir / STATE_FILE)
        data = json.loads(raw) if raw is not None else None
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def remove_state(state_dir: pathlib.Path) -> None:
    (state_dir / STATE_FILE).unlink(missing_ok=True)


class Spill:
    """Parity + ledger records of protected chunks under one directory."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        private_dir(root, keep_group=False)
        for d in root.iterdir():
            if d.is_dir() and not d.is_symlink():
                private_dir(d, keep_group=False)

    def _dir(self, group: str, request_id: str) -> pathlib.Path:
        return self.root / key_of(group) / key_of(request_id)

    def write_chunk(
        self, group: str, request_id: str, index: int, *, parity: npt.NDArray[np.uint8], meta: dict[str, Any]
    ) -> None:
        d = self._dir(group, request_id)
        d.parent.mkdir(exist_ok=True, mode=0o700)
        d.mkdir(exist_ok=True, mode=0o700)
        _atomic_write(d / f"{index}.bin", parity.data)
        _atomic_write(
            d / f"{index}.json", json.dumps({**meta, "request_id": request_id, "index": index}).encode()
        )

    def delete_chunk(self, group: str, request_id: str, index: int) -> None:
        d = self._dir(group, request_id)
        with contextlib.suppress(NotADirectoryError):  # nothing of ours can be under a non-directory
            (d / f"{index}.json").unlink(missing_ok=True)
            (d / f"{index}.bin").unlink(missing_ok=True)

    def delete_request(self, group: str, request_id: str) -> None:
        shutil.rmtree(self._dir(group, request_id), ignore_errors=True)

    def delete_group(self, group: str) -> None:
        shutil.rmtree(self.root / key_of(group), ignore_errors=True)

    def load_group(self, group: str) -> Iterator[tuple[dict[str, Any], pathlib.Path, pathlib.Path]]:
        """(meta, meta path, parity path) of every chunk record of `group` that parses as a JSON
        object; the caller validates the rest (`restore`) and deletes what it cannot use."""
        base = self.root / key_of(group)
        if not base.is_dir() or base.is_symlink():
            return
        for meta_path in sorted(base.glob("*/*.json")):
            try:
                raw = read_own(meta_path)
                meta = json.loads(raw) if raw is not None else None
            except (OSError, ValueError):
                meta = None
            yield (meta if isinstance(meta, dict) else {}), meta_path, meta_path.with_suffix(".bin")

    def read_parity(self, path: pathlib.Path, out: Any) -> bool:
        """Fill `out` (a writable buffer) from the parity file at `path`; False (nothing trusted) unless
        it is a regular file of ours of exactly that size."""
        raw = read_own(path)
        if raw is None or len(raw) != len(memoryview(out).cast("B")):
            return False
        memoryview(out).cast("B")[:] = raw
        return True

    def delete_record(self, meta_path: pathlib.Path) -> None:
        meta_path.unlink(missing_ok=True)
        meta_path.with_suffix(".bin").unlink(missing_ok=True)


class Journal:
    """Append-only ledger journal per group in the state dir (`ledger-<group key>.jsonl`): one line per
    completed chunk (request, index, slots, token ids), released request and dropped chunk. Replayed at
    start so that, even without a spill dir, a restarted sidecar knows which chunks exist and reports
    them unprotected. Request token lists (RecordTokens) are not journaled."""

    def __init__(self, state_dir: pathlib.Path) -> None:
        self.dir = state_dir
        self._files: dict[str, Any] = {}
        self._lines: dict[str, int] = {}
        self._lock = threading.Lock()  # the file table; each group's file is written under its lock

    def _path(self, group: str) -> pathlib.Path:
        return self.dir / f"ledger-{key_of(group)}.jsonl"

    def append(self, group: str, record: dict[str, Any]) -> None:
        with self._lock:
            f = self._files.get(group)
            if f is None:
                self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = _open_private(self._path(group), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                f = self._files[group] = os.fdopen(fd, "a", encoding="utf-8")
                if group not in self._lines:
                    self._lines[group] = len(self.load(group))
            self._lines[group] = self._lines.get(group, 0) + 1
        f.write(json.dumps(record, separators=(",", ":")) + "\n")
        f.flush()  # a crash of the process (not of the node) keeps what the page cache has

    def lines(self, group: str) -> int:
        """Records in the group's journal (live or not): compaction rewrites it when this grows."""
        with self._lock:
            return self._lines.get(group, 0)

    def load(self, group: str) -> list[dict[str, Any]]:
        """Records in order. Every line that does not decode to a JSON object is skipped: a torn last
        line (crash mid-write), but also a damaged line in the middle, whose record is then lost."""
        try:
            raw = read_own(self._path(group))
        except FileNotFoundError:
            return []
        lines = raw.decode("utf-8", errors="replace").splitlines() if raw is not None else []
        out = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def rewrite(self, group: str, records: list[dict[str, Any]]) -> None:
        self.close(group)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        body = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
        _atomic_write(self._path(group), body.encode())
        with self._lock:
            self._lines[group] = len(records)

    def delete(self, group: str) -> None:
        self.close(group)
        self._path(group).unlink(missing_ok=True)
        with self._lock:
            self._lines.pop(group, None)

    def close(self, group: str | None = None) -> None:
        with self._lock:
            names = [group] if group is not None else list(self._files)
            files = [self._files.pop(name, None) for name in names]
        for f in files:
            if f is not None:
                f.close()
