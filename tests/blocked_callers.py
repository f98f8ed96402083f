"""Callers blocked in ``throttle(...).acquire()`` in threads of their own, for tests of
what operators see while tasks wait for a slot."""

from __future__ import annotations

import threading
import time

from task_workflow.throttle import Lease


def let_blocked_callers_finish(
    threads: list[threading.Thread], taken: list[Lease], timeout: float = 15.0
) -> None:
    """Once the slot they wait for is free: give back each slot a caller gets, so the next
    one in line gets it, until every thread has ended (or ``timeout`` passed); then assert
    that none is still blocked."""
    deadline = time.monotonic() + timeout
    for thread in threads:
        while thread.is_alive() and time.monotonic() < deadline:
            for lease in list(taken):
                lease.release()
            thread.join(0.05)
    for lease in taken:
        lease.release()
    assert not any(thread.is_alive() for thread in threads), "a blocked caller never got the slot"
