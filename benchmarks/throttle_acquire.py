"""Cost of one throttle acquire + release on Redis, next to raw redis-py on the same server.

How to run (needs Redis on 127.0.0.1:6379; uses and FLUSHES db 13)::

    .venv/bin/python benchmarks/throttle_acquire.py [--rounds 100] [--ops 400]

What it measures, per acquire+release pair, all through one redis-py client (the one
django-redis hands the throttle backend, so connection settings are identical):

- ``raw SET NX PX + DEL``: the floor, two plain round trips (the baseline of every ratio);
- ``redis.lock.Lock``: redis-py's own lock (SET NX PX + a Lua release), for reference;
- ``EVALSHA no-op x2``: two calls of a ``return 1`` script with the backend's keys and
  args: the floor of any two-script design (what is left is the scripts' bodies and
  the backend's Python);
- ``backend``: ``RedisThrottleBackend.acquire()`` + ``.release()`` (two EVALSHA calls,
  the metadata serialised to JSON);
- ``throttle() API``: ``with throttle(key=..., name=..., wait=0): pass`` (adds the running
  task lookup, the token and metadata, the lease renewer bookkeeping and the slot signals:
  Python work that the raw variant does not do).

Short rounds interleave the variants (order reversed every other round) so drift hits
all of them alike; each variant's figure is the median over rounds of the per-op mean, and its
ratio the median over rounds of its mean / raw's mean in the same round (paired, so a
slow round does not skew it). Targets: backend <= 1.15x raw, throttle() API <= 1.20x.
The Redis round trip (median PING) is printed for scale; "+us" = median us/op - raw's,
"RTTs" = median us/op / PING.
Absolute figures move with the machine's state (on a 2-vCPU VM raw took 250-360 us per
pair from run to run, mostly redis-py's own Python work): compare within one run only.
Measured there: backend 1.14x-1.22x, throttle() API 1.28x-1.40x, redis.lock.Lock
1.07x-1.18x, two no-op EVALSHA 1.06x-1.12x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Flushed; ``BENCH_REDIS_URL`` picks another database.
REDIS_URL = os.environ.get("BENCH_REDIS_URL") or "redis://127.0.0.1:6379/13"
#: Ratio to raw SET NX PX + DEL, per variant.
TARGETS = {"backend acquire+release": 1.15, "throttle() API": 1.20}
TTL = 30.0


def setup_django() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    os.environ["REDIS_URL"] = REDIS_URL
    import django

    django.setup()


def make_variants() -> tuple[dict[str, Callable[[], None]], object]:
    from task_workflow.throttle import RedisThrottleBackend, SlotGroup, get_backend, throttle

    backend = get_backend()
    assert isinstance(backend, RedisThrottleBackend), f"expected the Redis backend, got {backend!r}"
    client = backend.client
    ttl_ms = int(TTL * 1000)
    group = SlotGroup("bench.acquire", "k")
    # What throttle() stores with each lease, so the backend pays for realistic metadata.
    metadata = {"task_name": group.task_name, "key": group.key, "concurrency": 1, "task_id": None}
    metadata |= {"hostname": "bench-host", "pid": os.getpid(), "ttl": TTL, "acquired_at": time.time()}

    def raw() -> None:
        token = uuid.uuid4().hex
        assert client.set("bench:raw", token, nx=True, px=ttl_ms)
        client.delete("bench:raw")

    def lock() -> None:
        lk = client.lock("bench:lock", timeout=TTL, blocking=False, thread_local=False)
        assert lk.acquire(token=uuid.uuid4().hex)
        lk.release()

    noop = client.register_script("return 1")
    keys = list(backend._keys(group))
    metadata_json = json.dumps(metadata)

    def noop_pair() -> None:
        token = uuid.uuid4().hex
        noop(keys=keys, args=[token, 1, ttl_ms, metadata_json])
        noop(keys=keys, args=[token])

    def backend_op() -> None:
        token = uuid.uuid4().hex
        result = backend.acquire(group, token, 1, TTL, metadata)
        assert result.acquired
        backend.release(group, token, result.slot)

    def api() -> None:
        with throttle(key="k", name="bench.api", wait=0):
            pass

    variants = {
        "raw SET NX PX + DEL": raw,
        "redis.lock.Lock": lock,
        "EVALSHA no-op x2": noop_pair,
        "backend acquire+release": backend_op,
        "throttle() API": api,
    }
    return variants, client


def time_ops(fn: Callable[[], None], ops: int) -> float:
    """Mean microseconds per call over ``ops`` calls."""
    start = time.perf_counter_ns()
    for _ in range(ops):
        fn()
    return (time.perf_counter_ns() - start) / ops / 1000


def ping_rtt_us(client: object, n: int = 2000) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        client.ping()  # type: ignore[attr-defined]
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--ops", type=int, default=400, help="acquire+release pairs per variant per round")
    args = parser.parse_args()

    setup_django()
    variants, client = make_variants()
    client.flushdb()  # type: ignore[attr-defined]
    names = list(variants)
    for fn in variants.values():  # warm up: connections, script SHAs, the renewer thread
        time_ops(fn, 200)

    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_no in range(args.rounds):
        order = names if round_no % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(time_ops(variants[name], args.ops))

    rtt = ping_rtt_us(client)
    base = samples[names[0]]

    def ratio(name: str) -> float:
        return statistics.median(value / raw for value, raw in zip(samples[name], base, strict=True))

    print(f"throttle acquire+release on {REDIS_URL}: {args.rounds} rounds x {args.ops} ops, interleaved")
    print(f"Redis round trip (PING median): {rtt:.1f} us")
    print(f"{'variant':<26}{'median us/op':>14}{'min':>8}{'max':>8}{'+us':>8}{'vs raw':>8}{'RTTs':>6}")
    for name in names:
        values = samples[name]
        med = statistics.median(values)
        print(
            f"{name:<26}{med:>14.1f}{min(values):>8.1f}{max(values):>8.1f}"
            f"{med - statistics.median(base):>+8.1f}{ratio(name):>7.2f}x{med / rtt:>6.1f}"
        )
    for name, target in TARGETS.items():
        measured = ratio(name)
        verdict = "MET" if measured <= target else "MISSED"
        print(f"target {name} <= {target}x raw: {verdict} ({measured:.2f}x)")


if __name__ == "__main__":
    main()
