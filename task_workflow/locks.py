"""Throttle locks as operators see them: list, filter, sort, force release.

Shared by the admin page and ``manage.py throttle_locks`` so both behave the same.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from .throttle import HeldSlot, SlotGroup, WaitingCall, get_backend

logger = logging.getLogger(__name__)

#: Sort keys accepted by :func:`list_locks` (prefix ``-`` for descending).
SORT_KEYS = {
    "task": lambda s: (s.group.task_name, s.group.key or ""),
    "key": lambda s: (s.group.key or "", s.group.task_name),
    "acquired": lambda s: s.acquired_at or 0.0,
    "held": lambda s: s.held_for or 0.0,
    "expires": lambda s: s.expires_in,
    "host": lambda s: (s.hostname or "", s.pid or 0),
    "task_id": lambda s: s.task_id or "",
}


@dataclass(frozen=True)
class LockRow:
    """A held slot plus how many slots of its group are in use."""

    slot: HeldSlot
    in_use: int

    @property
    def usage(self) -> str:
        return f"{self.in_use} of {self.slot.concurrency}"


def _matches(entry: HeldSlot | WaitingCall, task_name: str | None, key: str | None, needle: str) -> bool:
    """The filters shared by the locks and waiters listings: group's task name and key, and
    a lowercase ``needle`` searched in task name, key, task id, host and owner token."""
    if task_name is not None and entry.group.task_name != task_name:
        return False
    if key is not None and entry.group.key != key:
        return False
    if needle:
        haystack = " ".join(
            str(v or "")
            for v in (entry.group.task_name, entry.group.key, entry.task_id, entry.hostname, entry.token)
        )
        return needle in haystack.lower()
    return True


def list_locks(
    *,
    task_name: str | None = None,
    key: str | None = None,
    search: str = "",
    expired: bool | None = None,
    sort: str = "task",
    cache: str | None = None,
) -> list[LockRow]:
    """Every held slot matching the filters, sorted (``sort`` in :data:`SORT_KEYS`)."""
    slots = get_backend(cache).held_slots()
    in_use = Counter(slot.group for slot in slots)
    needle = search.strip().lower()

    def keep(slot: HeldSlot) -> bool:
        if expired is not None and slot.expired != expired:
            return False
        return _matches(slot, task_name, key, needle)

    descending = sort.startswith("-")
    sort_key = SORT_KEYS.get(sort.lstrip("-"), SORT_KEYS["task"])
    rows = [LockRow(slot, in_use[slot.group]) for slot in slots if keep(slot)]
    rows.sort(key=lambda row: sort_key(row.slot), reverse=descending)
    return rows


def list_waiters(
    *,
    task_name: str | None = None,
    key: str | None = None,
    search: str = "",
    cache: str | None = None,
) -> list[WaitingCall]:
    """Every caller waiting for a slot that matches the filters (those of
    :func:`list_locks`), by group (task name, key), then place in line."""
    needle = search.strip().lower()

    calls = [call for call in get_backend(cache).waiting_calls() if _matches(call, task_name, key, needle)]
    calls.sort(key=lambda call: (call.group.task_name, call.group.key or "", call.place))
    return calls


class ReleaseFailed(Exception):
    """The store failed part-way through :func:`force_release`.

    ``done`` holds ``(group, token, released)`` of each slot handled before the one that
    failed (``group``, ``token``); the slots after it were not tried.
    """

    def __init__(
        self,
        *,
        done: list[tuple[SlotGroup, str, bool]],
        group: SlotGroup,
        token: str,
        total: int,
        error: Exception,
    ) -> None:
        self.done = done
        self.group = group
        self.token = token
        self.total = total
        self.error = error
        self.untried = total - len(done) - 1
        super().__init__(
            f"releasing {group} failed ({type(error).__name__}: {error}) after {len(done)} of {total} "
            f"slots; {self.untried} more not tried"
        )


def _shorten(ref: str, limit: int = 80) -> str:
    return ref if len(ref) <= limit else f"{ref[: limit - 1]}…"


def parse_refs(refs: Iterable[str]) -> list[tuple[SlotGroup, str, str]]:
    """``(group, token, slot)`` of every :attr:`~task_workflow.throttle.HeldSlot.ref`, in order.

    ``ValueError`` naming each malformed one (the first five) if any is: then nothing may
    be released.
    """
    refs = list(refs)
    parsed, malformed = [], []
    for ref in refs:
        try:
            parsed.append(HeldSlot.parse_ref(ref))
        except ValueError:
            malformed.append(ref)
    if not malformed:
        return parsed
    shown = ", ".join(repr(_shorten(ref)) for ref in malformed[:5]) + (", …" if len(malformed) > 5 else "")
    if len(refs) == 1:
        raise ValueError(f"Nothing released: not a throttle slot reference: {shown}.")
    if len(malformed) == 1:
        raise ValueError(
            f"Nothing released: 1 of the {len(refs)} selected references is not a throttle slot "
            f"reference: {shown}."
        )
    raise ValueError(
        f"Nothing released: {len(malformed)} of the {len(refs)} selected references are not throttle "
        f"slot references: {shown}."
    )


def force_release(
    refs: Iterable[str], *, actor: str, cache: str | None = None
) -> list[tuple[SlotGroup, str, bool]]:
    """Release the slots named by :attr:`~task_workflow.throttle.HeldSlot.ref`, whoever holds them.

    Every reference is read first: if any is malformed, ``ValueError`` (from
    :func:`parse_refs`) and nothing is released. Waiters are woken. The holder's own later
    release finds nothing and is harmless; its next renewal marks its lease lost. Each
    release is logged with ``actor``. Returns ``(group, token, released)`` per slot. If the
    store fails on one, :class:`ReleaseFailed` carries what was done before it, and the
    rest are not tried (an unreachable store would fail each after its timeout).
    """
    parsed = parse_refs(refs)
    backend = get_backend(cache)
    results: list[tuple[SlotGroup, str, bool]] = []
    for group, token, slot in parsed:
        try:
            released = backend.release(group, token, slot)
        except Exception as exc:
            logger.exception(
                "Force release of throttle slot of %s (token %s) by %s failed", group, token, actor
            )
            raise ReleaseFailed(done=results, group=group, token=token, total=len(parsed), error=exc) from exc
        logger.warning(
            "Throttle slot of %s (token %s) force-released by %s: %s",
            group,
            token,
            actor,
            "released" if released else "it was no longer held",
        )
        results.append((group, token, released))
    return results
