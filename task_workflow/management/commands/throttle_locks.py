"""``manage.py throttle_locks``: list held throttle slots and force-release them.

Reads the same data as the admin's throttle locks page (:func:`task_workflow.locks.list_locks`)
and releases through the same :func:`task_workflow.locks.force_release`: waiters are
woken, the holder's own later release is harmless, and every release is logged with who
did it.

Examples::

    manage.py throttle_locks                            # held slots, then the callers waiting
    manage.py throttle_locks --waiters --json           # only the waiting callers, as JSON
    manage.py throttle_locks --task example.slow --json
    manage.py throttle_locks --expired                  # leases past their deadline
    manage.py throttle_locks --release --task example.slow --key 42
    manage.py throttle_locks --release --ref '["example.slow","42","<token>","<slot>"]' --yes
"""

from __future__ import annotations

import getpass
import json
import socket
from argparse import ArgumentParser
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from task_workflow.conf import get_setting
from task_workflow.locks import LockRow, force_release, list_locks, list_waiters
from task_workflow.management import format_duration, format_table, iso_timestamp, json_list, shorten
from task_workflow.throttle import HeldSlot, WaitingCall

TABLE_HEADERS = (
    "TASK NAME",
    "KEY",
    "SLOT",
    "IN USE",
    "HOLDER TASK ID",
    "HOST",
    "PID",
    "ACQUIRED AT (UTC)",
    "HELD FOR",
    "EXPIRES IN",
    "LEASE",
)

WAITER_HEADERS = (
    "TASK NAME",
    "KEY",
    "PLACE",
    "WAITING SINCE (UTC)",
    "WAITED",
    "TASK ID",
    "HOST",
    "PID",
)

#: Longest key shown in the table (``--json`` always has the whole key).
KEY_WIDTH = 48


def operator() -> str:
    """``user@host`` of whoever runs the command, for the release log."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name in the environment nor in the password database
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def row_as_dict(row: LockRow) -> dict[str, Any]:
    """A held slot as plain JSON data (numbers in seconds, timestamps in ISO 8601 UTC)."""
    slot = row.slot
    return {
        "task_name": slot.group.task_name,
        "key": slot.group.key,
        "slot": slot.slot,
        "in_use": row.in_use,
        "concurrency": slot.concurrency,
        "usage": row.usage,
        "task_id": slot.task_id,
        "hostname": slot.hostname,
        "pid": slot.pid,
        "acquired_at": iso_timestamp(slot.acquired_at),
        "held_for": None if slot.held_for is None else round(slot.held_for, 3),
        "lease_deadline": iso_timestamp(slot.lease_deadline),
        "expires_in": round(slot.expires_in, 3),
        "expired": slot.expired,
        "token": slot.token,
        "fencing_token": slot.fencing_token,
        "ref": slot.ref,
    }


def row_as_cells(row: LockRow) -> list[str]:
    slot = row.slot
    acquired = iso_timestamp(slot.acquired_at)
    return [
        slot.group.task_name,
        "-" if slot.group.key is None else shorten(slot.group.key, KEY_WIDTH),
        slot.slot,
        row.usage,
        slot.task_id or "-",
        slot.hostname or "-",
        "-" if slot.pid is None else str(slot.pid),
        "-" if acquired is None else acquired[:19].replace("T", " "),
        format_duration(slot.held_for),
        format_duration(slot.expires_in),
        "EXPIRED" if slot.expired else "live",
    ]


def waiter_as_dict(call: WaitingCall) -> dict[str, Any]:
    """A waiting caller as plain JSON data (seconds, timestamps in ISO 8601 UTC)."""
    return {
        "task_name": call.group.task_name,
        "key": call.group.key,
        "place": call.place,
        "since": iso_timestamp(call.since),
        "waited_for": None if call.waited_for is None else round(call.waited_for, 3),
        "task_id": call.task_id,
        "hostname": call.hostname,
        "pid": call.pid,
        "token": call.token,
    }


def waiter_as_cells(call: WaitingCall) -> list[str]:
    since = iso_timestamp(call.since)
    return [
        call.group.task_name,
        "-" if call.group.key is None else shorten(call.group.key, KEY_WIDTH),
        str(call.place),
        "-" if since is None else since[:19].replace("T", " "),
        format_duration(call.waited_for),
        call.task_id or "-",
        call.hostname or "-",
        "-" if call.pid is None else str(call.pid),
    ]


class Command(BaseCommand):
    help = (
        "List held throttle slots (task name, key, holder, lease) as a table or --json, "
        "and force-release them with --release."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--task", metavar="NAME", help="only slots of this task name (slot group name)")
        parser.add_argument("--key", metavar="KEY", help="only slots of this throttle key")
        parser.add_argument(
            "--expired", action="store_true", help="only leases past their deadline (holder stopped renewing)"
        )
        parser.add_argument(
            "--ref",
            metavar="REF",
            action="append",
            default=[],
            help="one slot, by the 'ref' of the --json output (repeatable)",
        )
        parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
        parser.add_argument(
            "--waiters",
            action="store_true",
            help="list only the callers waiting for a slot (group, place in line, since when, holder)",
        )
        parser.add_argument(
            "--release",
            action="store_true",
            help="force-release the selected slots; needs --task (optionally with --key) or --ref",
        )
        parser.add_argument(
            "--yes",
            "--noinput",
            "--no-input",
            action="store_true",
            dest="yes",
            help="release without asking for confirmation",
        )
        parser.add_argument(
            "--cache",
            metavar="ALIAS",
            help="cache alias that holds the slots (default TASK_WORKFLOW['CACHE'])",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        alias = options["cache"] or get_setting("CACHE")
        if alias not in settings.CACHES:
            raise CommandError(f"no cache {alias!r} in CACHES (known: {', '.join(sorted(settings.CACHES))})")
        refs: list[str] = options["ref"]
        for ref in refs:
            try:
                HeldSlot.parse_ref(ref)
            except ValueError as exc:
                raise CommandError(f"--ref: {exc}") from None
        if options["release"]:
            self._check_release_selection(options)

        if options["waiters"]:
            if options["release"] or refs:
                raise CommandError("--waiters lists waiting callers; it takes no --release or --ref")
            self._print_waiters(self._waiters(alias, options), as_json=options["json"])
            return
        rows = self._rows(alias, options)
        if options["release"]:
            self._release(alias, rows, options)
        elif options["json"]:
            self.stdout.write(json_list(row_as_dict(row) for row in rows))
        else:
            self._print_table(rows)
            if not options["ref"]:
                waiters = self._waiters(alias, options)
                if waiters:
                    self.stdout.write("")
                    self._print_waiters(waiters, as_json=False)

    @staticmethod
    def _waiters(alias: str, options: dict[str, Any]) -> list[WaitingCall]:
        try:
            return list_waiters(task_name=options["task"], key=options["key"], cache=alias)
        except Exception as exc:
            raise CommandError(f"could not read throttle waiters from cache {alias!r}: {exc}") from exc

    def _print_waiters(self, waiters: list[WaitingCall], *, as_json: bool) -> None:
        if as_json:
            self.stdout.write(json_list(waiter_as_dict(call) for call in waiters))
            return
        if not waiters:
            self.stdout.write("No caller is waiting for a slot.")
            return
        self.stdout.write("Waiting for a slot:")
        self.stdout.write(format_table(WAITER_HEADERS, [waiter_as_cells(call) for call in waiters]))
        groups = len({call.group for call in waiters})
        self.stdout.write(
            f"\n{len(waiters)} caller{'s' if len(waiters) != 1 else ''} waiting in {groups} "
            f"group{'s' if groups != 1 else ''}"
        )

    @staticmethod
    def _check_release_selection(options: dict[str, Any]) -> None:
        if options["ref"] and (options["task"] or options["key"] or options["expired"]):
            raise CommandError("--release: give either --ref or --task/--key/--expired, not both")
        if options["key"] is not None and not options["task"]:
            raise CommandError("--release --key needs --task too (a key is only unique within its task name)")
        if not options["ref"] and not options["task"]:
            raise CommandError(
                "--release needs a selection: --task NAME (optionally with --key KEY and/or --expired) "
                "or --ref REF (from the --json output); refusing to release every held slot"
            )

    def _rows(self, alias: str, options: dict[str, Any]) -> list[LockRow]:
        try:
            rows = list_locks(
                task_name=options["task"],
                key=options["key"],
                expired=True if options["expired"] else None,
                cache=alias,
            )
        except Exception as exc:
            raise CommandError(f"could not read throttle slots from cache {alias!r}: {exc}") from exc
        if options["ref"]:
            wanted = set(options["ref"])
            rows = [row for row in rows if row.slot.ref in wanted]
        return rows

    def _print_table(self, rows: list[LockRow]) -> None:
        if not rows:
            self.stdout.write("No held throttle slots match.")
            return
        self.stdout.write(format_table(TABLE_HEADERS, [row_as_cells(row) for row in rows]))
        expired = sum(1 for row in rows if row.slot.expired)
        groups = len({row.slot.group for row in rows})
        self.stdout.write(
            f"\n{len(rows)} held slot{'s' if len(rows) != 1 else ''} in {groups} "
            f"group{'s' if groups != 1 else ''}" + (f", {expired} past their deadline" if expired else "")
        )

    def _release(self, alias: str, rows: list[LockRow], options: dict[str, Any]) -> None:
        # A --ref no longer listed was released or expired meanwhile; releasing it again is
        # harmless and reports it as already free.
        refs = list(dict.fromkeys(options["ref"])) if options["ref"] else [row.slot.ref for row in rows]
        if not refs:
            if options["json"]:
                self.stdout.write(json.dumps({"selected": 0, "released": 0, "slots": []}))
            else:
                self.stdout.write("No held throttle slots match; nothing released.")
            return
        listed = {row.slot.ref: row for row in rows}
        if not options["json"]:
            described = [listed[ref] for ref in refs if ref in listed]
            if described:
                self.stdout.write(format_table(TABLE_HEADERS, [row_as_cells(row) for row in described]))
            missing = len(refs) - len(described)
            if missing:
                self.stdout.write(f"{missing} of the selected slots are not held now (released or expired).")
        if not options["yes"] and not self._confirm(len(refs)):
            if options["json"]:
                self.stdout.write(json.dumps({"selected": len(refs), "released": 0, "cancelled": True}))
            else:
                self.stdout.write("Release cancelled; nothing released.")
            return
        try:
            results = force_release(refs, actor=f"manage.py throttle_locks ({operator()})", cache=alias)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        except Exception as exc:
            raise CommandError(f"could not release throttle slots in cache {alias!r}: {exc}") from exc
        released = sum(1 for _, _, done in results if done)
        if options["json"]:
            slots = [
                {"task_name": group.task_name, "key": group.key, "token": token, "released": done}
                for group, token, done in results
            ]
            summary = {"selected": len(results), "released": released, "slots": slots}
            self.stdout.write(json.dumps(summary, indent=2, ensure_ascii=False))
            return
        message = f"Released {released} of {len(results)} selected slot{'s' if len(results) != 1 else ''}"
        if released != len(results):
            message += f" ({len(results) - released} already free)"
        self.stdout.write(message + ".")

    def _confirm(self, count: int) -> bool:
        prompt = (
            f"Force-release {count} throttle slot{'s' if count != 1 else ''}? Their holders keep "
            "running and the limit may be exceeded until they finish. Type 'yes' to continue: "
        )
        try:
            answer = input(prompt)
        except EOFError:  # no terminal: treat as "no"
            return False
        return answer.strip().lower() in ("y", "yes")
