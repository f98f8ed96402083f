"""Signals sent by task_workflow (for metrics, logs, timelines).

``slot_acquired`` and ``slot_released`` are sent with ``sender`` = the
:class:`~task_workflow.throttle.SlotGroup` and ``lease`` = the
:class:`~task_workflow.throttle.Lease`, in the process that holds the slot. They are sent
with ``send_robust``: a receiver that raises is logged (logger ``django.dispatch``), and
neither leaks the slot nor fails the guarded work. Both are sent while the store counts
the slot as held (``slot_released`` just before the store is told), so for one group the
holds seen between them never overlap beyond the limit.

``slot_waiting`` is sent once per acquisition, in the waiting process, when its first
attempt finds every slot taken and it starts waiting for one: ``sender`` = the
:class:`~task_workflow.throttle.SlotGroup`, ``concurrency`` = the limit and
``waiting_since`` = when it asked (``time.time()``). A ``slot_acquired`` follows if it gets
the slot within its wait; otherwise the task is re-queued (or, outside a task,
``ThrottleTimeout`` is raised). It is sent with ``send_robust`` as well.
"""

from django.dispatch import Signal

slot_waiting = Signal()
slot_acquired = Signal()
slot_released = Signal()
