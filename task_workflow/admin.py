"""Django admin: throttle locks, transition history, and a mixin for StateMixin models."""

from __future__ import annotations

import inspect
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from django.contrib import admin, messages
from django.contrib.admin.exceptions import NotRegistered
from django.contrib.admin.models import DELETION, LogEntry
from django.contrib.auth import get_permission_codename
from django.contrib.contenttypes.admin import GenericTabularInline
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import escape, format_html
from django.utils.safestring import mark_safe
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _
from django_fsm import TransitionNotAllowed
from django_fsm.admin import FSMAdminMixin

from .locks import SORT_KEYS, ReleaseFailed, force_release, list_locks, list_waiters, parse_refs
from .models import StateMixin, ThrottleLock, TransitionRecord
from .throttle import SlotGroup, WaitingCall, get_backend
from .transitions import TransitionOrigin, apply_transition

#: Badge colours of ``StateMixin``'s own final states. A model's own states get theirs from
#: :attr:`StateMixinAdmin.state_colours`.
STATE_COLOURS: dict[str, str] = {
    StateMixin.States.OK: "#2e7d32",
    StateMixin.States.ERRED: "#c62828",
}
#: Badge colour of the states in the model's ``States.TRANSITIONAL`` that have no colour of
#: their own.
TRANSITIONAL_COLOUR = "#ef6c00"
#: Badge colour of any other state without a colour of its own.
NEUTRAL_COLOUR = "#455a64"


def state_badge(entity: StateMixin, colours: Mapping[str, str] | None = None) -> str:
    """The entity's state as a coloured badge: its colour from ``colours`` (a state ->
    CSS colour mapping), else :data:`STATE_COLOURS`, else :data:`TRANSITIONAL_COLOUR` for
    a state in the model's ``States.TRANSITIONAL``, else :data:`NEUTRAL_COLOUR`."""
    state = entity.state
    colour = (colours or {}).get(state) or STATE_COLOURS.get(state)
    if colour is None:
        colour = TRANSITIONAL_COLOUR if state in type(entity).States.TRANSITIONAL else NEUTRAL_COLOUR
    return format_html(
        '<span class="tw-state" data-state="{}" style="background:{};color:#fff;padding:2px 8px;'
        'border-radius:10px;white-space:nowrap">{}</span>',
        state,
        colour,
        state.replace("_", " "),
    )


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "—"
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{sign}{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{sign}{minutes}m{secs:02d}s"


def _ago(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "—"
    return gettext("%(duration)s ago") % {"duration": _duration(max(now - timestamp, 0.0))}


#: Characters after which a long name may break onto the next line.
BREAK_AFTER = re.compile(r"(?<=[./_@-])")


def _breakable(text: str | None) -> str:
    """``text`` escaped, with a line break opportunity (``<wbr>``) after each ``.``, ``/``,
    ``_``, ``@`` and ``-``: long task names, keys and host names wrap where they read well."""
    if not text:
        return "—"
    return mark_safe("<wbr>".join(escape(part) for part in BREAK_AFTER.split(text)))


def _shortened(text: str | None, length: int = 8) -> str:
    """The first ``length`` characters of ``text`` and "…" (the whole value goes in a
    ``title``), "—" for none."""
    if not text:
        return "—"
    return text if len(text) <= length + 1 else f"{text[:length]}…"


# Transition history ----------------------------------------------------------------------


#: Where :func:`attach_entities` puts a record's entity (``None``: deleted since).
ENTITY_ATTRIBUTE = "_task_workflow_entity"


def attach_entities(records: Iterable[TransitionRecord]) -> None:
    """Read the entities of ``records`` with one query per model and attach each to its
    record (``None`` for an entity deleted since, or of a model that no longer exists)."""
    records = list(records)
    wanted: dict[int, set[str]] = defaultdict(set)
    for record in records:
        wanted[record.content_type_id].add(record.object_id)
    found: dict[tuple[int, str], Any] = {}
    for content_type_id, object_ids in wanted.items():
        model = ContentType.objects.get_for_id(content_type_id).model_class()
        if model is None:
            continue
        try:
            entities = list(model._base_manager.filter(pk__in=object_ids))
        except (ValueError, ValidationError):  # an id that is no key of this model
            continue
        for entity in entities:
            found[(content_type_id, str(entity.pk))] = entity
    for record in records:
        setattr(record, ENTITY_ATTRIBUTE, found.get((record.content_type_id, record.object_id)))


class TransitionHistoryInline(GenericTabularInline):
    """An entity's transition history on its change page, newest first."""

    model = TransitionRecord
    ct_field = "content_type"
    ct_fk_field = "object_id"
    fields = (
        "created_at",
        "transition",
        "source_state",
        "target_state",
        "task_name",
        "task_id",
        "user",
        "error_message",
    )
    readonly_fields = fields
    extra = 0
    max_num = 0
    can_delete = False
    show_change_link = True
    verbose_name_plural = _("Transition history")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(TransitionRecord)
class TransitionRecordAdmin(admin.ModelAdmin):
    """Read-only list of every recorded transition."""

    list_display = (
        "created_at",
        "entity_link",
        "transition",
        "source_state",
        "target_state",
        "task_name",
        "task_id",
        "user",
        "short_error",
    )
    list_filter = (
        ("content_type", admin.RelatedOnlyFieldListFilter),
        "transition",
        "target_state",
        "created_at",
    )
    search_fields = ("entity_uuid", "object_id", "task_name", "task_id", "error_message")
    date_hierarchy = "created_at"
    list_select_related = ("content_type", "user")
    readonly_fields = [f.name for f in TransitionRecord._meta.fields if f.name != "id"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # an audit trail

    def get_queryset(self, request: HttpRequest) -> QuerySet[TransitionRecord]:
        # The records hold every model's error texts: each user sees those of the models it
        # may view (list, search, filters, the record's own page all start from here).
        queryset = super().get_queryset(request)
        if request.user.is_superuser:
            return queryset
        # The list asks once per filter too: work it out once per request.
        viewable = getattr(request, "_task_workflow_viewable_content_types", None)
        if viewable is None:
            viewable = self._viewable_content_types(request)
            setattr(request, "_task_workflow_viewable_content_types", viewable)  # noqa: B010
        return queryset.filter(content_type_id__in=viewable)

    def _viewable_content_types(self, request: HttpRequest) -> list[int]:
        """Ids of the content types whose objects the user may view or change: through the
        model's own admin where it has one, else by its view/change permission."""
        user = request.user
        viewable = []
        for content_type in ContentType.objects.all():
            model = content_type.model_class()
            if model is None:  # a model that no longer exists: superusers only
                continue
            try:
                model_admin = self.admin_site.get_model_admin(model)
            except NotRegistered:
                opts = model._meta
                allowed = any(
                    user.has_perm(f"{opts.app_label}.{get_permission_codename(action, opts)}")
                    for action in ("view", "change")
                )
            else:
                allowed = model_admin.has_view_or_change_permission(request)
            if allowed:
                viewable.append(content_type.pk)
        return viewable

    def get_changelist_instance(self, request: HttpRequest) -> Any:
        changelist = super().get_changelist_instance(request)
        # The page's entities, read in one query per model (not one per row); the template
        # iterates the same, now evaluated, queryset.
        attach_entities(changelist.result_list)
        return changelist

    @admin.display(description=_("entity"), ordering="object_id")
    def entity_link(self, record: TransitionRecord) -> str:
        """The entity's ``__str__``, linked to its change page where its model has an admin
        page; an entity deleted since: its model's name, its uuid and "(deleted)"."""
        if not hasattr(record, ENTITY_ATTRIBUTE):  # a record not listed through the changelist
            attach_entities([record])
        entity = getattr(record, ENTITY_ATTRIBUTE)
        if entity is None:
            return gettext("%(model)s %(id)s (deleted)") % {
                "model": record.content_type.model,
                "id": record.entity_uuid or record.object_id,
            }
        # The model and uuid stay at hand (and searchable in the page) as the title.
        title = f"{record.content_type.model} {record.entity_uuid or record.object_id}"
        try:
            model_admin = self.admin_site.get_model_admin(type(entity))
        except NotRegistered:
            return format_html('<span title="{}">{}</span>', title, entity)
        opts = model_admin.opts
        url = reverse(
            f"{self.admin_site.name}:{opts.app_label}_{opts.model_name}_change", args=[record.object_id]
        )
        return format_html('<a href="{}" title="{}">{}</a>', url, title, entity)

    @admin.display(description=_("error"))
    def short_error(self, record: TransitionRecord) -> str:
        text = record.error_message
        return text if len(text) <= 80 else f"{text[:79]}…"


# StateMixin models -----------------------------------------------------------------------


class StateMixinAdmin(FSMAdminMixin, admin.ModelAdmin):
    """Admin for ``StateMixin`` models: a state badge, the error message, transition buttons
    (django-fsm's rules and permissions, applied under the row lock and recorded in the
    history with the admin user) and the recent transition history."""

    fsm_fields = ["state"]
    inlines = [TransitionHistoryInline]
    list_filter = ("state",)
    #: Badge colours of the model's own states (state value -> CSS colour), e.g.
    #: ``{Instance.States.ONLINE: "#2e7d32"}``; they win over :data:`STATE_COLOURS`. A state
    #: without one is orange while transitional (in ``States.TRANSITIONAL``), else grey.
    state_colours: Mapping[str, str] = {}

    def get_list_display(self, request: HttpRequest) -> Any:
        display = list(super().get_list_display(request))
        if "state" in display:
            display[display.index("state")] = "state_badge"
        elif "state_badge" not in display:
            display.append("state_badge")
        return display

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return (
            *super().get_readonly_fields(request, obj),
            "state_badge",
            "error_message",
            "state_changed_at",
        )

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        fields = list(super().get_fields(request, obj))
        # The badge replaces the plain state field on the form.
        return [f for f in fields if f != "state"] if "state_badge" in fields else fields

    @admin.display(description=_("state"), ordering="state")
    def state_badge(self, entity: StateMixin) -> str:
        """The entity's state as a badge in the colours of :attr:`state_colours`."""
        return state_badge(entity, self.state_colours)

    def save_model(self, request: HttpRequest, obj: Any, form: Any, change: bool) -> None:
        # Save only what the form changed: writing every column would put back the state
        # read at the start of the request over a transition a worker committed meanwhile.
        if change:
            obj.save(
                update_fields=[f for f in form.changed_data if f in {fl.name for fl in obj._meta.fields}]
            )
        else:
            super().save_model(request, obj, form, change)

    def fsm_transition_view(
        self, request: HttpRequest, object_id: str, transition_name: str, **kwargs: Any
    ) -> HttpResponse:
        """django-fsm-2's form view of one transition (``<pk>/transition/<name>/``), for users
        who may change the entity: django-fsm-2 checks only the transition's own
        ``permission=``, which most transitions do not have. Nothing is shown or applied
        otherwise (403), for GET and POST alike."""
        obj = self.get_object(request, object_id)
        if not self.has_change_permission(request, obj):
            raise PermissionDenied
        if obj is not None:
            transition = self._get_fsm_transition_by_name(obj=obj, transition_name=transition_name)
            if not self.is_fsm_transition_visible(transition):
                raise PermissionDenied
        return super().fsm_transition_view(request, object_id, transition_name, **kwargs)

    def _get_fsm_transition_func(self, *, obj: Any, transition_name: str) -> Any:
        # A name that is not a transition (from a URL or a POSTed button) is a 404, not a 500.
        try:
            return super()._get_fsm_transition_func(obj=obj, transition_name=transition_name)
        except (AttributeError, TypeError, ValueError) as exc:
            raise Http404(str(exc)) from None

    def _get_fsm_extra_context(self, *, request: HttpRequest, obj: Any) -> Any:
        # Transition buttons only for users who may change the entity.
        if obj is None or not self.has_change_permission(request, obj):
            return iter(())
        return super()._get_fsm_extra_context(request=request, obj=obj)

    def get_help_text(self, transition: Any) -> str:
        return str(transition.custom.get("help_text") or inspect.getdoc(transition.method) or "")

    def _apply_fsm_transition(
        self, *, obj: Any, transition_name: str, request: HttpRequest, kwargs: Any = None
    ) -> bool:
        # Every path that applies a transition (the change form's buttons, the form view)
        # ends here: never for a user who may not change the entity.
        if not self.has_change_permission(request, obj):
            raise PermissionDenied
        if not hasattr(obj, "uuid"):  # not a UuidMixin model: django-fsm's own path
            return bool(
                super()._apply_fsm_transition(
                    obj=obj, transition_name=transition_name, request=request, kwargs=kwargs
                )
            )
        method = self._get_fsm_transition_func(obj=obj, transition_name=transition_name)
        transition = self._get_fsm_transition_by_name(obj=obj, transition_name=transition_name)
        if not transition.has_perm(obj, request.user) or not self.is_fsm_transition_visible(transition):
            raise PermissionDenied
        try:
            apply_transition(
                type(obj),
                obj.uuid,
                method.__name__,
                origin=TransitionOrigin(user=request.user),
                method_kwargs=kwargs,
            )
        except TransitionNotAllowed as exc:
            self.message_user(
                request,
                gettext("Transition '%(transition)s' is not allowed: %(error)s")
                % {"transition": transition_name, "error": exc},
                messages.ERROR,
            )
            return False
        self.message_user(
            request,
            gettext("Transition '%(transition)s' applied.") % {"transition": transition_name},
            messages.SUCCESS,
        )
        return True


# Throttle locks --------------------------------------------------------------------------


@admin.register(ThrottleLock)
class ThrottleLockAdmin(admin.ModelAdmin):
    """Held throttle slots, read from the cache backend; force release for the permitted."""

    list_per_page = 100
    change_list_template = "admin/task_workflow/throttlelock/change_list.html"
    confirm_template = "admin/task_workflow/throttlelock/release_confirmation.html"
    #: The locks table's columns: (sort key or ``None``, label, CSS class). Sized to fit a
    #: 1280 px window beside the admin's sidebar: long values wrap, ids are shortened
    #: (the whole value in a ``title``), acquired at is the title of "held for".
    columns = (
        ("task", _("task name"), "tw-col-task"),
        ("key", _("key"), "tw-col-key"),
        (None, _("slot"), "tw-col-slot"),
        ("task_id", _("holder task id"), "tw-col-id"),
        ("host", _("worker host / pid"), "tw-col-host"),
        ("held", _("held for"), "tw-col-held"),
        ("expires", _("lease"), "tw-col-lease"),
        (None, _("in use"), "tw-col-use"),
    )
    #: Most waiters shown (the first in line of each group come first).
    waiters_shown = 100

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_release_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("task_workflow.release_throttlelock")

    def get_urls(self) -> list[Any]:
        # Only the list: there are no rows to add, change or delete.
        from django.urls import path

        name = f"{self.opts.app_label}_{self.opts.model_name}_changelist"
        return [path("", self.admin_site.admin_view(self.changelist_view), name=name)]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        if request.method == "POST":
            return self._release_view(request)
        params = request.GET
        sort = params.get("o", "task")
        if sort.lstrip("-") not in SORT_KEYS:
            sort = "task"
        expired = {"1": True, "0": False}.get(params.get("expired", ""))
        rows = list_locks(
            task_name=params.get("task") or None,
            key=params.get("key") or None,
            search=params.get("q", ""),
            expired=expired,
            sort=sort,
        )
        waiters = list_waiters(
            task_name=params.get("task") or None,
            key=params.get("key") or None,
            search=params.get("q", ""),
        )
        groups: dict[tuple[str, str | None], tuple[int, int]] = {}
        for row in rows:
            groups[(row.slot.group.task_name, row.slot.group.key)] = (row.in_use, row.slot.concurrency)
        paginator = Paginator(rows, self.list_per_page)
        page = paginator.get_page(params.get("p"))
        # The groups table covers this page's rows: all groups could be thousands.
        on_page = {(row.slot.group.task_name, row.slot.group.key) for row in page.object_list}
        group_total = len(groups)
        groups = {group: usage for group, usage in groups.items() if group in on_page}
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": gettext("Throttle locks"),
            "page": page,
            "paginator": paginator,
            "rows": [self._row(row) for row in page.object_list],
            "headers": self._headers(params, sort),
            "groups": sorted(groups.items(), key=lambda item: (item[0][0], item[0][1] or "")),
            "task_names": sorted({row.slot.group.task_name for row in rows}),
            "group_total": group_total,
            "params": params,
            "query_without_page": urlencode({k: v for k, v in params.items() if k != "p"}),
            "can_release": self.has_release_permission(request),
            "total": len(rows),
            "waiters": [self._waiter(call) for call in waiters[: self.waiters_shown]],
            "waiter_total": len(waiters),
            **(extra_context or {}),
        }
        return TemplateResponse(request, self.change_list_template, context)

    def _headers(self, params: Any, sort: str) -> list[dict[str, Any]]:
        headers = []
        for key, label, css_class in self.columns:
            entry: dict[str, Any] = {"label": label, "sortable": key is not None, "class": css_class}
            if key is not None:
                ascending = sort == key
                order = f"-{key}" if ascending else key
                query = {**{k: v for k, v in params.items() if k not in ("o", "p")}, "o": order}
                entry["url"] = "?" + urlencode(query)
                entry["sorted"] = "ascending" if ascending else "descending" if sort == f"-{key}" else ""
            headers.append(entry)
        return headers

    @staticmethod
    def _row(row: Any) -> dict[str, Any]:
        slot = row.slot
        fence = "" if slot.fencing_token is None else str(slot.fencing_token)
        return {
            "ref": slot.ref,
            "task_name": slot.group.task_name,
            "key": slot.group.key,
            "task_name_html": _breakable(slot.group.task_name),
            "key_html": _breakable(slot.group.key),
            "host_html": _breakable(f"{slot.hostname or '?'} / {slot.pid or '?'}"),
            "slot": slot.slot,
            "token": slot.token,
            "fencing_token": fence,
            # Fencing tokens count up from the clock in µs: their last digits tell them apart.
            "fencing_tail": f"…{fence[-6:]}" if len(fence) > 7 else fence,
            "task_id": slot.task_id or "",
            "task_id_short": _shortened(slot.task_id),
            "host": f"{slot.hostname or '?'} / {slot.pid or '?'}",
            "acquired_at": _when(slot.acquired_at),
            "held_for": _duration(slot.held_for),
            "expires_in": _duration(slot.expires_in),
            "ended_ago": _duration(-slot.expires_in),
            "expired": slot.expired,
            "usage": gettext("%(in_use)d of %(concurrency)d")
            % {"in_use": row.in_use, "concurrency": slot.concurrency},
            "over": row.in_use > slot.concurrency,
        }

    @staticmethod
    def _waiter(call: WaitingCall) -> dict[str, Any]:
        host = f"{call.hostname or '?'} / {call.pid or '?'}"
        return {
            "task_name": call.group.task_name,
            "key": call.group.key,
            "task_name_html": _breakable(call.group.task_name),
            "key_html": _breakable(call.group.key),
            "token": call.token,
            "place": call.place,
            "since": _when(call.since),
            "since_ago": _ago(call.since, call.now),
            "task_id": call.task_id or "",
            "task_id_short": _shortened(call.task_id),
            "host_html": _breakable(None if call.hostname is None and call.pid is None else host),
        }

    def _release_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_release_permission(request):
            raise PermissionDenied
        refs = list(dict.fromkeys(request.POST.getlist("slot")))  # each slot once
        if not refs:
            self.message_user(request, gettext("Select at least one lock to release."), messages.WARNING)
            return HttpResponseRedirect(request.get_full_path())
        try:
            parse_refs(refs)  # all of them, before asking or releasing anything
        except ValueError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())
        if request.POST.get("confirm") != "yes":
            selected = self._describe_refs(refs)
            context = {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "title": gettext("Release throttle locks?"),
                "refs": refs,
                "selected": selected,
            }
            return TemplateResponse(request, self.confirm_template, context)
        failure: ReleaseFailed | None = None
        try:
            results = force_release(refs, actor=f"admin user {request.user.get_username()}")
        except ValueError as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())
        except ReleaseFailed as exc:
            failure, results = exc, exc.done
        self._log_releases(request, results)  # also those done before a failure
        released_count = sum(1 for _, _, released in results if released)
        if failure is not None:
            failed = gettext(
                "Released %(released)d of %(selected)d selected locks, then releasing %(group)s "
                "failed (%(error_type)s: %(error)s)"
            ) % {
                "released": released_count,
                "selected": len(refs),
                "group": failure.group,
                "error_type": type(failure.error).__name__,
                "error": failure.error,
            }
            if failure.untried:
                failed += ngettext(
                    "; the other %(count)d was not tried",
                    "; the other %(count)d were not tried",
                    failure.untried,
                ) % {"count": failure.untried}
            self.message_user(request, failed + ".", messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())
        released = gettext("Released %(released)d of %(selected)d selected locks") % {
            "released": released_count,
            "selected": len(results),
        }
        if released_count != len(results):
            released += gettext(" (the others were already free)")
        self.message_user(request, released, messages.SUCCESS)
        return HttpResponseRedirect(request.get_full_path())

    @staticmethod
    def _log_releases(request: HttpRequest, results: list[tuple[SlotGroup, str, bool]]) -> None:
        """One admin log entry per slot released (or found already free)."""
        content_type = ContentType.objects.get_for_model(ThrottleLock, for_concrete_model=False)
        for group, token, released in results:
            LogEntry.objects.create(
                user_id=request.user.pk,  # type: ignore[misc]  # an authenticated admin user
                content_type=content_type,
                object_id=token,
                object_repr=str(group)[:200],
                action_flag=DELETION,
                change_message=(
                    gettext("Force-released throttle slot (released)")
                    if released
                    else gettext("Force-released throttle slot (already free)")
                ),
            )

    @staticmethod
    def _describe_refs(refs: list[str]) -> list[str]:
        """A line per slot for the confirmation page (the refs are well-formed)."""
        held = {(slot.group, slot.token): slot for slot in get_backend().held_slots()}
        descriptions = []
        for group, token, _slot in parse_refs(refs):
            slot = held.get((group, token))
            if slot is None:
                descriptions.append(
                    gettext("%(group)s — holder token %(token)s (no longer held)")
                    % {"group": group, "token": token[:8]}
                )
            else:
                descriptions.append(
                    gettext("%(group)s — task %(task_id)s on %(host)s pid %(pid)s")
                    % {
                        "group": group,
                        "task_id": slot.task_id or "?",
                        "host": slot.hostname or "?",
                        "pid": slot.pid or "?",
                    }
                )
        return descriptions
