"""One throttle acquire + release on Redis against raw redis-py on the same server.

How to run (needs Redis on 127.0.0.1:6379; uses and FLUSHES db 13, ``BENCH_REDIS_URL``
picks another)::

    .venv/bin/python benchmarks/throttle_acquire.py              # 20 rounds x 500 ops per variant
    .venv/bin/python benchmarks/throttle_acquire.py --rounds 5 --ops 200

Variants, in-process, settings ``tests.settings`` with ``REDIS_URL`` at that database:

- ``raw SET NX PX + DEL`` (the floor): ``SET k <token> NX PX 60000`` then ``DEL k``
  through a redis-py client of the same URL: two plain round trips;
- ``with throttle()``: ``with throttle(name=..., key=...): pass`` (``task_workflow.tasks``),
  the whole public API: the backend's two store calls, the lease, its renewer
  bookkeeping and the slot signals. Goal: <= 1.30x the floor (ratio of the medians);
- for information, ``get_backend().acquire() + release()``: the backend's two store calls
  alone, with the metadata ``throttle()`` stores;
- for information, ``two no-op scripts``: a script that only ``return 1``s, called twice
  through redis-py's public ``Script`` with the arguments of an acquire and a release (9
  KEYS, the 4 protocol constants and the call's own ARGV, ``scripts/prelude.lua``): what
  redis-py's public command path costs for two script calls of that shape before a script
  does any work. Its ratio to the floor is the least ``with throttle()`` can reach with
  public APIs.

The slot is always free: this is the cost of taking and giving back a slot, not of
waiting for one (``throttle_handoff.py`` measures that). A ``PING`` round trip is printed
for scale.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import harness

GOAL = 1.30
NAME = "throttle_acquire"
FLOOR = "raw SET NX PX + DEL"
API = "with throttle()"
BACKEND = "backend acquire + release"
SCRIPTS = "two no-op scripts"


def make_variants(client: Any) -> dict[str, Callable[[int], None]]:
    from task_workflow.tasks import throttle
    from task_workflow.throttle import SlotGroup, get_backend

    def raw(i: int) -> None:
        assert client.set("bench:raw", uuid.uuid4().hex, nx=True, px=60_000)
        client.delete("bench:raw")

    def api(i: int) -> None:
        with throttle(name="bench.acquire", key="k"):
            pass

    backend = get_backend()
    group = SlotGroup("bench.backend", "k")
    ttl = 60.0

    def backend_op(i: int) -> None:
        token = uuid.uuid4().hex
        metadata = harness.acquire_metadata(group.task_name, group.key, ttl)
        result = backend.acquire(group, token, 1, ttl, metadata)
        assert result.acquired
        backend.release(group, token, result.slot)

    noop = client.register_script("return 1")
    keys = [f"bench:{{noop}}:{index}".encode() for index in range(9)]
    constants = [b"60000", b"86400000", b"3000", b"5000"]
    metadata = json.dumps(
        {"task_name": "bench.noop", "key": "k", "concurrency": 1, "task_id": None, "hostname": "bench-host"}
    ).encode()

    def scripts(i: int) -> None:
        token = uuid.uuid4().hex.encode()
        noop(keys=keys, args=[*constants, token, b"1", b"60000", metadata])
        noop(keys=keys, args=[*constants, token])

    return {FLOOR: raw, API: api, BACKEND: backend_op, SCRIPTS: scripts}


def ping_us(client: Any, n: int = 1000) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        client.ping()
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (plus one warm-up)")
    parser.add_argument("--ops", type=int, default=500, help="acquire + release pairs per variant per round")
    args = parser.parse_args()

    harness.setup_django("tests.settings", database_url=None, redis_url=harness.REDIS_URL)
    from task_workflow.throttle import get_backend

    client = harness.redis_client(flush=True)
    print(f"backend: {type(get_backend()).__name__} on {harness.REDIS_URL}")
    variants = make_variants(client)
    samples = harness.interleaved(variants, rounds=args.rounds, ops=args.ops)
    print(f"Redis round trip (PING median): {ping_us(client):.1f} us")
    ratios = harness.ratio_table(
        f"{NAME}: {args.rounds} rounds x {args.ops} ops per variant, interleaved op by op (us per op)",
        samples,
        FLOOR,
        informational=[BACKEND, SCRIPTS],
    )
    harness.verdict(NAME, f"{API} / {FLOOR}", ratios[API], GOAL, unit="x")


if __name__ == "__main__":
    main()
