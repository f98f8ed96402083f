"""``manage.py stuck_entities``: entities left in a transitional state for too long.

An entity sits in one of its model's ``States.TRANSITIONAL`` (``creating``,
``deleting``, a subclass's ``stopping``...) only while some task is supposed to move it
on; when it stays there for long, the worker that should have moved it probably died.
This command lists such entities of every concrete ``StateMixin`` model and, with
``--set-erred``, moves each to ``erred`` through its ``set_erred`` transition (under the
row lock, recorded in the transition history as ``manage.py stuck_entities``).

Examples::

    manage.py stuck_entities                          # in a transitional state for > 1 hour
    manage.py stuck_entities --older-than 30m --model example.Instance --json
    manage.py stuck_entities --set-erred --older-than 2h --dry-run
    manage.py stuck_entities --set-erred --older-than 2h
"""

from __future__ import annotations

import uuid as uuid_module
from argparse import ArgumentParser
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.apps import apps
from django.core.management.base import BaseCommand, CommandError
from django.db import router, transaction
from django.utils import timezone

from task_workflow.management import format_duration, format_table, json_list, parse_duration
from task_workflow.models import StateMixin
from task_workflow.transitions import TransitionOrigin, apply_transition

#: ``TransitionRecord.task_name`` of the transitions this command applies.
ORIGIN_NAME = "manage.py stuck_entities"
DEFAULT_OLDER_THAN = 3600.0

# Outcomes of one entity.
LISTED = "listed"
SET_ERRED = "set_erred"
WOULD_SET_ERRED = "would_set_erred"
SKIPPED = "skipped"
FAILED = "failed"

RESULT_LABELS = {
    LISTED: "",
    SET_ERRED: "moved to erred",
    WOULD_SET_ERRED: "would move to erred",
    SKIPPED: "skipped",
    FAILED: "FAILED",
}


def state_models() -> list[type[StateMixin]]:
    """Every installed concrete model that subclasses ``StateMixin`` and has its own
    ``state`` column (proxies and multi-table children share their parent's rows, so
    the parent alone lists them)."""
    found = [
        model
        for model in apps.get_models()
        if issubclass(model, StateMixin) and model._meta.get_field("state").model is model
    ]
    return sorted(found, key=lambda model: model._meta.label)


def resolve_model(label: str) -> type[StateMixin]:
    """The ``StateMixin`` model named ``app_label.ModelName``; ``CommandError`` otherwise."""
    try:
        model = apps.get_model(label)
    except (LookupError, ValueError) as exc:
        raise CommandError(f"--model {label!r}: {exc} (use app_label.ModelName)") from None
    if not issubclass(model, StateMixin):
        raise CommandError(f"--model {label!r}: {model._meta.label} is not a StateMixin model")
    return model


def has_uuid(model: type[StateMixin]) -> bool:
    return any(field.name == "uuid" for field in model._meta.get_fields())


def stuck_message(state: str, since: datetime, now: datetime) -> str:
    """The ``error_message`` written to an entity moved to erred by this command."""
    return (
        f"stuck in {state!r} for {format_duration((now - since).total_seconds(), with_seconds=False)} "
        f"(since {since.isoformat()}); moved to erred by {ORIGIN_NAME}"
    )


@dataclass
class StuckEntity:
    """One entity found in a transitional state older than the cut-off, and what became of it."""

    model: type[StateMixin]
    pk: Any
    uuid: uuid_module.UUID | None
    state: str
    since: datetime
    outcome: str = LISTED
    detail: str = ""

    def stuck_for(self, now: datetime) -> float:
        return (now - self.since).total_seconds()

    def as_dict(self, now: datetime) -> dict[str, Any]:
        return {
            "model": self.model._meta.label,
            "pk": self.pk if isinstance(self.pk, int | str) else str(self.pk),
            "uuid": None if self.uuid is None else str(self.uuid),
            "state": self.state,
            "state_changed_at": self.since.isoformat(),
            "stuck_for": round(self.stuck_for(now), 3),
            "result": self.outcome,
            "detail": self.detail,
        }


def find_stuck(models: list[type[StateMixin]], cutoff: datetime) -> list[StuckEntity]:
    """Entities of ``models`` in a transitional state whose state changed before ``cutoff``,
    longest stuck first within each model."""
    found: list[StuckEntity] = []
    for model in models:
        transitional = tuple(model.States.TRANSITIONAL)
        if not transitional:
            continue
        with_uuid = has_uuid(model)
        fields = ["pk", "state", "state_changed_at", *(["uuid"] if with_uuid else [])]
        rows = (
            model._default_manager.filter(state__in=transitional, state_changed_at__lt=cutoff)
            .order_by("state_changed_at", "pk")
            .values_list(*fields)
        )
        for row in rows:
            pk, state, since, *rest = row
            found.append(StuckEntity(model, pk, rest[0] if rest else None, state, since))
    return found


class Command(BaseCommand):
    help = (
        "List entities of StateMixin models that have sat in a transitional state for longer "
        "than --older-than, and with --set-erred move them to erred."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--older-than",
            default=str(int(DEFAULT_OLDER_THAN)),
            metavar="DURATION",
            help="how long in the state counts as stuck: seconds, or 30m, 2h, 1d, 1h30m (default 3600)",
        )
        parser.add_argument(
            "--model",
            action="append",
            default=[],
            metavar="APP_LABEL.MODEL",
            help="only this model (repeatable); default every concrete StateMixin model",
        )
        parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
        parser.add_argument(
            "--set-erred",
            action="store_true",
            help="move each stuck entity to erred (its set_erred transition, with an explanatory message)",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="with --set-erred: show what would change, change nothing"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        older_than = self._older_than(options["older_than"])
        if options["dry_run"] and not options["set_erred"]:
            raise CommandError("--dry-run only applies to --set-erred (listing changes nothing)")
        if options["model"]:
            models = list(dict.fromkeys(resolve_model(label) for label in options["model"]))
        else:
            models = state_models()
        now = timezone.now()
        cutoff = now - timedelta(seconds=older_than)
        entities = find_stuck(models, cutoff)

        if options["set_erred"]:
            for entity in entities:
                self._set_erred(entity, cutoff, dry_run=options["dry_run"])

        if options["json"]:
            self.stdout.write(json_list(entity.as_dict(now) for entity in entities))
        else:
            self._print_table(entities, now, older_than, options)
        failed = [entity for entity in entities if entity.outcome == FAILED]
        if failed:
            raise CommandError(
                f"{len(failed)} stuck entit{'ies' if len(failed) != 1 else 'y'} could not be moved to erred: "
                + "; ".join(f"{e.model._meta.label} {e.pk}: {e.detail}" for e in failed)
            )

    @staticmethod
    def _older_than(value: Any) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        else:
            try:
                seconds = parse_duration(str(value))
            except ValueError as exc:
                raise CommandError(f"--older-than: {exc}") from None
        if seconds < 0:
            raise CommandError(f"--older-than must not be negative, got {value!r}")
        return seconds

    def _set_erred(self, entity: StuckEntity, cutoff: datetime, *, dry_run: bool) -> None:
        model = entity.model
        label = f"{model._meta.label} {entity.pk}"
        if entity.uuid is None:
            entity.outcome = SKIPPED
            entity.detail = "model has no uuid field; apply_transition addresses entities by uuid"
            self.stderr.write(f"Warning: {label}: not moved to erred: {entity.detail}")
            return
        if dry_run:
            entity.outcome = WOULD_SET_ERRED
            entity.detail = stuck_message(entity.state, entity.since, timezone.now())
            return
        using = router.db_for_write(model)
        try:
            with transaction.atomic(using=using):
                # The listing is a snapshot: lock the row and check it is still stuck, so an
                # entity a worker moved on meanwhile is not pushed to erred.
                current = (
                    model._default_manager.using(using)
                    .select_for_update()
                    .filter(pk=entity.pk)
                    .values_list("state", "state_changed_at")
                    .first()
                )
                if current is None:
                    entity.outcome, entity.detail = SKIPPED, "deleted since it was listed"
                    return
                state, since = current
                if state not in model.States.TRANSITIONAL or since >= cutoff:
                    entity.outcome = SKIPPED
                    entity.detail = f"moved on to {state!r} since it was listed"
                    return
                message = stuck_message(state, since, timezone.now())
                # Inside this transaction apply_transition takes the same row lock (a savepoint).
                apply_transition(
                    model,
                    entity.uuid,
                    "set_erred",
                    error_message=message,
                    origin=TransitionOrigin(task_name=ORIGIN_NAME),
                )
        except Exception as exc:
            entity.outcome, entity.detail = FAILED, f"{type(exc).__name__}: {exc}"
            return
        entity.outcome, entity.detail = SET_ERRED, message

    def _print_table(
        self, entities: list[StuckEntity], now: datetime, older_than: float, options: dict[str, Any]
    ) -> None:
        threshold = format_duration(older_than, with_seconds=False)
        if not entities:
            self.stdout.write(f"No entities in a transitional state for longer than {threshold}.")
            return
        headers = ["MODEL", "PK", "UUID", "STATE", "STUCK FOR", "SINCE (UTC)"]
        if options["set_erred"]:
            headers.append("RESULT")
        rows = []
        for entity in entities:
            cells = [
                entity.model._meta.label,
                str(entity.pk),
                "-" if entity.uuid is None else str(entity.uuid),
                entity.state,
                format_duration(entity.stuck_for(now)),
                (entity.since.astimezone(UTC) if timezone.is_aware(entity.since) else entity.since).strftime(
                    "%Y-%m-%d %H:%M:%S"
                ),
            ]
            if options["set_erred"]:
                result = RESULT_LABELS[entity.outcome]
                if entity.outcome in (SKIPPED, FAILED):
                    result += f": {entity.detail}"
                cells.append(result)
            rows.append(cells)
        self.stdout.write(format_table(headers, rows))
        count = len(entities)
        noun = "entities" if count != 1 else "entity"
        summary = f"\n{count} {noun} in a transitional state for longer than {threshold}"
        if options["set_erred"]:
            done = sum(1 for e in entities if e.outcome in (SET_ERRED, WOULD_SET_ERRED))
            skipped = sum(1 for e in entities if e.outcome == SKIPPED)
            failed = sum(1 for e in entities if e.outcome == FAILED)
            verb = "would move" if options["dry_run"] else "moved"
            summary += f"; {verb} {done} to erred, {skipped} skipped, {failed} failed"
            if options["dry_run"]:
                summary += " (dry run: nothing changed)"
        self.stdout.write(summary + ".")
        if options["set_erred"]:
            for entity in entities:
                label = f"{entity.model._meta.label} {entity.pk}"
                if entity.outcome == SET_ERRED:
                    self.stdout.write(f"{label} -> erred, error_message: {entity.detail}")
                elif entity.outcome == WOULD_SET_ERRED:
                    self.stdout.write(f"{label} would go to erred with error_message: {entity.detail}")
