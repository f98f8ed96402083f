"""Fenced writes: a row that refuses writes from a throttle holder older than its newest writer.

A holder paused past its lease (a GC pause, SIGSTOP, a VM freeze) resumes still believing
it holds the slot, and may write once before it looks at ``lease.lost``. Meanwhile the
throttle gave the slot to a newer holder, with a larger fencing token. A row of a model
with :class:`FencedMixin` remembers the newest fencing token written to it and the owner
token of the lease that wrote it, and :meth:`FencedQuerySet.fenced_update` writes only
if, in the same UPDATE statement::

    lease.fencing_token > stored token
    or (lease.fencing_token == stored token and lease.token == stored owner)

so a holder's own repeated writes pass, and a write with an older token, or with the same
token from another owner (two holders that were both granted one token, in a split
brain), is refused under the row lock, whatever order the statements arrive in::

    class Backend(FencedMixin, models.Model):
        spec = models.JSONField(default=dict)

    with throttle(key=backend.pk) as lease:
        backend.fenced_update(lease, spec=new_spec)  # FencedWriteRefused if stale

The same rule in SQL, for a resource outside Django::

    UPDATE resource SET ..., fence = %(token)s, fence_owner = %(owner)s
    WHERE id = %(id)s AND (fence < %(token)s OR (fence = %(token)s AND fence_owner = %(owner)s))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from django.db import models
from django.db.models.base import ModelBase

from .exceptions import FencedWriteRefused

# Imported at run time (not for type checking only): the documentation resolves the
# signatures' names.
from .throttle.lease import Lease

__all__ = [
    "FENCE_FIELDS",
    "FencedManager",
    "FencedMixin",
    "FencedQuerySet",
    "FencedWriteRefused",
    "fence_condition",
]

#: The two columns :class:`FencedMixin` adds: the newest fencing token written, and the
#: owner token of the lease that wrote it.
FENCE_FIELDS = ("fencing_token", "fencing_owner")


def fence_condition(lease: Lease) -> models.Q:
    """The rows that accept a write from ``lease``: their stored fencing token is older
    than the lease's, or the same token written by the same owner (``lease.token``).

    Combine it with other conditions for an UPDATE of your own; it must be in the UPDATE's
    own WHERE (evaluated under the row lock), never checked by an earlier SELECT.
    """
    fencing_token, owner = _credentials(lease)
    return models.Q(fencing_token__lt=fencing_token) | models.Q(
        fencing_token=fencing_token, fencing_owner=owner
    )


def _credentials(lease: Lease) -> tuple[int, str]:
    fencing_token = lease.fencing_token
    owner = lease.token
    # bool is an int: refuse it, as a token of 0 or less (never granted: "no token recorded").
    if not isinstance(fencing_token, int) or isinstance(fencing_token, bool) or fencing_token < 1:
        raise ValueError(f"a lease's fencing_token must be a positive int, not {fencing_token!r}")
    if not isinstance(owner, str) or not owner:
        raise ValueError(f"a lease's token (its owner token) must be a non-empty str, not {owner!r}")
    return fencing_token, owner


def _refusal_without_statement(lease: Lease, model: type[models.Model], pk: Any) -> FencedWriteRefused | None:
    """The refusal of a lease that must not write at all (released or lost), else ``None``."""
    if lease.released:
        reason, why = "lease released", "the lease was released before the write"
    elif lease.lost:
        reason, why = (
            "lease lost",
            "the lease is lost (a renewal found the slot gone, or the holder's own view of the lease "
            "ran out): the store may have given the slot to a newer holder",
        )
    else:
        return None
    label = model._meta.label
    return FencedWriteRefused(
        f"Fenced write to {label}{_row(pk)} not sent: {why}",
        reason=reason,
        model=label,
        pk=pk,
        fencing_token=lease.fencing_token,
        owner=lease.token,
    )


def _row(pk: Any) -> str:
    return "" if pk is None else f" pk={pk!r}"


class FencedQuerySet(models.QuerySet):
    """The queryset of a :class:`FencedMixin` model: fenced updates of the rows it selects.

    Each selected row is fenced on its own, in the one UPDATE statement: a row whose stored
    token is newer (or equal, from another owner) is left as it is.
    """

    def try_fenced_update(self, lease: Lease, **values: Any) -> int:
        """Write ``values`` and the lease's fencing token and owner to the selected rows that
        accept the lease (:func:`fence_condition`), in one UPDATE statement; return the
        number of rows written (0: refused, or no row selected).

        Nothing is sent, and 0 returned, when the lease is released or ``lease.lost``.
        Runs in the caller's transaction (autocommit outside one), like ``update()``.
        """
        self._check_values(values)
        if _refusal_without_statement(lease, self.model, None) is not None:
            return 0
        fencing_token, owner = _credentials(lease)
        return self.filter(fence_condition(lease)).update(
            **values, fencing_token=fencing_token, fencing_owner=owner
        )

    def fenced_update(self, lease: Lease, **values: Any) -> int:
        """As :meth:`try_fenced_update`, but raise :class:`FencedWriteRefused` when no
        selected row accepted the write (or the lease is released or lost); return the
        number of rows written.

        The exception carries the newest token and owner among the selected rows, read
        just after the refusal. A queryset that selects no row returns 0, as ``update()``
        does. With several rows, some may accept and some refuse: it raises only when
        none accepted (compare the count with what you expect).
        """
        self._check_values(values)
        refusal = _refusal_without_statement(lease, self.model, None)
        if refusal is not None:
            raise refusal
        updated = self.try_fenced_update(lease, **values)
        if updated:
            return updated
        stored = self.order_by("-fencing_token").values_list("pk", *FENCE_FIELDS).first()
        if stored is None:
            return 0
        raise _refused(lease, self.model, *stored)

    def _check_values(self, values: dict[str, Any]) -> None:
        written_by_the_fence = sorted(set(values) & set(FENCE_FIELDS))
        if written_by_the_fence:
            raise TypeError(
                f"fenced_update() writes {', '.join(written_by_the_fence)} from the lease; "
                "do not pass them as values"
            )


def _refused(
    lease: Lease, model: type[models.Model], pk: Any, stored_fencing_token: int, stored_owner: str
) -> FencedWriteRefused:
    label = model._meta.label
    if stored_fencing_token > lease.fencing_token:
        reason = "older token"
        why = f"the row holds the newer fencing token {stored_fencing_token}: a newer holder has written"
    elif stored_fencing_token == lease.fencing_token and stored_owner != lease.token:
        reason = "same token, other owner"
        why = (
            f"the row holds the same fencing token {stored_fencing_token} written by another owner "
            f"({stored_owner}): two holders were granted one token and the other wrote first"
        )
    else:
        # Stored tokens only grow through fenced updates: the fence was lowered between the
        # refusal and the read (a save() naming it in update_fields, or a plain update()).
        reason = "older token"
        why = (
            f"the row held a newer fencing token; it holds {stored_fencing_token} now, "
            "lowered since by a write outside fenced updates"
        )
    return FencedWriteRefused(
        f"Fenced write to {label}{_row(pk)} with fencing token {lease.fencing_token} "
        f"(owner {lease.token}) refused: {why}",
        reason=reason,
        model=label,
        pk=pk,
        fencing_token=lease.fencing_token,
        owner=lease.token,
        stored_fencing_token=stored_fencing_token,
        stored_owner=stored_owner,
    )


class FencedManager(models.Manager.from_queryset(FencedQuerySet)):  # type: ignore[misc]
    """The default manager of a :class:`FencedMixin` model: ``Model.objects.filter(...).
    fenced_update(lease, ...)``. Base your own manager on :class:`FencedQuerySet`
    (``FencedQuerySet.as_manager()`` or ``Manager.from_queryset``) to keep the methods."""


class FencedMixin(models.Model):
    """A model whose rows accept writes only from the newest throttle holder.

    Adds two columns: ``fencing_token``, the newest fencing token written to the row
    (default 0: any lease may write first), and ``fencing_owner``, the owner token
    (``Lease.token``) of the lease that wrote it. Write through :meth:`fenced_update`
    (raises :class:`FencedWriteRefused`) or :meth:`try_fenced_update` (returns 0 or 1),
    or the same methods of ``objects`` (:class:`FencedQuerySet`).

    ``save()`` of an existing row leaves the two columns alone unless ``update_fields``
    names them: an instance read before a newer holder's write must not put its older
    token back (which would let a stale holder write again). ``QuerySet.update()`` and
    ``bulk_update()`` write what they are given: keep the two columns out of them.
    """

    fencing_token = models.BigIntegerField(
        default=0, editable=False, help_text="The newest throttle fencing token written to this row."
    )
    fencing_owner = models.CharField(
        max_length=64,
        default="",
        blank=True,
        editable=False,
        help_text="The owner token of the throttle lease that wrote fencing_token.",
    )

    objects: ClassVar[FencedManager] = FencedManager()

    class Meta:
        abstract = True

    def save(
        self,
        *,
        force_insert: bool | tuple[ModelBase, ...] = False,
        force_update: bool = False,
        using: str | None = None,
        update_fields: Iterable[str] | None = None,
    ) -> None:
        """Save as Django does, except that an update of an existing row leaves
        ``fencing_token`` and ``fencing_owner`` alone unless ``update_fields`` names them
        (so it is an update of the other loaded fields: a row deleted meanwhile raises
        ``DatabaseError`` instead of being inserted again)."""
        if update_fields is None and not force_insert and not self._state.adding:
            deferred = self.get_deferred_fields()
            update_fields = [
                field.name
                for field in self._meta.concrete_fields
                if not field.primary_key
                and not getattr(field, "generated", False)
                and field.name not in FENCE_FIELDS
                and field.attname not in deferred
            ]
        super().save(
            force_insert=force_insert, force_update=force_update, using=using, update_fields=update_fields
        )

    def fenced_update(self, lease: Lease, **values: Any) -> None:
        """Write ``values`` to this row (by pk) if it accepts ``lease`` (see
        :func:`fence_condition`), in one UPDATE statement, and set them, the lease's
        fencing token and its owner on this instance.

        Raises :class:`FencedWriteRefused` (with what the row holds) when refused, or when
        the lease is released or lost (nothing sent), and ``DoesNotExist`` when the row is
        gone. Values that are expressions (``F("n") + 1``) are read back from the row.
        """
        refusal = _refusal_without_statement(lease, type(self), self.pk)
        if refusal is not None:
            raise refusal
        if not self.try_fenced_update(lease, **values):
            stored = self._this_row().values_list(*FENCE_FIELDS).first()
            if stored is None:
                raise self.DoesNotExist(f"{self._meta.label} pk={self.pk!r} does not exist")
            raise _refused(lease, type(self), self.pk, *stored)

    def try_fenced_update(self, lease: Lease, **values: Any) -> int:
        """As :meth:`fenced_update`, but return the number of rows written (1, or 0 when
        refused, the lease released or lost, or the row gone) instead of raising. On 1,
        the values, token and owner are set on this instance."""
        updated = self._this_row().try_fenced_update(lease, **values)
        if updated:
            expressions = [name for name, value in values.items() if hasattr(value, "resolve_expression")]
            for name, value in values.items():
                if name not in expressions:
                    setattr(self, name, value)
            self.fencing_token, self.fencing_owner = _credentials(lease)
            if expressions:
                self.refresh_from_db(fields=expressions)
        return updated

    def _this_row(self) -> FencedQuerySet:
        # Not through ``objects``: a subclass may replace the default manager.
        return FencedQuerySet(model=type(self), using=self._state.db).filter(pk=self.pk)
