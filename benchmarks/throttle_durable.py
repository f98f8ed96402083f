"""The durable mode's cost: throttle acquire + release with THROTTLE_REPLICAS 0, 1 and 2.

How to run (needs ``redis-server`` on the PATH: the script starts a primary and two
replicas of its own, on free ports, without persistence, and stops them at the end)::

    .venv/bin/python benchmarks/throttle_durable.py              # 20 rounds x 300 ops per variant
    .venv/bin/python benchmarks/throttle_durable.py --rounds 5 --ops 100

**What is called.** ``RedisThrottleBackend.acquire()`` and ``.release()`` with the metadata
``throttle()`` stores, on three backends of the same primary that differ only in
``replicas`` (what ``TASK_WORKFLOW['THROTTLE_REPLICAS']`` sets):

- ``mode 0`` (the floor): one ``EVALSHA`` per call, as without the durable mode;
- ``mode 1``, ``mode 2``: ``EVALSHA`` and ``WAIT <n> <timeout>`` in one non-transactional
  pipeline per call, so each call returns once n replicas acknowledged its writes;
- for information, ``raw SET NX + DEL`` and ``raw SET NX + DEL, each + WAIT 1``: the same
  two round trips through redis-py with plain commands, without and with a ``WAIT 1`` in
  the pipeline, what a replica's acknowledgement costs before any script runs.

The replicas are on the same machine: a ``WAIT`` costs the replicas' turn to read the
stream and acknowledge it (on two shared cores, a context switch or two), not a network
round trip; across hosts add the replica's round trip. ``restart_grace=0``: the servers
have just started, and the restart grace is not what is measured. The slot is always free.

Figures: the ratio table (medians, p90, p99 against mode 0) and ``INFO`` lines with the
ratios of modes 1 and 2 to mode 0 (no goal: the issue asks for the cost to be measured).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import harness

NAME = "throttle_durable"
FLOOR = "mode 0"
MODES = {FLOOR: 0, "mode 1": 1, "mode 2": 2}
RAW = "raw SET NX + DEL"
RAW_WAIT = "raw SET NX + DEL, each + WAIT 1"
#: ``THROTTLE_REPLICAS_TIMEOUT`` of the measured backends (default); healthy replicas
#: answer far sooner.
REPLICAS_TIMEOUT = 0.5


@contextlib.contextmanager
def primary_and_replicas() -> Iterator[Any]:
    """A primary and two in-sync replicas of this script's own (``tests/redis_topology.py``,
    no Sentinel); yields the topology, stopped afterwards."""
    from tests.redis_topology import SentinelTopology

    with tempfile.TemporaryDirectory(prefix="bench-durable-") as workdir:
        topology = SentinelTopology(Path(workdir), replicas=2, sentinels=0)
        topology.start()
        try:
            yield topology
        finally:
            topology.stop()


def make_variants(client: Any) -> dict[str, Callable[[int], None]]:
    from task_workflow.throttle import RedisThrottleBackend, SlotGroup

    ttl = 60.0
    variants: dict[str, Callable[[int], None]] = {}
    for name, replicas in MODES.items():
        backend = RedisThrottleBackend(
            client, "bench:durable:", restart_grace=0, replicas=replicas, replicas_timeout=REPLICAS_TIMEOUT
        )
        group = SlotGroup(f"bench.durable.{replicas}", "k")

        def acquire_release(
            i: int, backend: RedisThrottleBackend = backend, group: SlotGroup = group
        ) -> None:
            token = uuid.uuid4().hex
            metadata = harness.acquire_metadata(group.task_name, group.key, ttl)
            result = backend.acquire(group, token, 1, ttl, metadata)
            assert result.acquired
            assert backend.release(group, token, result.slot)

        variants[name] = acquire_release

    def raw(i: int) -> None:
        assert client.set("bench:durable:raw", uuid.uuid4().hex, nx=True, px=60_000)
        client.delete("bench:durable:raw")

    timeout_ms = int(REPLICAS_TIMEOUT * 1000)

    def raw_wait(i: int) -> None:
        pipeline = client.pipeline(transaction=False)
        pipeline.set("bench:durable:raw-wait", uuid.uuid4().hex, nx=True, px=60_000)
        pipeline.wait(1, timeout_ms)
        granted, acknowledged = pipeline.execute()
        assert granted
        assert acknowledged >= 1
        pipeline = client.pipeline(transaction=False)
        pipeline.delete("bench:durable:raw-wait")
        pipeline.wait(1, timeout_ms)
        pipeline.execute()

    variants[RAW] = raw
    variants[RAW_WAIT] = raw_wait
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (plus one warm-up)")
    parser.add_argument("--ops", type=int, default=300, help="acquire + release pairs per variant per round")
    args = parser.parse_args()

    harness.setup_django("tests.settings", database_url=None, redis_url=harness.REDIS_URL)
    with primary_and_replicas() as topology:
        import redis

        # Over TCP, as the throttle reaches its Redis (the topology's own clients use a
        # Unix socket).
        client = redis.Redis(host="127.0.0.1", port=topology.primary.port, socket_timeout=5)
        print(f"primary 127.0.0.1:{topology.primary.port}, replicas " + ", ".join(
            str(node.port) for node in topology.replicas
        ))  # fmt: skip
        samples = harness.interleaved(make_variants(client), rounds=args.rounds, ops=args.ops)
        ratios = harness.ratio_table(
            f"{NAME}: {args.rounds} rounds x {args.ops} ops per variant, interleaved op by op "
            "(us per acquire + release)",
            samples,
            FLOOR,
            informational=[RAW, RAW_WAIT],
        )
    for name, replicas in MODES.items():
        if replicas:
            harness.info(
                NAME, f"{name} / {FLOOR} (acquire + release, WAIT {replicas})", ratios[name], unit="x"
            )
    harness.info(NAME, f"{RAW_WAIT} / {RAW}", ratios[RAW_WAIT] / ratios[RAW], unit="x")


if __name__ == "__main__":
    main()
