"""The admin pages: throttle locks (list, filters, sorting, pages, force release), the
transition history list, and the change page of a ``StateMixin`` model (the example's
``Instance``), with the permission rules of each.

Django's test ``Client`` against the real admin site. Slots live in the configured lock
store: django-redis (db 15) on the PostgreSQL + Redis run, the database cache on the
SQLite run (``TEST_DATABASE=sqlite``). They are taken in-process, either as a task would
(``throttle(...).acquire()``) or, where a test needs exact metadata, an expired lease or
many slots, straight through the backend (``backend.acquire``, no lease renewer). Each
test uses slot group names of its own: the shared Redis may hold other tests' slots.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from types import SimpleNamespace
from typing import Any

import pytest
from django import forms
from django.contrib import admin as django_admin
from django.contrib.admin.models import DELETION, LogEntry
from django.contrib.auth.models import Permission
from django.contrib.contenttypes.models import ContentType
from django.core.management import call_command
from django.db import connection, transaction
from django.db.models.signals import pre_save
from django.test import Client
from django.urls import reverse

from example_project import tasks as example_tasks
from example_project.models import Instance
from task_workflow import locks as locks_module
from task_workflow.admin import (
    NEUTRAL_COLOUR,
    STATE_COLOURS,
    TRANSITIONAL_COLOUR,
    StateMixinAdmin,
    state_badge,
)
from task_workflow.models import StateMixin, ThrottleLock, TransitionRecord
from task_workflow.tasks import apply_transition, error_transition, throttle
from task_workflow.throttle import (
    DatabaseCacheThrottleBackend,
    HeldSlot,
    Lease,
    RedisThrottleBackend,
    SlotGroup,
    get_backend,
)
from task_workflow.throttle import cache_backend as cache_backend_module
from task_workflow.throttle import database_backend as database_backend_module
from tests.blocked_callers import let_blocked_callers_finish
from tests.testapp.models import Volume
from tests.waiting import wait_until

States = Instance.States

LOCKS_URL = reverse("admin:task_workflow_throttlelock_changelist")
HISTORY_URL = reverse("admin:task_workflow_transitionrecord_changelist")
LOGIN_URL = reverse("admin:login")

#: Lease seconds of the slots held here: long enough that no renewal (every ttl / 3)
#: runs during a test.
TTL = 900.0

#: "2023-11-14 22:13:20 UTC"
FIXED_ACQUIRED_AT = 1_700_000_000.0


# --- A small HTML reader (the pages are checked as rendered, not through their context) ---


VOID_TAGS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


@dataclass(eq=False)
class Element:
    tag: str
    attrs: dict[str, str]
    parent: Element | None = None
    children: list[Element | str] = field(default_factory=list)

    @property
    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    @property
    def text(self) -> str:
        """The text content, whitespace collapsed."""
        parts: list[str] = []

        def collect(node: Element | str) -> None:
            if isinstance(node, str):
                parts.append(node)
            else:
                for child in node.children:
                    collect(child)

        collect(self)
        return " ".join("".join(parts).split())

    def iter(self) -> Iterator[Element]:
        for child in self.children:
            if isinstance(child, Element):
                yield child
                yield from child.iter()

    def find_all(self, tag: str | None = None, *, cls: str | None = None, **attrs: str) -> list[Element]:
        """Descendants by tag, a class they have, and exact attribute values (``data_x``
        for ``data-x``, ``id_`` for ``id``)."""
        wanted = {name.rstrip("_").replace("_", "-"): value for name, value in attrs.items()}
        return [
            element
            for element in self.iter()
            if (tag is None or element.tag == tag)
            and (cls is None or cls in element.classes)
            and all(element.attrs.get(name) == value for name, value in wanted.items())
        ]

    def find(self, tag: str | None = None, **kwargs: str) -> Element:
        found = self.find_all(tag, **kwargs)
        assert found, f"no <{tag or '*'} {kwargs}> in the page"
        return found[0]


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("document", {})
        self.current = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {name: value or "" for name, value in attrs}, parent=self.current)
        self.current.children.append(element)
        if tag not in VOID_TAGS:
            self.current = element

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.current.children.append(
            Element(tag, {name: value or "" for name, value in attrs}, parent=self.current)
        )

    def handle_endtag(self, tag: str) -> None:
        node: Element | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:  # else a stray end tag: ignore
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.children.append(data)


def page(response: Any) -> Element:
    builder = _TreeBuilder()
    builder.feed(response.content.decode())
    builder.close()
    return builder.root


def form_data(form: Element) -> dict[str, Any]:
    """What a browser submits for ``form`` without pressing a button."""
    data: dict[str, Any] = {}

    def add(name: str, value: str) -> None:
        if name in data:
            data[name] = [*data[name], value] if isinstance(data[name], list) else [data[name], value]
        else:
            data[name] = value

    for element in form.iter():
        name = element.attrs.get("name")
        if not name:
            continue
        if element.tag == "input":
            kind = element.attrs.get("type", "text")
            if kind in ("submit", "button", "image", "file", "reset"):
                continue
            if kind in ("checkbox", "radio") and "checked" not in element.attrs:
                continue
            add(name, element.attrs.get("value", "on" if kind == "checkbox" else ""))
        elif element.tag == "textarea":
            add(name, element.text)
        elif element.tag == "select":
            options = element.find_all("option")
            chosen = [o for o in options if "selected" in o.attrs] or options[:1]
            for option in chosen:
                add(name, option.attrs.get("value", option.text))
    return data


def messages_of(response: Any) -> list[str]:
    return [
        li.text for li in page(response).find_all("li") if li.parent and "messagelist" in li.parent.classes
    ]


# --- Throttle locks page helpers -------------------------------------------------------------


def lock_rows(response: Any) -> list[dict[str, Any]]:
    """The rows of the locks table: column label -> cell text, plus the ``data-*`` values
    and the checkbox value (``None`` without one)."""
    table = page(response).find("table", id_="result_list")
    labels = [th.text for th in table.find("thead").find_all("th")]
    rows = []
    for tr in table.find("tbody").find_all("tr", cls="tw-lock"):
        cells = tr.find_all("td")
        boxes = tr.find_all("input", name="slot")
        row: dict[str, Any] = dict(zip(labels, [td.text for td in cells], strict=True))
        row.pop("", None)  # the checkbox column
        row["data-task"] = tr.attrs["data-task"]
        row["data-key"] = tr.attrs["data-key"]
        row["data-task-id"] = tr.attrs["data-task-id"]
        row["checkbox"] = boxes[0].attrs["value"] if boxes else None
        # The whole values behind shortened cells.
        titled = {"acquired-title": ("td", "tw-held"), "fence-title": ("span", "tw-fence")}
        for label, (tag, cls) in titled.items():
            found = tr.find_all(tag, cls=cls)
            row[label] = (found[0].find_all("time") or found)[0].attrs.get("title") if found else None
        ids = tr.find_all("td", cls="tw-task-id")[0].find_all("code")
        row["task-id-title"] = ids[0].attrs["title"] if ids else None
        rows.append(row)
    return rows


def group_rows(response: Any) -> list[tuple[str, str, str]]:
    """(task name, key, in use) of the slot groups table."""
    tables = page(response).find_all("table", id_="tw-groups")
    if not tables:
        return []
    return [tuple(td.text for td in tr.find_all("td")) for tr in tables[0].find("tbody").find_all("tr")]


def locks(client: Client, **params: str) -> Any:
    response = client.get(LOCKS_URL, params)
    assert response.status_code == 200, response
    return response


def held_tokens() -> set[str]:
    return {slot.token for slot in get_backend().held_slots()}


def held_slot(token: str) -> HeldSlot:
    [slot] = [slot for slot in get_backend().held_slots() if slot.token == token]
    return slot


def utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# --- Fixtures --------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _lock_store(cache_tables, db):
    """The lock store is ready (on the SQLite run it is a database cache table)."""


@pytest.fixture
def name() -> str:
    """A slot group name of this test's own."""
    return f"tests.admin.{uuid.uuid4().hex[:8]}"


@dataclass
class Written:
    """A slot written straight through the backend."""

    group: SlotGroup
    token: str
    slot: str


class Slots:
    """Slots taken by a test; whatever it still holds is released at teardown."""

    def __init__(self) -> None:
        self.leases: list[Lease] = []
        self.written: list[Written] = []

    def hold(self, name: str, key: str | None = None, concurrency: int = 1) -> Lease:
        """Take a slot the way a task does (metadata, lease renewer)."""
        lease = throttle(key=key, concurrency=concurrency, name=name, wait=0, ttl=TTL).acquire()
        self.leases.append(lease)
        return lease

    def write(
        self,
        name: str,
        key: str | None = None,
        *,
        concurrency: int = 1,
        ttl: float = TTL,
        **metadata: Any,
    ) -> Written:
        """Take a slot through ``backend.acquire`` with the given metadata (no renewer)."""
        group = SlotGroup(name, key)
        token = uuid.uuid4().hex
        meta = {
            "task_name": name,
            "key": key,
            "concurrency": concurrency,
            "task_id": None,
            "hostname": "test-host",
            "pid": 1,
            "acquired_at": time.time(),
            "ttl": ttl,
            **metadata,
        }
        result = get_backend().acquire(group, token, concurrency, ttl, meta)
        assert result.acquired, f"could not take a slot of {group}"
        written = Written(group, token, result.slot)
        self.written.append(written)
        return written

    def release_all(self) -> None:
        for lease in self.leases:
            lease.release()
        backend = get_backend()
        for written in self.written:
            backend.release(written.group, written.token, written.slot)


@pytest.fixture
def slots() -> Iterator[Slots]:
    taken = Slots()
    yield taken
    taken.release_all()


@pytest.fixture
def make_user(django_user_model):
    """``make_user(name, staff=True, perms=("app.codename", ...), active=True)``."""

    def make(username: str, *, staff: bool = True, perms: tuple[str, ...] = (), active: bool = True):
        user = django_user_model.objects.create_user(
            username=username, password="pw", is_staff=staff, is_active=active
        )
        for perm in perms:
            app_label, codename = perm.split(".")
            user.user_permissions.add(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )
        return django_user_model.objects.get(pk=user.pk)  # no stale permission cache

    return make


def client_for(user: Any, **kwargs: Any) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


# --- Admin index -----------------------------------------------------------------------------


def test_admin_index_lists_throttle_locks_and_transition_history(admin_client):
    """The superuser's index shows both pages under the task_workflow app, each linked,
    and offers no "Add" for either (there is nothing to add)."""
    response = admin_client.get(reverse("admin:index"))
    assert response.status_code == 200
    [module] = page(response).find_all("div", cls="app-task_workflow")
    assert module.find("caption").text == "Task workflow"
    entries = {a.text: a.attrs["href"] for row in module.find_all("tr") for a in row.find("th").find_all("a")}
    assert entries == {"Throttle locks": LOCKS_URL, "Transition history": HISTORY_URL}
    assert module.find_all("a", cls="addlink") == []


# --- Throttle locks: the list ----------------------------------------------------------------


def test_lists_every_held_slot_with_its_holder(admin_client, slots, name):
    """Each held slot is a row: task name, key in its original form (spaces, unicode,
    markup), holder task id, host / pid, acquired at, held for, lease expires in, in use
    "N of M"; the groups table counts the slots per group."""
    key = "eu west 1 — Zürich <b>&amp;"
    first = slots.hold(name, key, concurrency=2)
    second = slots.hold(name, key, concurrency=2)
    report = f"{name}.report"
    written = slots.write(
        report,
        task_id="0f0e0d0c-task-id",
        hostname="celery@worker-7",
        pid=4242,
        acquired_at=FIXED_ACQUIRED_AT,
    )

    response = locks(admin_client)

    rows = [row for row in lock_rows(response) if row["data-task"].startswith(name)]
    held = [row for row in rows if row["data-task"] == name]
    assert len(rows) == 3
    assert len(held) == 2
    acquired_at = {held_slot(first.token).acquired_at, held_slot(second.token).acquired_at}
    assert {row["acquired-title"] for row in held} == {
        f"acquired at {utc(ts)}" for ts in acquired_at if ts is not None
    }
    for row in held:
        assert row["Task name"] == name
        assert row["Key"] == key
        assert row["data-key"] == key
        assert row["Holder task id"] == "—"  # taken outside a task
        assert row["Worker host / pid"] == f"{socket.gethostname()} / {os.getpid()}"
        assert re.fullmatch(r"\d+\.\ds", row["Held for"]), row
        assert re.fullmatch(r"ends in 14m5\ds", row["Lease"]), row  # of 15 minutes
        assert row["In use"] == "2 of 2"
    fences = {str(held_slot(lease.token).fencing_token) for lease in (first, second)}
    assert {row["fence-title"] for row in held} == {f"fencing token {fence}" for fence in fences}
    assert {row["Slot"].split()[-1] for row in held} == {f"…{fence[-6:]}" for fence in fences}
    [other] = [row for row in rows if row["data-task"] == report]
    assert other["Key"] == "—"
    assert other["Holder task id"] == "0f0e0d0c…"  # shortened, the whole id as its title
    assert other["task-id-title"] == "0f0e0d0c-task-id"
    assert other["data-task-id"] == "0f0e0d0c-task-id"
    assert other["Worker host / pid"] == "celery@worker-7 / 4242"
    assert other["acquired-title"] == "acquired at 2023-11-14 22:13:20 UTC"
    assert re.fullmatch(r"\d+h\d\dm\d\ds", other["Held for"]), other
    assert other["In use"] == "1 of 1"
    assert other["checkbox"] == held_slot(written.token).ref
    # Markup in a key is shown, never interpreted.
    assert "<b>&amp;" not in response.content.decode()

    groups = [row for row in group_rows(response) if row[0].startswith(name)]
    assert groups == [(name, key, "2 of 2"), (report, "—", "1 of 1")]


def test_groups_table_links_filter_by_task_and_original_key(admin_client, slots, name):
    """The groups table links to the list filtered by the group (the key url-encoded)."""
    key = "rack 4 / ü"
    slots.hold(name, key)
    slots.hold(name, "other")
    links = {
        a.text: a.attrs["href"]
        for a in page(locks(admin_client, task=name)).find("table", id_="tw-groups").find_all("a")
    }
    response = admin_client.get(LOCKS_URL + links[key])
    assert [(row["Task name"], row["Key"]) for row in lock_rows(response)] == [(name, key)]
    response = admin_client.get(LOCKS_URL + links[name])
    assert sorted(row["Key"] for row in lock_rows(response)) == ["other", key]


def test_filter_by_task_key_and_search(admin_client, slots, name):
    other = f"{name}.other"
    slots.hold(name, "k1")
    slots.hold(name, "k 2")
    slots.hold(other, "k1")
    slots.write(name, "k3", task_id="needle-5150", hostname="celery@needle-host")

    def shown(**params: str) -> list[tuple[str, str]]:
        return sorted((row["Task name"], row["Key"]) for row in lock_rows(locks(admin_client, **params)))

    assert shown(task=name) == [(name, "k 2"), (name, "k1"), (name, "k3")]
    by_key = shown(key="k1")  # other tests' slots may share a key, never our names
    assert {(task, key) for task, key in by_key if task.startswith(name)} == {(name, "k1"), (other, "k1")}
    assert {key for _, key in by_key} == {"k1"}
    assert shown(task=name, key="k 2") == [(name, "k 2")]
    assert shown(task=name, key="nope") == []
    assert shown(q=name.upper()) == [(name, "k 2"), (name, "k1"), (name, "k3"), (other, "k1")]
    assert shown(q="NEEDLE-51") == [(name, "k3")]  # task id
    assert shown(q="needle-host") == [(name, "k3")]  # host
    # The task filter offers the held task names.
    options = page(locks(admin_client)).find("select", id_="tw-task").find_all("option")
    assert {name, other} <= {option.attrs["value"] for option in options}


def make_expired_slot(slots: Slots, name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Written, Written]:
    """A live lease and one past its deadline (its holder stopped renewing), in one group.

    Redis and the DatabaseCache backend (one record per group): a 1 ms lease next to a long
    one (the long one keeps the group's record alive; an expired lease stays listed until an
    acquire sweeps it; on PostgreSQL deadlines use the server's clock, so no client clock can
    fake one). The generic cache backend deletes an entry when its lease ends, so there the
    expired lease is taken by a holder whose clock runs 100 s behind (deadline in the past,
    entry alive).
    """
    live = slots.write(name, "g", concurrency=3, task_id="live-holder")
    if isinstance(get_backend(), RedisThrottleBackend | DatabaseCacheThrottleBackend):
        lapsed = slots.write(name, "g", concurrency=3, ttl=0.001, task_id="lapsed-holder")
    else:
        behind = SimpleNamespace(time=lambda: time.time() - 100, sleep=time.sleep)
        with monkeypatch.context() as patch:
            patch.setattr(cache_backend_module, "time", behind)
            patch.setattr(database_backend_module, "time", behind)
            lapsed = slots.write(name, "g", concurrency=3, ttl=60, task_id="lapsed-holder")
    deadline = time.monotonic() + 5
    while not held_slot(lapsed.token).expired:  # at most a few ms
        assert time.monotonic() < deadline, "the 1 ms lease did not expire"
        time.sleep(0.005)
    return live, lapsed


def test_expired_filter_shows_only_leases_past_their_deadline(admin_client, slots, name, monkeypatch):
    make_expired_slot(slots, name, monkeypatch)

    def shown(**params: str) -> dict[str, dict[str, Any]]:
        return {row["data-task-id"]: row for row in lock_rows(locks(admin_client, task=name, **params))}

    expired = shown(expired="1")
    assert set(expired) == {"lapsed-holder"}
    assert re.fullmatch(r"ended \d+\.\ds ago", expired["lapsed-holder"]["Lease"]), expired
    assert expired["lapsed-holder"]["Holder task id"] == "lapsed-h…"  # the whole id in the title
    live = shown(expired="0")
    assert set(live) == {"live-holder"}
    assert re.fullmatch(r"ends in \S+", live["live-holder"]["Lease"]), live
    assert set(shown()) == {"live-holder", "lapsed-holder"}
    # The filter form keeps the choice.
    [selected] = (
        page(locks(admin_client, expired="1"))
        .find("select", id_="tw-expired")
        .find_all("option", selected="")
    )
    assert selected.attrs["value"] == "1"


SORT_CASES = {
    # The slots (see test_sorting): key, held for, lease left, host, task id
    #   k-a:  30 s, 300 s, host-c, id-2
    #   k-b:  90 s, 100 s, host-a, id-3
    #   k-c:  60 s, 200 s, host-b, id-1
    "task": ["k-a", "k-b", "k-c"],  # one task name: then by key
    "-task": ["k-c", "k-b", "k-a"],
    "key": ["k-a", "k-b", "k-c"],
    "-key": ["k-c", "k-b", "k-a"],
    "held": ["k-a", "k-c", "k-b"],
    "-held": ["k-b", "k-c", "k-a"],
    "acquired": ["k-b", "k-c", "k-a"],
    "-acquired": ["k-a", "k-c", "k-b"],
    "expires": ["k-b", "k-c", "k-a"],
    "-expires": ["k-a", "k-c", "k-b"],
    "host": ["k-b", "k-c", "k-a"],
    "-host": ["k-a", "k-c", "k-b"],
    "task_id": ["k-c", "k-a", "k-b"],
    "-task_id": ["k-b", "k-a", "k-c"],
    "bogus": ["k-a", "k-b", "k-c"],  # unknown: the default (task)
}


@pytest.mark.parametrize(("order", "expected"), list(SORT_CASES.items()), ids=list(SORT_CASES))
def test_sorting(admin_client, slots, name, order, expected):
    now = time.time()
    slots.write(name, "k-a", acquired_at=now - 30, ttl=300, hostname="host-c", task_id="id-2")
    slots.write(name, "k-b", acquired_at=now - 90, ttl=100, hostname="host-a", task_id="id-3")
    slots.write(name, "k-c", acquired_at=now - 60, ttl=200, hostname="host-b", task_id="id-1")

    response = locks(admin_client, task=name, o=order)

    assert [row["Key"] for row in lock_rows(response)] == expected
    # The sorted column is marked, and its link reverses the order (keeping the filter).
    column = "task" if order == "bogus" else order.lstrip("-")
    label = {
        "task": "Task name",
        "key": "Key",
        "held": "Held for",
        "acquired": None,  # sorts by "held for" reversed: no column of its own
        "expires": "Lease",
        "host": "Worker host / pid",
        "task_id": "Holder task id",
    }[column]
    if label is None:
        return
    [header] = [
        th for th in page(response).find("table", id_="result_list").find_all("th") if th.text == label
    ]
    descending = order.startswith("-")
    assert {"sorted", "descending" if descending else "ascending"} <= header.classes
    href = header.find("a").attrs["href"]
    assert f"o={'' if descending else '-'}{column}" in href
    assert f"task={name}" in href


def test_pagination_shows_100_rows_per_page(admin_client, slots, name):
    """150 held slots of one group: 100 on page 1, the other 50 on page 2; the page links
    keep the filter."""
    for number in range(150):
        slots.write(name, "wide", concurrency=200, task_id=f"t-{number:03d}")

    first = locks(admin_client, task=name)
    second = locks(admin_client, task=name, p="2")

    first_ids = [row["Holder task id"] for row in lock_rows(first)]
    second_ids = [row["Holder task id"] for row in lock_rows(second)]
    assert len(first_ids) == 100
    assert len(second_ids) == 50
    assert sorted(first_ids + second_ids) == [f"t-{number:03d}" for number in range(150)]
    assert all(row["In use"] == "150 of 200" for row in lock_rows(second))
    paginator = page(first).find("p", cls="paginator")
    assert "page 1 of 2" in paginator.text
    next_link = paginator.find("a").attrs["href"]
    assert f"task={name}" in next_link
    followed = admin_client.get(LOCKS_URL + next_link)
    assert [row["Holder task id"] for row in lock_rows(followed)] == second_ids
    assert "page 2 of 2" in page(second).find("p", cls="paginator").text


# --- Throttle locks: force release -----------------------------------------------------------


def test_get_never_releases(admin_client, slots, name):
    lease = slots.hold(name, "k")
    ref = held_slot(lease.token).ref
    response = admin_client.get(LOCKS_URL, {"slot": ref, "confirm": "yes", "action": "release"})
    assert response.status_code == 200
    assert lease.token in held_tokens()


def test_post_without_confirm_shows_the_confirmation_page(admin_client, slots, name):
    lease = slots.hold(name, "rack 1")
    ref = held_slot(lease.token).ref

    response = admin_client.post(LOCKS_URL, {"slot": ref, "action": "release"})

    assert response.status_code == 200
    assert "admin/task_workflow/throttlelock/release_confirmation.html" in [
        t.name for t in response.templates
    ]
    html = page(response)
    assert f"{name}[rack 1]" in html.find("ul", id_="tw-release-list").text
    [form] = [f for f in html.find_all("form") if f.find_all("input", id_="tw-confirm-release")]
    data = form_data(form)
    assert data["slot"] == ref
    assert data["confirm"] == "yes"
    assert data["csrfmiddlewaretoken"]
    assert lease.token in held_tokens()


def test_post_without_csrf_token_is_rejected(admin_user, slots, name):
    lease = slots.hold(name, "k")
    client = client_for(admin_user, enforce_csrf_checks=True)
    response = client.post(LOCKS_URL, {"slot": held_slot(lease.token).ref, "confirm": "yes"})
    assert response.status_code == 403
    assert lease.token in held_tokens()
    assert not LogEntry.objects.exists()


def test_confirmed_release_frees_the_slot_and_logs_it(admin_user, slots, name):
    """The whole flow with CSRF checks on: select on the list, confirm, released. The
    other slot stays, a LogEntry names the group, and the holder's own later release
    is a harmless no-op."""
    lease = slots.hold(name, "db-7", concurrency=2)
    kept = slots.hold(name, "db-7", concurrency=2)
    client = client_for(admin_user, enforce_csrf_checks=True)

    listing = page(locks(client, task=name))
    form = listing.find("form", id_="tw-locks-form")
    assert form.find("button", id_="tw-release").text == "Release selected locks…"
    ref = held_slot(lease.token).ref
    assert ref in [box.attrs["value"] for box in form.find_all("input", name="slot")]
    selected = {**form_data(form), "slot": ref, "action": "release"}
    confirmation = client.post(f"{LOCKS_URL}?task={name}", selected)
    assert confirmation.status_code == 200
    assert lease.token in held_tokens()
    [confirm_form] = [f for f in page(confirmation).find_all("form") if f.find_all("input", name="confirm")]

    done = client.post(f"{LOCKS_URL}?task={name}", form_data(confirm_form))

    assert done.status_code == 302
    assert done["Location"] == f"{LOCKS_URL}?task={name}"
    assert lease.token not in held_tokens()
    assert kept.token in held_tokens()
    followed = client.get(done["Location"])
    assert messages_of(followed) == ["Released 1 of 1 selected locks"]
    assert [row["Key"] for row in lock_rows(followed)] == ["db-7"]
    [entry] = LogEntry.objects.all()
    assert entry.user == admin_user
    assert entry.action_flag == DELETION
    assert entry.content_type == ContentType.objects.get_for_model(ThrottleLock, for_concrete_model=False)
    assert entry.object_repr == f"{name}[db-7]"
    assert entry.object_id == lease.token
    assert "Force-released" in entry.change_message
    # The holder finishes later: its release finds nothing, without an error.
    assert lease.release() is False
    # Confirming again (a double submit) releases nothing more and says so.
    again = client.post(f"{LOCKS_URL}?task={name}", form_data(confirm_form), follow=True)
    assert messages_of(again) == ["Released 0 of 1 selected locks (the others were already free)"]
    assert kept.token in held_tokens()


def test_release_without_a_selection_or_with_a_bad_reference(admin_client, slots, name):
    lease = slots.hold(name, "k")
    nothing = admin_client.post(LOCKS_URL, {"action": "release", "confirm": "yes"}, follow=True)
    assert messages_of(nothing) == ["Select at least one lock to release."]
    bad = admin_client.post(LOCKS_URL, {"slot": "not-a-ref", "confirm": "yes"}, follow=True)
    [message] = messages_of(bad)
    assert message == "Nothing released: not a throttle slot reference: 'not-a-ref'."
    assert lease.token in held_tokens()
    assert not LogEntry.objects.exists()


def test_a_malformed_reference_among_several_releases_nothing(admin_client, slots, name):
    """All references are read before any slot is released: one malformed reference in
    the selection releases none of them (nothing half done, nothing left unlogged)."""
    first = slots.hold(name, "a")
    second = slots.hold(name, "b")
    refs = [held_slot(first.token).ref, "not-a-ref", held_slot(second.token).ref, '["t", 5, "tok", ""]']

    response = admin_client.post(LOCKS_URL, {"slot": refs, "confirm": "yes"}, follow=True)

    assert messages_of(response) == [
        "Nothing released: 2 of the 4 selected references are not throttle slot references: "
        '\'not-a-ref\', \'["t", 5, "tok", ""]\'.'
    ]
    assert {first.token, second.token} <= held_tokens()
    assert not LogEntry.objects.exists()


def test_a_malformed_reference_is_refused_before_the_confirmation_page(admin_client, slots, name):
    lease = slots.hold(name, "a")
    response = admin_client.post(LOCKS_URL, {"slot": [held_slot(lease.token).ref, "not-a-ref"]})
    assert response.status_code == 302
    followed = admin_client.get(response["Location"])
    assert messages_of(followed) == [
        "Nothing released: 1 of the 2 selected references is not a throttle slot reference: 'not-a-ref'."
    ]
    assert lease.token in held_tokens()


def test_force_release_reads_every_reference_first(slots, name):
    """``locks.force_release`` itself (the admin's and the command's path)."""
    lease = slots.hold(name, "a")
    with pytest.raises(ValueError, match="Nothing released: 1 of the 2 selected references"):
        locks_module.force_release([held_slot(lease.token).ref, "[]"], actor="test")
    assert lease.token in held_tokens()


def test_releasing_several_slots_logs_each(admin_user, slots, name):
    leases = [slots.hold(name, f"k{number}") for number in range(3)]
    refs = [held_slot(lease.token).ref for lease in leases]
    client = client_for(admin_user)

    response = client.post(LOCKS_URL, {"slot": [*refs, refs[0]], "confirm": "yes"}, follow=True)

    assert messages_of(response) == ["Released 3 of 3 selected locks"]
    assert not {lease.token for lease in leases} & held_tokens()
    entries = LogEntry.objects.order_by("id")
    assert [entry.object_id for entry in entries] == [lease.token for lease in leases]
    assert [entry.object_repr for entry in entries] == [f"{name}[k{number}]" for number in range(3)]
    assert {entry.user for entry in entries} == {admin_user}
    assert all(entry.action_flag == DELETION for entry in entries)


def test_a_store_failure_part_way_logs_what_was_released(admin_client, slots, name, monkeypatch):
    """The store fails on the second of three releases: the first is released and logged,
    the operator is told which failed, and the third is not tried."""
    leases = [slots.hold(name, f"k{number}") for number in range(3)]
    refs = [held_slot(lease.token).ref for lease in leases]
    backend = get_backend()
    real_release = backend.release
    calls: list[str] = []

    def failing_release(group: SlotGroup, token: str, slot: str = "") -> bool:
        calls.append(token)
        if len(calls) == 2:
            raise ConnectionError("store went away")
        return real_release(group, token, slot)

    monkeypatch.setattr(backend, "release", failing_release)
    response = admin_client.post(LOCKS_URL, {"slot": refs, "confirm": "yes"}, follow=True)
    monkeypatch.undo()

    assert calls == [leases[0].token, leases[1].token]
    [message] = messages_of(response)
    assert message == (
        f"Released 1 of 3 selected locks, then releasing {name}[k1] failed "
        "(ConnectionError: store went away); the other 1 was not tried."
    )
    assert leases[0].token not in held_tokens()
    assert {leases[1].token, leases[2].token} <= held_tokens()
    [entry] = LogEntry.objects.all()
    assert entry.object_id == leases[0].token
    assert entry.object_repr == f"{name}[k0]"


@pytest.mark.services
def test_release_wakes_a_waiter_blocked_on_the_group(admin_client, slots, name, monkeypatch):
    """A waiter blocked in another thread (Redis: BLPOP on the group's wake list) is woken
    by the force release and takes the slot at once, not at its next poll."""
    backend = get_backend()
    if not isinstance(backend, RedisThrottleBackend):
        pytest.skip("the Redis backend wakes waiters; the generic one polls")
    holder = slots.hold(name, "k")
    waits: list[tuple[float, float]] = []  # (timeout, seconds it blocked)
    waiting = threading.Event()
    wait_for_release = backend.wait_for_release

    def recording_wait(group: SlotGroup, *args: Any) -> Any:  # (..., timeout)
        if group.task_name != name:
            return wait_for_release(group, *args)
        waiting.set()
        started = time.monotonic()
        outcome = wait_for_release(group, *args)
        waits.append((args[-1], time.monotonic() - started))
        return outcome

    monkeypatch.setattr(backend, "wait_for_release", recording_wait)
    taken: list[Lease] = []
    waiter = threading.Thread(
        target=lambda: taken.append(throttle(key="k", name=name, wait=30, ttl=TTL).acquire()), daemon=True
    )
    waiter.start()
    try:
        assert waiting.wait(10), "the waiter never blocked"
        admin_client.post(LOCKS_URL, {"slot": held_slot(holder.token).ref, "confirm": "yes"})
        waiter.join(10)
        assert taken, "the waiter did not get the slot"
    finally:
        slots.leases.extend(taken)
    assert {slot.token for slot in backend.held_slots() if slot.group.task_name == name} == {taken[0].token}
    timeout, blocked = waits[-1]
    assert blocked < timeout / 2, f"the last wait ran {blocked:.3f}s of {timeout}s: polled, not woken"


# --- Throttle locks: waiters -----------------------------------------------------------------


def waiter_rows(response: Any) -> list[dict[str, str]]:
    """The rows of the waiters table: column label -> cell text, plus ``data-*`` values."""
    tables = page(response).find_all("table", id_="tw-waiters")
    if not tables:
        return []
    labels = [th.text for th in tables[0].find("thead").find_all("th")]
    rows = []
    for tr in tables[0].find("tbody").find_all("tr", cls="tw-waiter"):
        row = dict(zip(labels, [td.text for td in tr.find_all("td")], strict=True))
        row.update({name: value for name, value in tr.attrs.items() if name.startswith("data-")})
        rows.append(row)
    return rows


@pytest.fixture
def blocked_callers(slots, name) -> Iterator[SimpleNamespace]:
    """A slot of ``name[k]`` held, and two callers blocked in ``throttle(...).acquire()`` for
    it in threads of their own, the first in line first; at teardown they get the slot in
    turn and give it back."""
    backend = get_backend()
    if isinstance(backend, DatabaseCacheThrottleBackend) and connection.vendor == "sqlite":
        # SQLite has one writer: the slot is taken in the test's open transaction, which
        # another thread's connection waits for (tests/test_throttle_backends.py covers it).
        pytest.skip("callers blocked in other threads need a lock store outside the test's transaction")
    holder = slots.hold(name, "k")
    taken: list[Lease] = []
    threads = []

    def in_line() -> list[Any]:
        return [call for call in backend.waiting_calls() if call.group.task_name == name]

    try:
        for count in (1, 2):
            thread = threading.Thread(
                target=lambda: taken.append(throttle(key="k", name=name, wait=60, ttl=TTL).acquire()),
                daemon=True,
            )
            thread.start()
            threads.append(thread)
            wait_until(lambda count=count: len(in_line()) == count, 10, f"{count} caller(s) in line")
        yield SimpleNamespace(holder=holder, calls=in_line())
    finally:
        holder.release()
        let_blocked_callers_finish(threads, taken)


def test_the_locks_page_lists_callers_waiting_for_a_slot(admin_client, blocked_callers, name):
    """Two callers blocked on a held slot: the page lists them under "Waiting for a slot",
    with their group, their place in line (1, 2) in order of arrival, since when they wait
    (relative, the exact time as the title), and their host / pid."""
    first, second = blocked_callers.calls

    response = locks(admin_client)

    rows = [row for row in waiter_rows(response) if row["data-task"] == name]
    assert [row["Place in line"] for row in rows] == ["1", "2"]
    assert [row["data-token"] for row in rows] == [first.token, second.token]
    for row in rows:
        assert row["Task name"] == name
        assert row["Key"] == "k"
        assert row["Worker host / pid"] == f"{socket.gethostname()} / {os.getpid()}"
        assert row["Task id"] == "—"
        assert re.fullmatch(r"\d+\.\ds ago", row["Waiting since"]), row
    since = page(response).find_all("tr", cls="tw-waiter", data_token=first.token)[0].find("time")
    assert since.attrs["title"] == utc(first.since)
    assert "2 callers wait for a slot" in page(response).find(id_="tw-waiters-summary").text


def test_throttle_locks_command_prints_the_waiting_callers(blocked_callers, name):
    """``manage.py throttle_locks`` reads the same waiters as the page: after the held
    slots, a table of the callers in line; ``--waiters --json`` lists only them."""
    first, second = blocked_callers.calls
    out = io.StringIO()
    call_command("throttle_locks", "--task", name, stdout=out)
    text = out.getvalue()
    assert "Waiting for a slot:" in text
    assert "2 callers waiting in 1 group" in text
    lines = [line for line in text.splitlines() if line.startswith(name)]
    assert len(lines) == 3  # the held slot, then the two waiters
    assert [line.split()[2] for line in lines[1:]] == ["1", "2"]

    out = io.StringIO()
    call_command("throttle_locks", "--task", name, "--waiters", "--json", stdout=out)
    listed = json.loads(out.getvalue())
    assert [(w["place"], w["token"]) for w in listed] == [(1, first.token), (2, second.token)]
    assert all((w["task_name"], w["key"], w["pid"]) == (name, "k", os.getpid()) for w in listed)
    assert all(w["since"] and w["waited_for"] >= 0 for w in listed)


# --- Permissions -----------------------------------------------------------------------------


@dataclass
class Pages:
    """A held slot, an instance with a history, and the three pages that show them."""

    slot_token: str
    slot_ref: str
    instance: Instance
    secret: dict[str, str]  # page -> text only a permitted user may see there
    urls: dict[str, str]


@pytest.fixture
def pages(slots, name) -> Pages:
    lease = slots.hold(name, "secret-key")
    instance = Instance.objects.create(name=f"vm-{name}", backend_id="i-perm", state=States.ONLINE)
    apply_transition(Instance, instance.uuid, "begin_stopping")
    return Pages(
        slot_token=lease.token,
        slot_ref=held_slot(lease.token).ref,
        instance=instance,
        secret={"locks": name, "history": str(instance.uuid), "instance": instance.name},
        urls={
            "locks": LOCKS_URL,
            "history": HISTORY_URL,
            "instance": reverse("admin:example_instance_change", args=[instance.pk]),
        },
    )


PAGES = ["locks", "history", "instance"]

#: The permissions that let a staff user see each page.
PAGE_PERMS = {
    "locks": {"task_workflow.view_throttlelock"},
    "history": {"task_workflow.view_transitionrecord"},
    "instance": {"example.view_instance", "example.change_instance"},
}
ALL_PERMS = (
    "task_workflow.view_throttlelock",
    "task_workflow.release_throttlelock",
    "task_workflow.view_transitionrecord",
    "example.view_instance",
    "example.change_instance",
)


def post_data(pages: Pages, which: str) -> dict[str, str]:
    """The state-changing POST of each page: release the slot / press a transition."""
    if which == "locks":
        return {"slot": pages.slot_ref, "confirm": "yes"}
    if which == "instance":
        return {"name": pages.instance.name, "backend_id": "i-perm", "_fsm_transition_to": "set_offline"}
    return {"action": "delete_selected", "_selected_action": "1"}


def assert_untouched(pages: Pages) -> None:
    assert pages.slot_token in held_tokens()
    assert Instance.objects.get(pk=pages.instance.pk).state == States.STOPPING
    assert TransitionRecord.objects.count() == 1
    assert not LogEntry.objects.exists()


@pytest.mark.parametrize("method", ["get", "post"])
@pytest.mark.parametrize("which", PAGES)
def test_anonymous_is_sent_to_the_login(client, pages, which, method):
    url = pages.urls[which]
    response = getattr(client, method)(url, post_data(pages, which) if method == "post" else None)
    assert response.status_code == 302
    assert response["Location"] == f"{LOGIN_URL}?next={url}"
    assert pages.secret[which] not in response.content.decode()
    assert_untouched(pages)


@pytest.mark.parametrize("method", ["get", "post"])
@pytest.mark.parametrize("which", PAGES)
def test_active_non_staff_user_is_sent_to_the_login(make_user, pages, which, method):
    """Even holding every permission: the admin is for staff."""
    client = client_for(make_user("member", staff=False, perms=ALL_PERMS))
    url = pages.urls[which]
    response = getattr(client, method)(url, post_data(pages, which) if method == "post" else None)
    assert response.status_code == 302
    assert response["Location"] == f"{LOGIN_URL}?next={url}"
    assert pages.secret[which] not in response.content.decode()
    assert_untouched(pages)


@pytest.mark.parametrize("method", ["get", "post"])
@pytest.mark.parametrize("which", PAGES)
def test_staff_without_the_view_permission_gets_403(make_user, pages, which, method):
    """Staff with every other permission of the admin, but not this page's view one."""
    others = tuple(perm for perm in ALL_PERMS if perm not in PAGE_PERMS[which])
    client = client_for(make_user("staffer", perms=others))
    url = pages.urls[which]
    response = getattr(client, method)(url, post_data(pages, which) if method == "post" else None)
    assert response.status_code == 403
    assert pages.secret[which] not in response.content.decode()
    assert_untouched(pages)


def test_staff_who_may_only_view_locks_cannot_release(make_user, pages):
    client = client_for(make_user("viewer", perms=("task_workflow.view_throttlelock",)))
    response = client.get(LOCKS_URL, {"task": pages.secret["locks"]})
    assert response.status_code == 200
    [row] = lock_rows(response)
    assert row["Key"] == "secret-key"
    assert row["checkbox"] is None
    html = page(response)
    assert html.find_all("input", id_="tw-select-all") == []
    assert html.find_all("button", id_="tw-release") == []
    assert client.post(LOCKS_URL, {"slot": pages.slot_ref}).status_code == 403  # the confirmation
    assert client.post(LOCKS_URL, {"slot": pages.slot_ref, "confirm": "yes"}).status_code == 403
    assert_untouched(pages)


def test_staff_who_may_release_locks_can(make_user, pages):
    user = make_user(
        "operator", perms=("task_workflow.view_throttlelock", "task_workflow.release_throttlelock")
    )
    client = client_for(user)
    [row] = lock_rows(client.get(LOCKS_URL, {"task": pages.secret["locks"]}))
    assert row["checkbox"] == pages.slot_ref
    assert client.post(LOCKS_URL, {"slot": pages.slot_ref}).status_code == 200  # the confirmation
    response = client.post(LOCKS_URL, {"slot": pages.slot_ref, "confirm": "yes"})
    assert response.status_code == 302
    assert pages.slot_token not in held_tokens()
    assert LogEntry.objects.get().user == user


def test_release_permission_alone_shows_nothing(make_user, pages):
    client = client_for(make_user("releaser", perms=("task_workflow.release_throttlelock",)))
    assert client.get(LOCKS_URL).status_code == 403
    assert client.post(LOCKS_URL, {"slot": pages.slot_ref, "confirm": "yes"}).status_code == 403
    assert_untouched(pages)


def test_staff_who_may_view_history_sees_it_read_only(make_user, pages):
    client = client_for(
        make_user("auditor", perms=("task_workflow.view_transitionrecord", "example.view_instance"))
    )
    response = client.get(HISTORY_URL)
    assert response.status_code == 200
    assert str(pages.instance.uuid) in response.content.decode()
    html = page(response)
    assert html.find_all("a", cls="addlink") == []
    assert html.find_all("select", name="action") == []  # no bulk delete
    record = TransitionRecord.objects.get()
    detail = client.get(reverse("admin:task_workflow_transitionrecord_change", args=[record.pk]))
    assert detail.status_code == 200
    assert page(detail).find_all("input", name="_save") == []
    assert (
        client.post(
            reverse("admin:task_workflow_transitionrecord_delete", args=[record.pk]), {"post": "yes"}
        ).status_code
        == 403
    )
    assert TransitionRecord.objects.count() == 1


def test_staff_who_may_view_instances_cannot_change_them(make_user, pages):
    user = make_user("watcher", perms=("example.view_instance", "task_workflow.view_transitionrecord"))
    client = client_for(user)
    url = pages.urls["instance"]
    response = client.get(url)
    assert response.status_code == 200
    assert pages.instance.name in response.content.decode()
    assert page(response).find_all("input", name="name") == []  # read-only
    assert client.post(url, post_data(pages, "instance")).status_code == 403
    assert_untouched(pages)


def test_view_only_users_see_no_transition_buttons(make_user, pages):
    client = client_for(make_user("watcher", perms=("example.view_instance",)))
    response = client.get(pages.urls["instance"])
    assert response.status_code == 200
    assert page(response).find_all("button", name="_fsm_transition_to") == []


def test_staff_who_may_change_instances_can_apply_transitions(make_user, pages):
    user = make_user("engineer", perms=("example.view_instance", "example.change_instance"))
    client = client_for(user)
    url = pages.urls["instance"]
    data = form_data(page(client.get(url)).find("form", id_="instance_form"))
    response = client.post(url, {**data, "_fsm_transition_to": "set_offline"})
    assert response.status_code == 302
    assert Instance.objects.get(pk=pages.instance.pk).state == States.OFFLINE
    assert TransitionRecord.objects.first().user == user


class ConfirmSetOffline(forms.Form):
    """A transition form without fields: the form view only asks to confirm."""


@pytest.fixture
def transition_form(monkeypatch) -> None:
    """The example's admin asks for a form before ``set_offline`` (django-fsm-2's
    ``fsm_forms``), so its per-transition view (``<pk>/transition/set_offline/``) serves one."""
    monkeypatch.setattr(
        django_admin.site.get_model_admin(Instance), "fsm_forms", {"set_offline": ConfirmSetOffline}
    )


def transition_url(instance: Instance, transition_name: str = "set_offline") -> str:
    return reverse("admin:example_instance_transition", args=[instance.pk, transition_name])


@pytest.mark.parametrize(
    "perms",
    [(), ("example.view_instance",), ("example.view_instance", "task_workflow.view_transitionrecord")],
    ids=["no-permission", "view-only", "view-and-history"],
)
@pytest.mark.parametrize("method", ["get", "post"])
def test_the_transition_form_view_needs_change_permission(make_user, pages, transition_form, perms, method):
    """set_offline has no ``permission=`` of its own: django-fsm-2's view checked only that,
    so any staff user could open the form and apply it."""
    client = client_for(make_user("watcher", perms=perms))
    url = transition_url(pages.instance)

    response = getattr(client, method)(url)

    assert_untouched(pages)
    assert response.status_code == 403
    assert pages.instance.name not in response.content.decode()


def test_staff_who_may_change_instances_use_the_transition_form(make_user, pages, transition_form):
    user = make_user("engineer", perms=("example.view_instance", "example.change_instance"))
    client = client_for(user, enforce_csrf_checks=True)
    url = change_url(pages.instance)
    data = form_data(page(client.get(url)).find("form", id_="instance_form"))

    # The button of a transition with a form leads to its form view...
    pressed = client.post(url, {**data, "_fsm_transition_to": "set_offline"})
    assert pressed.status_code == 302
    assert pressed["Location"] == transition_url(pages.instance)
    assert Instance.objects.get(pk=pages.instance.pk).state == States.STOPPING
    shown = client.get(pressed["Location"])
    assert shown.status_code == 200
    [form] = [f for f in page(shown).find_all("form") if f.find_all("input", value="Apply")]

    # ...which applies it.
    applied = client.post(pressed["Location"], form_data(form))

    assert applied.status_code == 302
    assert applied["Location"] == url
    assert Instance.objects.get(pk=pages.instance.pk).state == States.OFFLINE
    assert [(r.transition, r.user) for r in history(pages.instance)][-1] == ("set_offline", user)


@pytest.mark.parametrize("method", ["get", "post"])
def test_the_transition_form_view_of_a_transition_hidden_from_the_admin_is_403(
    admin_client, pages, transition_form, monkeypatch, method
):
    """``is_fsm_transition_visible`` (django-fsm's ``custom={"admin": False}``) hides the
    button; the form view refuses it too."""
    instance_admin = django_admin.site.get_model_admin(Instance)
    monkeypatch.setattr(instance_admin, "is_fsm_transition_visible", lambda t: False)
    response = getattr(admin_client, method)(transition_url(pages.instance))
    assert_untouched(pages)
    assert response.status_code == 403


@pytest.mark.parametrize("transition_name", ["no_such_transition", "save", "state"])
def test_the_transition_form_view_of_something_that_is_no_transition_is_404(
    admin_client, pages, transition_form, transition_name
):
    response = admin_client.get(transition_url(pages.instance, transition_name))
    assert response.status_code == 404
    assert_untouched(pages)


# --- Transition history ----------------------------------------------------------------------


def history(instance: Instance) -> list[TransitionRecord]:
    """Oldest first."""
    return list(TransitionRecord.objects.for_entity(instance).order_by("created_at", "id"))


@pytest.fixture
def no_backend_delay(settings):
    settings.EXAMPLE_BACKEND_DELAY = 0


def test_a_celery_task_records_its_name_and_id(admin_client):
    instance = Instance.objects.create(name="vm", backend_id="i-1", state=States.STOPPING)

    result = example_tasks.stop_instance_succeeded.apply(args=(str(instance.uuid),))

    assert result.successful(), result.traceback
    [record] = history(instance)
    assert (record.transition, record.source_state, record.target_state) == (
        "set_offline",
        States.STOPPING,
        States.OFFLINE,
    )
    assert record.task_name == "example.stop_instance_succeeded"
    assert record.task_id == result.id
    assert record.user is None
    assert record.error_message == ""
    assert record.entity_uuid == instance.uuid
    assert record.entity == instance
    # ...and the history list shows it.
    response = admin_client.get(HISTORY_URL, {"q": result.id})
    [row] = page(response).find("table", id_="result_list").find("tbody").find_all("tr")
    cells = {
        cls.removeprefix("field-"): cell.text
        for cell in row.find_all("td") + row.find_all("th")
        for cls in cell.classes
        if cls.startswith("field-")
    }
    assert cells["task_name"] == "example.stop_instance_succeeded"
    assert cells["task_id"] == result.id
    assert cells["transition"] == "set_offline"
    assert cells["entity_link"] == "vm"  # the entity's __str__
    entity = row.find("td", cls="field-entity_link").find("a")
    assert entity.attrs["title"] == f"instance {instance.uuid}"
    assert entity.attrs["href"] == reverse("admin:example_instance_change", args=[instance.pk])


def test_the_errback_records_the_failed_task_and_the_error(no_backend_delay):
    instance = Instance.objects.create(name="vm", backend_id="fail-9", state=States.STOPPING)

    result = example_tasks.backend_shutdown.apply(
        args=("fail-9",), link_error=error_transition(Instance, instance.uuid)
    )

    assert result.failed()
    [record] = history(instance)
    assert (record.transition, record.source_state, record.target_state) == (
        "set_erred",
        States.STOPPING,
        States.ERRED,
    )
    # The failed task, not the errback task.
    assert record.task_name == "example.backend_shutdown"
    assert record.task_id == result.id
    assert record.error_message == "BackendError: backend refused to stop fail-9: quota exceeded"
    assert Instance.objects.get(pk=instance.pk).error_message == record.error_message


def test_the_record_is_written_in_the_transaction_of_the_state_change():
    """Rolled back together: neither the state change nor its record survive."""
    instance = Instance.objects.create(name="vm", backend_id="i-1", state=States.ONLINE)

    class Abort(Exception):
        pass

    seen_inside = []

    def stop_then_roll_back() -> None:
        with transaction.atomic():
            apply_transition(Instance, instance.uuid, "begin_stopping")
            seen_inside.append(
                (Instance.objects.get(pk=instance.pk).state, [r.transition for r in history(instance)])
            )
            raise Abort

    with pytest.raises(Abort):
        stop_then_roll_back()

    # Both were there inside the transaction...
    assert seen_inside == [(States.STOPPING, ["begin_stopping"])]
    # ...and both are gone with it.
    assert Instance.objects.get(pk=instance.pk).state == States.ONLINE
    assert history(instance) == []


@pytest.fixture
def recorded() -> SimpleNamespace:
    """Records of two models, transitions, target states and days."""
    instance = Instance.objects.create(name="vm", backend_id="i-1", state=States.ONLINE)
    volume = Volume.objects.create(state=Volume.States.CREATION_SCHEDULED)
    apply_transition(Instance, instance.uuid, "begin_stopping")
    apply_transition(Instance, instance.uuid, "set_offline")
    apply_transition(Volume, volume.uuid, "begin_creating")
    old = TransitionRecord.objects.for_entity(volume).get()
    TransitionRecord.objects.filter(pk=old.pk).update(created_at=datetime(2020, 1, 15, 12, 0, tzinfo=UTC))
    records = {r.transition: r.pk for r in TransitionRecord.objects.all()}
    return SimpleNamespace(instance=instance, volume=volume, pks=records)


def listed(client: Client, **params: str) -> set[str]:
    """Transitions of the history list's rows."""
    response = client.get(HISTORY_URL, params)
    assert response.status_code == 200  # not a redirect to ?e=1 (a refused filter)
    return {record.transition for record in response.context["cl"].result_list}


def test_history_list_filters(admin_client, recorded):
    instance_type = ContentType.objects.get_for_model(Instance)
    volume_type = ContentType.objects.get_for_model(Volume)
    assert listed(admin_client) == {"begin_stopping", "set_offline", "begin_creating"}
    assert listed(admin_client, content_type__id__exact=str(instance_type.pk)) == {
        "begin_stopping",
        "set_offline",
    }
    assert listed(admin_client, content_type__id__exact=str(volume_type.pk)) == {"begin_creating"}
    assert listed(admin_client, transition__exact="set_offline") == {"set_offline"}
    assert listed(admin_client, target_state__exact="stopping") == {"begin_stopping"}
    assert listed(
        admin_client, created_at__gte="2020-01-01 00:00:00+00:00", created_at__lt="2020-02-01 00:00:00+00:00"
    ) == {"begin_creating"}
    assert listed(admin_client, created_at__year="2020") == {"begin_creating"}  # date hierarchy
    assert listed(admin_client, q=str(recorded.volume.uuid)) == {"begin_creating"}
    # The sidebar offers the values that occur.
    filters = page(admin_client.get(HISTORY_URL)).find(id_="changelist-filter").text
    for value in ("begin_stopping", "set_offline", "begin_creating", "offline", "creating"):
        assert value in filters


def test_history_content_type_filter_offers_only_models_with_history(admin_client, recorded):
    response = admin_client.get(HISTORY_URL)
    [spec] = [s for s in response.context["cl"].filter_specs if s.field_path == "content_type"]
    offered = {label for _, label in spec.lookup_choices}
    assert offered == {
        str(ContentType.objects.get_for_model(Instance)),
        str(ContentType.objects.get_for_model(Volume)),
    }, offered


HISTORY_VIEWERS = {
    # user's model permission -> the transitions of the records the user sees
    "none": ((), set()),
    "view-instance": (("example.view_instance",), {"begin_stopping", "set_offline"}),
    "change-instance": (("example.change_instance",), {"begin_stopping", "set_offline"}),
    "view-volume": (("testapp.view_volume",), {"begin_creating"}),
    "both": (
        ("example.view_instance", "testapp.change_volume"),
        {"begin_stopping", "set_offline", "begin_creating"},
    ),
}


@pytest.mark.parametrize(("perms", "expected"), list(HISTORY_VIEWERS.values()), ids=list(HISTORY_VIEWERS))
def test_history_lists_only_records_of_models_the_user_may_view(make_user, recorded, perms, expected):
    """The history holds every model's error texts: a user sees the records of the models
    it may view (or change), everywhere the list shows them."""
    volume_type = ContentType.objects.get_for_model(Volume)
    TransitionRecord.objects.filter(pk=recorded.pks["begin_creating"]).update(
        error_message="QuotaError: tenant-secret-42 is over quota"
    )
    client = client_for(make_user("auditor", perms=("task_workflow.view_transitionrecord", *perms)))

    assert listed(client) == expected
    html = client.get(HISTORY_URL).content.decode()
    assert ("tenant-secret-42" in html) == ("begin_creating" in expected)
    # Search, the content type filter and the sidebar keep to the same rows.
    assert listed(client, q=str(recorded.volume.uuid)) == expected & {"begin_creating"}
    response = client.get(HISTORY_URL)
    specs = [s for s in response.context["cl"].filter_specs if s.field_path == "content_type"]
    offered = {label for spec in specs for _, label in spec.lookup_choices}  # none for < 2 choices
    assert (str(volume_type) in offered) == ("begin_creating" in expected and len(expected) == 3)
    # The record's own page.
    detail = client.get(
        reverse("admin:task_workflow_transitionrecord_change", args=[recorded.pks["begin_creating"]])
    )
    if "begin_creating" in expected:
        assert detail.status_code == 200
        assert "tenant-secret-42" in detail.content.decode()
    else:
        assert detail.status_code == 302  # "... doesn't exist. Perhaps it was deleted?"
        assert detail["Location"] == reverse("admin:index")


def test_superusers_see_every_record(admin_client, recorded):
    assert listed(admin_client) == {"begin_stopping", "set_offline", "begin_creating"}


def entity_cells(response: Any) -> list[Element]:
    """The "Entity" cells of the history list, top to bottom."""
    return page(response).find_all("td", cls="field-entity_link")


def test_history_shows_each_entitys_own_name_linked_to_its_change_page(admin_client, recorded):
    """The entity column shows the entity's ``__str__`` ("vm", not "instance <uuid>"),
    linked to its change page where its model has an admin page; an entity deleted since
    shows its model's name and its uuid, unlinked."""
    gone = Instance.objects.create(name="vm-gone", backend_id="i-9", state=States.ONLINE)
    apply_transition(Instance, gone.uuid, "begin_stopping")
    gone_uuid = gone.uuid
    gone.delete()  # its history stays (no constraint), as after a cleanup

    cells = {cell.text: cell for cell in entity_cells(admin_client.get(HISTORY_URL))}

    assert set(cells) == {"vm", f"volume {recorded.volume.uuid}", f"instance {gone_uuid} (deleted)"}
    [link] = cells["vm"].find_all("a")
    assert link.attrs["href"] == reverse("admin:example_instance_change", args=[recorded.instance.pk])
    assert cells[f"volume {recorded.volume.uuid}"].find_all("a") == []  # Volume has no admin page
    assert cells[f"instance {gone_uuid} (deleted)"].find_all("a") == []


def test_history_reads_the_entities_with_one_query_per_model(admin_client, django_assert_max_num_queries):
    """A page of 100 records of 100 entities of two models costs the same handful of
    queries as a page of 4: one query per model for the entities, none per row."""
    instances = Instance.objects.bulk_create(
        Instance(name=f"vm-{i:03d}", backend_id=f"i-{i}", state=States.ONLINE) for i in range(60)
    )
    volumes = Volume.objects.bulk_create(Volume(state=Volume.States.CREATION_SCHEDULED) for _ in range(40))
    instance_type = ContentType.objects.get_for_model(Instance)
    volume_type = ContentType.objects.get_for_model(Volume)
    TransitionRecord.objects.bulk_create(
        [
            *(
                TransitionRecord(
                    content_type=instance_type,
                    object_id=str(entity.pk),
                    entity_uuid=entity.uuid,
                    transition="begin_stopping",
                    source_state="online",
                    target_state="stopping",
                )
                for entity in instances
            ),
            *(
                TransitionRecord(
                    content_type=volume_type,
                    object_id=str(entity.pk),
                    entity_uuid=entity.uuid,
                    transition="begin_creating",
                    source_state="creation_scheduled",
                    target_state="creating",
                )
                for entity in volumes
            ),
        ]
    )
    admin_client.get(HISTORY_URL)  # warm the session and the content type cache

    # Session, user, count, the page, the filter sidebar's queries, and one per model.
    with django_assert_max_num_queries(12) as queries:
        response = admin_client.get(HISTORY_URL)
    texts = {cell.text for cell in entity_cells(response)}
    assert texts == {f"vm-{i:03d}" for i in range(60)} | {f"volume {v.uuid}" for v in volumes}
    entity_queries = [q["sql"] for q in queries.captured_queries if '"example_instance"' in q["sql"]]
    assert len(entity_queries) == 1, entity_queries


def test_the_history_inline_shows_the_entity_only_to_those_who_may_see_it(make_user, pages):
    """The inline is on the entity's own page (view permission on the entity needed) and
    lists that entity's records only; without the history permission it is not there."""
    url = pages.urls["instance"]
    other = Instance.objects.create(name="vm-other", state=States.ONLINE)
    apply_transition(Instance, other.uuid, "begin_stopping")
    auditor = client_for(
        make_user("auditor", perms=("example.view_instance", "task_workflow.view_transitionrecord"))
    )
    rows = inline_history(auditor.get(url))
    assert [row["transition"] for row in rows] == ["begin_stopping"]
    viewer = client_for(make_user("viewer", perms=("example.view_instance",)))
    assert inline_history(viewer.get(url)) == []
    stranger = client_for(make_user("stranger", perms=("task_workflow.view_transitionrecord",)))
    assert stranger.get(url).status_code == 403


# --- The change page of a StateMixin model ---------------------------------------------------


def change_url(instance: Instance) -> str:
    return reverse("admin:example_instance_change", args=[instance.pk])


def transition_buttons(response: Any) -> set[str]:
    return {b.attrs["value"] for b in page(response).find_all("button", name="_fsm_transition_to")}


def inline_history(response: Any) -> list[dict[str, str]]:
    """Rows of the history inline: field name -> text."""
    rows = []
    for tr in page(response).find_all("tr", cls="form-row"):
        cells = {
            cls.removeprefix("field-"): td.text
            for td in tr.find_all("td")
            for cls in td.classes
            if cls.startswith("field-")
        }
        if "transition" in cells:
            rows.append(cells)
    return rows


def test_change_page_shows_state_history_and_the_allowed_transitions(admin_client):
    instance = Instance.objects.create(name="vm-7", backend_id="i-7", state=States.STOPPING)
    result = example_tasks.stop_instance_succeeded.apply(args=(str(instance.uuid),))
    assert result.successful()

    response = admin_client.get(change_url(instance))

    assert response.status_code == 200
    badge = page(response).find("span", cls="tw-state")
    assert badge.attrs["data-state"] == "offline"
    assert badge.text == "offline"
    [row] = inline_history(response)
    assert row["transition"] == "set_offline"
    assert row["source_state"] == "stopping"
    assert row["target_state"] == "offline"
    assert row["task_name"] == "example.stop_instance_succeeded"
    assert row["task_id"] == result.id
    # Only what django-fsm allows from "offline".
    expected = {t.name for t in Instance.objects.get(pk=instance.pk).get_available_state_transitions()}
    assert expected == {"begin_starting", "set_erred"}
    assert transition_buttons(response) == expected


def test_change_page_of_an_erred_instance_shows_the_error(no_backend_delay, admin_client):
    instance = Instance.objects.create(name="vm-8", backend_id="fail-8", state=States.STOPPING)
    example_tasks.backend_shutdown.apply(
        args=("fail-8",), link_error=error_transition(Instance, instance.uuid)
    )

    response = admin_client.get(change_url(instance))

    html = page(response)
    assert html.find("span", cls="tw-state").attrs["data-state"] == "erred"
    error = html.find("div", cls="field-error_message").find("div", cls="readonly").text
    assert error == "BackendError: backend refused to stop fail-8: quota exceeded"
    [row] = inline_history(response)
    assert row["task_name"] == "example.backend_shutdown"
    assert row["error_message"] == error
    assert transition_buttons(response) == {"schedule_updating", "schedule_deleting", "set_erred", "recover"}


def test_instance_list_shows_state_badges(admin_client):
    Instance.objects.create(name="vm-a", state=States.ONLINE)
    Instance.objects.create(name="vm-b", state=States.STOPPING)
    response = admin_client.get(reverse("admin:example_instance_changelist"), {"state__exact": "stopping"})
    badges = page(response).find_all("span", cls="tw-state")
    assert [badge.attrs["data-state"] for badge in badges] == ["stopping"]


def badge_colour(html: str) -> str:
    return re.search(r"background:(#[0-9a-f]{6})", html).group(1)


@pytest.mark.parametrize(
    ("state", "colour"),
    [
        (States.OK, STATE_COLOURS[States.OK]),
        (States.ERRED, STATE_COLOURS[States.ERRED]),
        (States.CREATING, TRANSITIONAL_COLOUR),  # StateMixin's transitional state
        (States.STOPPING, TRANSITIONAL_COLOUR),  # the example's transitional state
        (States.ONLINE, "#2e7d32"),  # from the example admin's state_colours
        (States.OFFLINE, "#616161"),
    ],
)
def test_badge_colours_come_from_the_package_and_the_model_admins_state_colours(state, colour):
    instance = Instance(name="vm-colour", state=state)
    model_admin = django_admin.site.get_model_admin(Instance)
    assert badge_colour(model_admin.state_badge(instance)) == colour


def test_the_package_has_no_colours_of_the_example_states():
    """Without the example admin's state_colours, its own final states are neutral."""
    assert set(STATE_COLOURS) == {StateMixin.States.OK, StateMixin.States.ERRED}
    plain_admin = StateMixinAdmin(Instance, django_admin.site)
    assert badge_colour(plain_admin.state_badge(Instance(state=States.ONLINE))) == NEUTRAL_COLOUR
    assert badge_colour(plain_admin.state_badge(Instance(state=States.OK))) == STATE_COLOURS[States.OK]


def test_state_colours_win_over_the_package_colours():
    class RecolouredAdmin(StateMixinAdmin):
        state_colours = {States.ERRED: "#000000", States.STOPPING: "#111111"}

    recoloured = RecolouredAdmin(Instance, django_admin.site)
    assert badge_colour(recoloured.state_badge(Instance(state=States.ERRED))) == "#000000"
    assert badge_colour(recoloured.state_badge(Instance(state=States.STOPPING))) == "#111111"
    assert badge_colour(state_badge(Instance(state=States.ERRED), {States.OK: "#222222"})) == "#c62828"


def press(client: Client, instance: Instance, transition_name: str) -> Any:
    """Press a transition button: the change form as fetched, plus the button's value."""
    url = change_url(instance)
    form = page(client.get(url)).find("form", id_="instance_form")
    data = form_data(form)
    assert "task_workflow-transitionrecord-content_type-object_id-TOTAL_FORMS" in data  # the inline's
    return client.post(url, {**data, "_fsm_transition_to": transition_name})


def test_transition_button_applies_it_through_apply_transition(admin_client, admin_user, monkeypatch):
    instance = Instance.objects.create(name="vm-9", backend_id="i-9", state=States.ONLINE)
    calls = []
    import task_workflow.admin as admin_module

    real = admin_module.apply_transition
    monkeypatch.setattr(admin_module, "apply_transition", lambda *a, **kw: calls.append(a) or real(*a, **kw))

    response = press(admin_client, instance, "begin_stopping")

    assert response.status_code == 302
    assert response["Location"] == change_url(instance)
    assert calls == [(Instance, instance.uuid, "begin_stopping")]
    assert Instance.objects.get(pk=instance.pk).state == States.STOPPING
    [record] = history(instance)
    assert record.transition == "begin_stopping"
    assert record.user == admin_user
    assert (record.task_name, record.task_id) == ("", "")
    followed = admin_client.get(response["Location"])
    assert "Transition 'begin_stopping' applied." in messages_of(followed)
    assert inline_history(followed)[0]["user"] == admin_user.get_username()
    assert transition_buttons(followed) == {"set_offline", "set_erred"}


def test_a_stale_transition_button_changes_nothing(admin_client):
    """The page was loaded while online; a worker moved the instance meanwhile."""
    instance = Instance.objects.create(name="vm-10", backend_id="i-10", state=States.ONLINE)
    url = change_url(instance)
    data = form_data(page(admin_client.get(url)).find("form", id_="instance_form"))
    apply_transition(Instance, instance.uuid, "begin_stopping")
    apply_transition(Instance, instance.uuid, "set_offline")

    response = admin_client.post(url, {**data, "_fsm_transition_to": "begin_stopping"}, follow=True)

    assert any("not allowed" in message for message in messages_of(response)), messages_of(response)
    assert Instance.objects.get(pk=instance.pk).state == States.OFFLINE
    assert [r.transition for r in history(instance)] == ["begin_stopping", "set_offline"]


def test_saving_the_change_form_does_not_overwrite_a_concurrent_transition(admin_client):
    instance = Instance.objects.create(name="vm-11", backend_id="i-11", state=States.STOPPING)
    url = change_url(instance)
    data = form_data(page(admin_client.get(url)).find("form", id_="instance_form"))
    fired = []

    def worker_commits_first(sender, instance: Instance, **kwargs: Any) -> None:
        # A worker's transition commits between the admin's read and its save.
        if not fired and instance.name == "vm-11 renamed":
            fired.append(True)
            apply_transition(Instance, instance.uuid, "set_offline")

    pre_save.connect(worker_commits_first, sender=Instance, dispatch_uid="tests.admin.race")
    try:
        response = admin_client.post(url, {**data, "name": "vm-11 renamed", "_save": "Save"})
    finally:
        pre_save.disconnect(dispatch_uid="tests.admin.race", sender=Instance)

    assert response.status_code == 302
    assert fired
    stored = Instance.objects.get(pk=instance.pk)
    assert stored.name == "vm-11 renamed"
    assert stored.state == history(instance)[-1].target_state == States.OFFLINE
