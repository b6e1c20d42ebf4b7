"""A worker process for the service tests: attach one rank, map its pool, write deterministic KV, commit
chunks, report, then wait (to be SIGKILLed) or exit.

usage: python worker.py ADDRESS GROUP RANK WORLD CODE M MODE [PLAN_JSON]
  MODE write: fill the pool with pool_content(RANK), commit the chunks of PLAN_JSON
              ({"request_id": [[chunk_index, [slots...]], ...]}), print "committed", wait for stdin EOF.
  MODE read:  print the sha256 of the whole pool and the generation, then exit.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import kv
from ghostserve.sidecar import client, pools


def main(argv: list[str]) -> int:
    address, group, rank, world, code, m, mode = argv[:7]
    plan = json.loads(argv[7]) if len(argv) > 7 else {}
    with client.SidecarClient(address, timeout=20) as c:
        reply = c.attach(
            group=group,
            rank=int(rank),
            world_size=int(world),
            layout=kv.LAYOUT,
            protection=kv.protection(code, int(m)),
            worker_id=f"pid-{rank}",
        )
        _mm, pool = pools.map_pool(reply.pool)
        if mode == "read":
            print(
                json.dumps(
                    {
                        "sha": hashlib.sha256(pool.data).hexdigest(),
                        "generation": reply.pool.generation,
                        "created": reply.created,
                        "needs_rebuild": reply.needs_rebuild,
                    }
                ),
                flush=True,
            )
            return 0
        pool[:] = kv.pool_content(int(rank), pool.size)
        for request_id, chunks in plan.items():
            for index, slots in chunks:
                c.commit_chunk(
                    group=group,
                    rank=int(rank),
                    request_id=request_id,
                    chunk_index=index,
                    slots=slots,
                    token_ids=[1000 * index + t for t in range(len(slots))],
                )
        print("committed", flush=True)
        sys.stdin.read()  # the test SIGKILLs us or closes stdin
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
