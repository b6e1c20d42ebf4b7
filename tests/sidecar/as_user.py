"""Run sidecar calls as another uid (tests of SO_PEERCRED authorization): started as root, imports what
it needs, drops to the uid given, then makes the calls named in argv and prints each one's status code
as a JSON list. Usage: python as_user.py UID SOCKET_ADDRESS."""

from __future__ import annotations

import json
import os
import sys

import grpc
import kv
from ghostserve.sidecar import client


def main() -> None:
    uid, address = int(sys.argv[1]), sys.argv[2]
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    prot = kv.protection("xor", 1)
    results = []
    with client.SidecarClient(address, timeout=10) as c:
        calls = [
            (
                "attach-foreign",
                lambda: c.attach(group="root-g", rank=0, world_size=2, layout=kv.LAYOUT, protection=prot),
            ),
            (
                "commit-foreign",
                lambda: c.commit_chunk(
                    group="root-g", rank=0, request_id="r", chunk_index=0, slots=list(range(16))
                ),
            ),
            ("describe-foreign", lambda: c.describe_group(group="root-g")),
            ("release-foreign", lambda: c.release_request(group="root-g", request_id="r")),
            (
                "attach-own-0",
                lambda: c.attach(group="nb-g", rank=0, world_size=2, layout=kv.LAYOUT, protection=prot),
            ),
            (
                "attach-own-1",
                lambda: c.attach(group="nb-g", rank=1, world_size=2, layout=kv.LAYOUT, protection=prot),
            ),
            ("describe-own", lambda: c.describe_group(group="nb-g")),
            ("list", lambda: c.list_groups()),
            ("mark-lost", lambda: c.mark_lost(group="nb-g", ranks=[0], reason="x")),
            ("rebuild-healthy", lambda: c.rebuild(group="nb-g", lost_ranks=[0])),
            ("delete", lambda: c.delete_group(group="nb-g")),
            ("inject", lambda: c.inject_fault(gpu_index=0, kind=1)),
        ]
        for name, call in calls:
            try:
                reply = call()
                extra = list(reply.groups) if name == "list" else None  # type: ignore[attr-defined]
                results.append([name, "OK", extra])
            except grpc.RpcError as exc:
                results.append([name, exc.code().name, None])
    print(json.dumps(results))


if __name__ == "__main__":
    main()
