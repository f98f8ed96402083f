"""Django settings of the broker-restart workers: ``tests.settings`` (the test database,
the test Redis as result backend and slot store), with the broker and the Celery settings
of one profile of ``tests.brokers.profiles``.

The environment gives ``BROKER_TEST_URL`` (the broker the scenario restarts) and
``BROKER_TEST_PROFILE`` (default ``recommended``). The example project stays unchanged.
"""

import os

from tests.brokers.profiles import celery_options
from tests.settings import *  # noqa: F403

if os.environ.get("BROKER_TEST_URL"):
    # The Celery app reads the CELERY_-prefixed names (config_from_object namespace).
    for _name, _value in celery_options(
        os.environ.get("BROKER_TEST_PROFILE", "recommended"), os.environ["BROKER_TEST_URL"]
    ).items():
        globals()[f"CELERY_{_name.upper()}"] = _value
