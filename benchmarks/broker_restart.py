"""Broker restart with tasks in flight: what each Celery setting profile loses.

How to run (needs PostgreSQL, Redis on 127.0.0.1:6379 for results and throttle slots,
``redis-server`` and, for the RabbitMQ rows, ``rabbitmq-server``)::

    .venv/bin/python benchmarks/broker_restart.py
    .venv/bin/python benchmarks/broker_restart.py --brokers rabbitmq --profiles recommended,no-confirm
    .venv/bin/python benchmarks/broker_restart.py --plain 80 --chains 20 --brokers redis-everysec

The scenario is the test's (``tests/brokers/scenario.py``, ``tests/brokers/test_broker_restart.py``)
with a bigger N: per broker, one worker per profile (prefork, 2 processes) on a broker of
the script's own (a ``redis-server`` or a RabbitMQ node on free ports and a temporary data
directory, never the machine's shared ones), ``--plain`` plain tasks and ``--chains``
transition chains per profile; the broker is killed (SIGKILL; ``--graceful``: stopped
cleanly) once every profile finished ``--restart-after`` tasks, stays down
``--redis-downtime`` / ``--rabbitmq-downtime`` seconds (a RabbitMQ node's own boot adds
seconds) and starts again on the same data; then the script waits until each
profile settled and prints one table row per broker and profile. Profiles are listed in
``tests/brokers/profiles.py`` (``--list``).

Brokers: ``redis-always`` / ``redis-everysec`` (append-only file, that fsync policy),
``redis-rdb`` (Redis's own default: RDB snapshots, no AOF), ``redis-none`` (no
persistence), ``rabbitmq``.

The database (default ``postgres://postgres@127.0.0.1:5432/tw_bench_broker_restart``,
``DATABASE_URL``) is created when missing and migrated. Results and slots go to
``BENCH_REDIS_URL`` (default ``redis://127.0.0.1:6379/11``), which is not flushed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/tw_bench_broker_restart"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/11"


def brokers() -> dict[str, Callable[[], Any]]:
    """Broker name -> a factory of a stopped broker server."""
    from tests.brokers.servers import BrokerRedis, RabbitMQNode
    from tests.workers import free_port

    return {
        "redis-always": lambda: BrokerRedis(free_port(), name="bench-always", appendfsync="always"),
        "redis-everysec": lambda: BrokerRedis(free_port(), name="bench-everysec", appendfsync="everysec"),
        "redis-rdb": lambda: BrokerRedis(
            free_port(), name="bench-rdb", appendfsync=None, save="3600 1 300 100 60 10000"
        ),
        "redis-none": lambda: BrokerRedis(free_port(), name="bench-none", appendfsync=None, save=""),
        "rabbitmq": RabbitMQNode,
    }


def setup_django(database_url: str, redis_url: str) -> dict[str, str]:
    """Django on the benchmark database (created and migrated); the workers' environment."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.support import ensure_database

    env = {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "EXAMPLE_BACKEND_DELAY": "0.2",
    }
    os.environ.update(env)
    ensure_database(database_url)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", default="redis-always,redis-everysec,redis-none,rabbitmq")
    parser.add_argument("--profiles", default="recommended,defaults")
    parser.add_argument("--plain", type=int, default=320, help="plain tasks per profile")
    parser.add_argument("--chains", type=int, default=40, help="transition chains (2 tasks each) per profile")
    parser.add_argument("--restart-after", type=int, default=40, help="tasks finished per profile first")
    parser.add_argument("--redis-downtime", type=float, default=2.0, help="seconds a killed Redis stays down")
    parser.add_argument(
        "--rabbitmq-downtime",
        type=float,
        default=0.0,
        help="seconds a killed node stays down before its boot",
    )
    parser.add_argument("--graceful", action="store_true", help="stop the broker cleanly instead of SIGKILL")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait after the restart")
    parser.add_argument("--list", action="store_true", help="list the profiles and exit")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from tests.brokers.profiles import PROFILES

    if args.list:
        for name, (description, _) in PROFILES.items():
            print(f"{name:18} {description}")
        return
    profile_names = args.profiles.split(",")
    factories = brokers()
    for name in [*args.brokers.split(","), *profile_names]:
        if name not in factories and name not in PROFILES:
            parser.error(f"unknown broker or profile {name!r}")

    env = setup_django(
        os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
        os.environ.get("BENCH_REDIS_URL") or DEFAULT_REDIS_URL,
    )
    from tests.brokers.scenario import RestartScenario, format_table

    rows = []
    for broker_name in args.brokers.split(","):
        server = factories[broker_name]()
        try:
            server.start()
            with RestartScenario(
                server,
                profile_names,
                env,
                plain=args.plain,
                chains=args.chains,
                restart_after=args.restart_after,
                downtime=args.redis_downtime if server.kind == "redis" else args.rabbitmq_downtime,
                graceful=args.graceful,
                timeout=args.timeout,
            ) as scenario:
                for row in scenario.run():
                    rows.append(row)
                    print(row.line(), flush=True)
        finally:
            server.close()
    print()
    print(format_table(rows))
    print(
        "\nsent: task ids (link callbacks included); lost: never finished (parked: of those, messages a "
        "Redis broker holds until their visibility timeout; never received: of those, ids no worker "
        "logged as received, e.g. a message a worker's BRPOP had just taken when Redis was killed, "
        "or a link never sent); duplicates: extra body runs; failed: "
        "executions that failed (refused re-runs, callbacks not published); chains ok: ended in ok, "
        "each transition recorded once; worker exits: workers started again in place of one that exited."
    )


if __name__ == "__main__":
    main()
