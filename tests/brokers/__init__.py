"""Broker restarts with tasks in flight, on real Celery workers (README, "Broker restarts").

- ``servers``: a redis-server with persistence and a RabbitMQ node of the test's own, both
  crashed (SIGKILL) and started again on the same data directory.
- ``profiles``: the Celery settings compared: README's recommendation, Celery's defaults and
  variants that each drop or change one recommended setting.
- ``settings``: the Django settings of the scenario's workers (a profile on top of
  ``tests.settings``).
- ``tasks``: the scenario's tasks, which record every body run in PostgreSQL.
- ``scenario``: send the tasks, crash and restart the broker mid-run, wait, count.
"""
