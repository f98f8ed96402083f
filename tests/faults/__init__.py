"""Fault campaign of the throttle: holders on three network namespaces ("hosts"), a Redis
and a PostgreSQL proxy in a services namespace, and faults injected while they run
(SIGKILL, SIGSTOP, a host cut off, a Redis restart, a slow link). See ``campaign.py``."""
