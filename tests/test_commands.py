"""``manage.py throttle_locks``, ``manage.py stuck_entities`` and django-fsm's
``graph_transitions`` on a StateMixin model.

The throttle tests run on two lock caches: the configured one (Redis in the main run,
Django's DatabaseCache with ``TEST_DATABASE=sqlite``) and a DatabaseCache alias added
for the test, so the Redis and the generic backend are both covered in the main run.
Slots are held in-process with ``throttle(name=...).acquire()``.
"""

from __future__ import annotations

import builtins
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test.utils import isolate_apps
from django.utils import timezone

from example_project.models import Instance
from task_workflow.management import format_duration, parse_duration
from task_workflow.management.commands import stuck_entities
from task_workflow.models import StateMixin, TransitionRecord
from task_workflow.tasks import TransitionNotPermitted, throttle
from task_workflow.throttle import (
    CacheThrottleBackend,
    DatabaseCacheThrottleBackend,
    HeldSlot,
    Lease,
    RedisThrottleBackend,
    get_backend,
)
from tests.testapp.models import Volume

#: Long enough that the lease renewer never runs during a test (it renews at ttl / 3);
#: on a DatabaseCache created inside the test's transaction its own connection could not
#: see the table.
TTL = 900.0


def run(*args: str) -> str:
    """``call_command`` with captured stdout."""
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def run_json(*args: str) -> object:
    return json.loads(run(*args, "--json"))


# --- Fixtures --------------------------------------------------------------------------------


@pytest.fixture(params=["configured", "database_cache"])
def lock_cache(request, settings, db, committed_cache_tables):
    """The lock cache alias: the configured one, or a DatabaseCache alias added for the test
    (its table committed once: the throttle backend works on connections of its own)."""
    if request.param == "database_cache":
        settings.CACHES = {
            **settings.CACHES,
            "tw_cmd_locks": {
                "BACKEND": "django.core.cache.backends.db.DatabaseCache",
                "LOCATION": "tw_cmd_test_locks",
            },
        }
        settings.TASK_WORKFLOW = {**settings.TASK_WORKFLOW, "CACHE": "tw_cmd_locks"}
    # pytest-django does not create cache tables (the SQLite run's default cache is one).
    call_command("createcachetable")
    return settings.TASK_WORKFLOW["CACHE"]


@pytest.fixture
def names():
    """Slot group names unique to the test: other slots in the shared Redis are not ours."""
    prefix = f"tests.cmd.{uuid.uuid4().hex[:8]}"
    return type("Names", (), {"a": f"{prefix}.a", "b": f"{prefix}.b", "c": f"{prefix}.c"})


@pytest.fixture
def hold(lock_cache):
    """``hold(name, key=None, concurrency=1)`` takes a slot in-process; all released at the end."""
    leases: list[Lease] = []

    def take(name: str, key: str | None = None, concurrency: int = 1) -> Lease:
        lease = throttle(key=key, concurrency=concurrency, name=name, wait=0, ttl=TTL).acquire()
        leases.append(lease)
        return lease

    yield take
    for lease in leases:
        lease.release()


def mine(rows: list[dict], *prefixes: str) -> list[dict]:
    return [row for row in rows if row["task_name"].startswith(prefixes)]


def held_tokens() -> set[str]:
    return {slot.token for slot in get_backend().held_slots()}


def expire(lease: Lease) -> None:
    """Put the lease's deadline in the past while its record stays in the store (a holder
    that stopped renewing, seen before the store drops it)."""
    backend = lease.backend
    if isinstance(backend, RedisThrottleBackend):
        holders = backend._keys(lease.group)[0]
        backend.client.zadd(holders, {lease.token: 1000}, xx=True)
    elif isinstance(backend, DatabaseCacheThrottleBackend):

        def lapse(record, now):
            record.holders[lease.token]["deadline"] = now - 5
            return None, True

        backend._change(lease.group, lapse)
    else:
        assert isinstance(backend, CacheThrottleBackend)
        key = backend._slot_key(lease.group, lease.slot)
        value = backend.cache.get(key)
        backend.cache.set(key, {**value, "deadline": time.time() - 5}, timeout=TTL)


# --- throttle_locks: listing -------------------------------------------------------------------


def test_table_lists_held_slots_with_every_column(hold, names):
    a1 = hold(names.a, key="vm-1", concurrency=3)
    hold(names.a, key="vm-1", concurrency=3)
    hold(names.b)

    out = run("throttle_locks")

    header = out.splitlines()[0]
    for column in (
        "TASK NAME",
        "KEY",
        "SLOT",
        "IN USE",
        "HOLDER TASK ID",
        "HOST",
        "PID",
        "ACQUIRED AT",
        "HELD FOR",
        "EXPIRES IN",
        "LEASE",
    ):
        assert column in header
    lines_a = [line for line in out.splitlines() if line.startswith(names.a)]
    lines_b = [line for line in out.splitlines() if line.startswith(names.b)]
    assert len(lines_a) == 2
    assert len(lines_b) == 1
    for line in lines_a:
        assert "vm-1" in line
        assert "2 of 3" in line
        assert socket.gethostname() in line
        assert str(os.getpid()) in line
        assert line.rstrip().endswith("live")
        assert "EXPIRED" not in line
    assert "1 of 1" in lines_b[0]
    slot_column = next(r["slot"] for r in run_json("throttle_locks") if r["token"] == a1.token)
    assert any(f"  {slot_column}  " in line for line in lines_a)
    assert "held slots in" in out  # the summary (other tests' slots may share the store)


def test_table_says_when_nothing_matches(hold, names):
    hold(names.a)
    assert run("throttle_locks", "--task", names.b).strip() == "No held throttle slots match."


def test_json_lists_objects_with_machine_readable_fields(hold, names):
    lease = hold(names.a, key="k", concurrency=2)

    rows = mine(run_json("throttle_locks"), names.a)

    assert len(rows) == 1
    row = rows[0]
    assert set(row) >= {
        "task_name",
        "key",
        "slot",
        "in_use",
        "concurrency",
        "usage",
        "task_id",
        "hostname",
        "pid",
        "acquired_at",
        "held_for",
        "lease_deadline",
        "expires_in",
        "expired",
        "token",
        "fencing_token",
        "ref",
    }
    assert (row["task_name"], row["key"], row["token"]) == (names.a, "k", lease.token)
    assert row["fencing_token"] == lease.fencing_token
    assert (row["in_use"], row["concurrency"], row["usage"]) == (1, 2, "1 of 2")
    assert row["task_id"] is None  # held outside a task
    assert isinstance(row["pid"], int)
    acquired = datetime.fromisoformat(row["acquired_at"])
    assert acquired.tzinfo is not None
    assert abs((timezone.now() - acquired).total_seconds()) < 60
    assert isinstance(row["held_for"], float)
    assert 0 <= row["held_for"] < 60
    assert TTL - 60 < row["expires_in"] <= TTL
    assert datetime.fromisoformat(row["lease_deadline"]) > acquired
    assert row["expired"] is False
    group, token, slot = HeldSlot.parse_ref(row["ref"])
    assert (group.task_name, group.key, token, slot) == (names.a, "k", lease.token, row["slot"])


def test_filters_by_task_and_key(hold, names):
    hold(names.a, key="1", concurrency=2)
    hold(names.a, key="1", concurrency=2)
    hold(names.a, key="2")
    hold(names.b, key="1")

    by_task = run_json("throttle_locks", "--task", names.a)
    by_key = run_json("throttle_locks", "--task", names.a, "--key", "1")
    key_only = mine(run_json("throttle_locks", "--key", "1"), names.a, names.b)

    assert {(r["task_name"], r["key"]) for r in by_task} == {(names.a, "1"), (names.a, "2")}
    assert len(by_task) == 3
    assert [(r["task_name"], r["key"]) for r in by_key] == [(names.a, "1")] * 2
    assert sorted((r["task_name"], r["key"]) for r in key_only) == [
        (names.a, "1"),
        (names.a, "1"),
        (names.b, "1"),
    ]


def test_expired_filter_and_flag(hold, names):
    hold(names.a, concurrency=2)
    stale = hold(names.a, concurrency=2)
    expire(stale)

    rows = mine(run_json("throttle_locks", "--expired"), names.a)
    table = run("throttle_locks", "--task", names.a)

    assert [r["token"] for r in rows] == [stale.token]
    assert rows[0]["expired"] is True
    assert rows[0]["expires_in"] < 0
    flagged = [line for line in table.splitlines() if line.startswith(names.a) and "EXPIRED" in line]
    assert len(flagged) == 1
    assert "1 past their deadline" in table


def test_ref_filter_lists_one_slot(hold, names):
    hold(names.a, concurrency=2)
    lease = hold(names.a, concurrency=2)
    ref = next(r["ref"] for r in run_json("throttle_locks", "--task", names.a) if r["token"] == lease.token)

    assert [r["token"] for r in run_json("throttle_locks", "--ref", ref)] == [lease.token]


def test_unknown_cache_alias_is_refused(lock_cache):
    with pytest.raises(CommandError, match="no cache 'nope'"):
        run("throttle_locks", "--cache", "nope")


def test_cache_option_picks_the_lock_cache(hold, names, settings):
    hold(names.a)
    lock_alias = settings.TASK_WORKFLOW["CACHE"]
    settings.CACHES = {
        **settings.CACHES,
        "tw_cmd_other": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "tw-cmd"},
    }
    other = throttle(name=names.b, wait=0, ttl=TTL, cache="tw_cmd_other").acquire()
    try:
        in_other = run_json("throttle_locks", "--cache", "tw_cmd_other")
        in_lock_cache = mine(run_json("throttle_locks", "--cache", lock_alias), names.a, names.b)
        default = mine(run_json("throttle_locks"), names.a, names.b)
    finally:
        other.release()

    assert [r["task_name"] for r in in_other] == [names.b]
    assert [r["task_name"] for r in in_lock_cache] == [names.a]
    assert [r["token"] for r in default] == [r["token"] for r in in_lock_cache]


# --- throttle_locks: release -------------------------------------------------------------------


def test_release_by_task_and_key(hold, names, caplog):
    gone = [hold(names.a, key="1", concurrency=2), hold(names.a, key="1", concurrency=2)]
    kept = [hold(names.a, key="2"), hold(names.b, key="1")]

    with caplog.at_level(logging.WARNING, logger="task_workflow.locks"):
        out = run("throttle_locks", "--release", "--task", names.a, "--key", "1", "--yes")

    assert "Released 2 of 2 selected slots." in out
    tokens = held_tokens()
    assert not {lease.token for lease in gone} & tokens
    assert {lease.token for lease in kept} <= tokens
    # The holders' own later releases find nothing and are harmless.
    assert [lease.release() for lease in gone] == [False, False]
    assert [lease.release() for lease in kept] == [True, True]
    forced = [r for r in caplog.records if "force-released by manage.py throttle_locks (" in r.getMessage()]
    assert len(forced) == 2
    assert all("@" in r.getMessage() and "released" in r.getMessage() for r in forced)


def test_release_by_task_releases_every_key_of_it(hold, names):
    a = [hold(names.a, key="1"), hold(names.a, key="2"), hold(names.a)]
    b = hold(names.b)

    out = run("throttle_locks", "--release", "--task", names.a, "--noinput")

    assert "Released 3 of 3" in out
    assert held_tokens() & {lease.token for lease in [*a, b]} == {b.token}


def test_release_expired_of_a_task(hold, names):
    live = hold(names.a, concurrency=2)
    stale = hold(names.a, concurrency=2)
    expire(stale)

    out = run("throttle_locks", "--release", "--task", names.a, "--expired", "--yes")

    # An expired lease is free already (anyone may take its slot): removed, not "released".
    assert "Released 0 of 1 selected slot (1 already free)" in out
    tokens = held_tokens()
    assert live.token in tokens
    assert stale.token not in tokens


def test_release_by_ref_releases_one_slot(hold, names):
    other = hold(names.a, concurrency=2)
    target = hold(names.a, concurrency=2)
    ref = next(r["ref"] for r in run_json("throttle_locks", "--task", names.a) if r["token"] == target.token)

    out = run("throttle_locks", "--release", "--ref", ref, "--yes")

    assert "Released 1 of 1 selected slot." in out
    tokens = held_tokens()
    assert target.token not in tokens
    assert other.token in tokens
    assert target.release() is False
    assert other.release() is True
    # Releasing the same ref again: it is already free.
    again = run("throttle_locks", "--release", "--ref", ref, "--yes")
    assert "Released 0 of 1" in again
    assert "already free" in again


def test_release_json_reports_what_was_released(hold, names):
    lease = hold(names.a)

    summary = run_json("throttle_locks", "--release", "--task", names.a, "--yes")

    assert summary == {
        "selected": 1,
        "released": 1,
        "slots": [{"task_name": names.a, "key": None, "token": lease.token, "released": True}],
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--release"], "--release needs a selection"),
        (["--release", "--expired"], "--release needs a selection"),
        (["--release", "--key", "1"], "--key needs --task"),
        (["--release", "--ref", '["t",null,"tok",""]', "--task", "t"], "either --ref or --task"),
        (["--ref", "not-a-ref"], "not a throttle slot reference"),
        (["--release", "--ref", '["t", 5, "tok", ""]'], "not a throttle slot reference"),
    ],
)
def test_bad_selections_are_refused(hold, names, args, message):
    lease = hold(names.a)

    with pytest.raises(CommandError, match=message):
        run("throttle_locks", *args, "--yes")

    assert lease.token in held_tokens()


def test_confirmation_declined_releases_nothing(hold, names, monkeypatch):
    lease = hold(names.a)
    prompts: list[str] = []

    def answer(prompt: str = "") -> str:
        prompts.append(prompt)
        return "no"

    monkeypatch.setattr(builtins, "input", answer)
    out = run("throttle_locks", "--release", "--task", names.a)

    assert len(prompts) == 1
    assert "Force-release 1 throttle slot?" in prompts[0]
    assert "nothing released" in out
    assert names.a in out  # what would have been released was shown first
    assert lease.token in held_tokens()


def test_confirmation_accepted_releases(hold, names, monkeypatch):
    lease = hold(names.a)
    monkeypatch.setattr(builtins, "input", lambda prompt="": "yes")

    out = run("throttle_locks", "--release", "--task", names.a)

    assert "Released 1 of 1" in out
    assert lease.token not in held_tokens()


def test_confirmation_without_a_terminal_releases_nothing(hold, names, monkeypatch):
    lease = hold(names.a)

    def no_terminal(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr(builtins, "input", no_terminal)
    out = run("throttle_locks", "--release", "--task", names.a)

    assert "nothing released" in out
    assert lease.token in held_tokens()


def test_release_with_nothing_selected(hold, names):
    hold(names.a)
    out = run("throttle_locks", "--release", "--task", names.b, "--yes")
    assert "nothing released" in out


def test_release_wakes_a_waiter(hold, names, lock_cache):
    """A force release hands the slot to a waiting caller (Redis: woken at once)."""
    if not isinstance(get_backend(), RedisThrottleBackend):
        pytest.skip("the waiter thread needs a lock store outside the test's transaction")
    holder = hold(names.a)
    acquired = threading.Event()
    waited: list[float] = []

    def wait_for_slot() -> None:
        start = time.monotonic()
        lease = throttle(name=names.a, wait=10, ttl=TTL).acquire()
        waited.append(time.monotonic() - start)
        acquired.set()
        lease.release()

    waiter = threading.Thread(target=wait_for_slot, daemon=True)
    waiter.start()
    time.sleep(0.2)
    assert not acquired.is_set()
    released_at = time.monotonic()
    run("throttle_locks", "--release", "--task", names.a, "--yes")
    assert acquired.wait(5)
    waiter.join(5)
    assert time.monotonic() - released_at < 2
    assert holder.release() is False


# --- stuck_entities ------------------------------------------------------------------------


def make(model, state: str, age: timedelta, **fields):
    entity = model.objects.create(state=state, **fields)
    model.objects.filter(pk=entity.pk).update(state_changed_at=timezone.now() - age)
    return model.objects.get(pk=entity.pk)


@pytest.fixture
def entities(db):
    vs, ins = Volume.States, Instance.States
    return {
        "creating_old": make(Volume, vs.CREATING, timedelta(hours=2, minutes=3)),
        "attaching_old": make(Volume, vs.ATTACHING, timedelta(days=2)),
        "updating_recent": make(Volume, vs.UPDATING, timedelta(minutes=10)),
        "ok_old": make(Volume, vs.OK, timedelta(days=3)),
        "erred_old": make(Volume, vs.ERRED, timedelta(days=3)),
        "stopping_old": make(Instance, ins.STOPPING, timedelta(hours=5), name="vm-stopping"),
        "online_old": make(Instance, ins.ONLINE, timedelta(days=1), name="vm-online"),
        "deleting_old": make(Instance, ins.DELETING, timedelta(hours=1, minutes=1), name="vm-deleting"),
    }


def uuids(rows) -> set[str]:
    return {row["uuid"] for row in rows}


def test_lists_entities_stuck_in_transitional_states(entities):
    out = run("stuck_entities")
    rows = run_json("stuck_entities")

    expected = {"creating_old", "attaching_old", "stopping_old", "deleting_old"}
    assert uuids(rows) == {str(entities[name].uuid) for name in expected}
    by_uuid = {row["uuid"]: row for row in rows}
    stopping = by_uuid[str(entities["stopping_old"].uuid)]
    assert stopping["model"] == "example.Instance"
    assert stopping["pk"] == entities["stopping_old"].pk
    assert stopping["state"] == "stopping"
    assert 5 * 3600 - 60 < stopping["stuck_for"] < 5 * 3600 + 60
    assert datetime.fromisoformat(stopping["state_changed_at"]) == entities["stopping_old"].state_changed_at
    assert stopping["result"] == "listed"
    assert by_uuid[str(entities["attaching_old"].uuid)]["model"] == "testapp.Volume"

    header = out.splitlines()[0]
    for column in ("MODEL", "PK", "UUID", "STATE", "STUCK FOR", "SINCE"):
        assert column in header
    line = next(line for line in out.splitlines() if str(entities["creating_old"].uuid) in line)
    assert "testapp.Volume" in line
    assert "creating" in line
    assert "2h03m" in line
    for name in ("updating_recent", "ok_old", "erred_old", "online_old"):
        assert str(entities[name].uuid) not in out
    assert "4 entities in a transitional state for longer than 1h00m" in out


def test_nothing_stuck(db):
    make(Volume, Volume.States.CREATING, timedelta(minutes=5))
    assert "No entities in a transitional state for longer than 1h00m." in run("stuck_entities")
    assert run_json("stuck_entities") == []


@pytest.mark.parametrize(
    ("older_than", "expected"),
    [
        ("300", {"updating_recent", "creating_old", "attaching_old", "stopping_old", "deleting_old"}),
        ("5m", {"updating_recent", "creating_old", "attaching_old", "stopping_old", "deleting_old"}),
        ("2h", {"creating_old", "attaching_old", "stopping_old"}),
        ("1h30m", {"creating_old", "attaching_old", "stopping_old"}),
        ("1d", {"attaching_old"}),
        ("3d", set()),
    ],
)
def test_older_than(entities, older_than, expected):
    rows = run_json("stuck_entities", "--older-than", older_than)
    assert uuids(rows) == {str(entities[name].uuid) for name in expected}


@pytest.mark.parametrize("bad", ["", "abc", "-5", "5x", "1h30", "h", "2 hours"])
def test_bad_older_than_is_refused(db, bad):
    with pytest.raises(CommandError, match="--older-than"):
        run("stuck_entities", "--older-than", bad)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("1.5h", 5400)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


def test_format_duration():
    assert format_duration(42) == "42.0s"
    assert format_duration(725) == "12m05s"
    assert format_duration(2 * 3600 + 185) == "2h03m05s"
    assert format_duration(2 * 3600 + 185, with_seconds=False) == "2h03m"
    assert format_duration(2 * 86400 + 3600 * 4 + 60 * 5) == "2d04h05m"
    assert format_duration(-3) == "-3.0s"
    assert format_duration(None) == "-"


def test_model_filter(entities):
    volumes = run_json("stuck_entities", "--model", "testapp.Volume")
    instances = run_json("stuck_entities", "--model", "example.Instance")
    both = run_json("stuck_entities", "--model", "example.Instance", "--model", "testapp.volume")

    assert {row["model"] for row in volumes} == {"testapp.Volume"}
    assert uuids(volumes) == {str(entities[n].uuid) for n in ("creating_old", "attaching_old")}
    assert uuids(instances) == {str(entities[n].uuid) for n in ("stopping_old", "deleting_old")}
    assert uuids(both) == uuids(volumes) | uuids(instances)


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("testapp.Nope", "testapp.Nope"),
        ("nope", "app_label.ModelName"),
        ("testapp.BodyRun", "is not a StateMixin model"),
    ],
)
def test_bad_model_is_refused(db, label, message):
    with pytest.raises(CommandError, match=message):
        run("stuck_entities", "--model", label)


def test_state_models_finds_every_concrete_subclass():
    assert {Volume, Instance} <= set(stuck_entities.state_models())
    assert all(issubclass(model, StateMixin) for model in stuck_entities.state_models())


def test_set_erred_moves_stuck_entities_to_erred(entities):
    out = run("stuck_entities", "--set-erred")

    stuck = ("creating_old", "attaching_old", "stopping_old", "deleting_old")
    for name in stuck:
        before = entities[name]
        entity = type(before).objects.get(pk=before.pk)
        assert entity.state == "erred", name
        assert entity.error_message.startswith(f"stuck in {before.state!r} for "), entity.error_message
        assert f"(since {before.state_changed_at.isoformat()})" in entity.error_message
        assert entity.error_message.endswith("moved to erred by manage.py stuck_entities")
        assert entity.state_changed_at > before.state_changed_at
        record = TransitionRecord.objects.for_entity(entity).get()
        assert (record.transition, record.source_state, record.target_state) == (
            "set_erred",
            before.state,
            "erred",
        )
        assert record.task_name == "manage.py stuck_entities"
        assert record.error_message == entity.error_message
    creating = Volume.objects.get(pk=entities["creating_old"].pk)
    assert creating.error_message.startswith("stuck in 'creating' for 2h03m (since ")
    for name in ("updating_recent", "ok_old", "erred_old", "online_old"):
        before = entities[name]
        after = type(before).objects.get(pk=before.pk)
        assert (after.state, after.state_changed_at) == (before.state, before.state_changed_at)
    assert TransitionRecord.objects.count() == len(stuck)
    assert "moved to erred" in out
    assert "moved 4 to erred, 0 skipped, 0 failed" in out
    # Nothing is stuck any more.
    assert run_json("stuck_entities") == []


def test_set_erred_json_reports_results(entities):
    rows = run_json("stuck_entities", "--set-erred", "--model", "example.Instance")

    assert {row["result"] for row in rows} == {"set_erred"}
    by_uuid = {row["uuid"]: row for row in rows}
    stopping = Instance.objects.get(pk=entities["stopping_old"].pk)
    assert by_uuid[str(stopping.uuid)]["detail"] == stopping.error_message
    assert Volume.objects.get(pk=entities["creating_old"].pk).state == "creating"


def test_dry_run_changes_nothing(entities):
    out = run("stuck_entities", "--set-erred", "--dry-run")
    rows = run_json("stuck_entities", "--set-erred", "--dry-run")

    for name, before in entities.items():
        after = type(before).objects.get(pk=before.pk)
        assert (after.state, after.state_changed_at, after.error_message) == (
            before.state,
            before.state_changed_at,
            before.error_message,
        ), name
    assert TransitionRecord.objects.count() == 0
    assert "would move to erred" in out
    assert "would move 4 to erred" in out
    assert "dry run: nothing changed" in out
    assert "stuck in 'creating' for 2h03m (since " in out
    assert {row["result"] for row in rows} == {"would_set_erred"}


def test_dry_run_alone_is_refused(db):
    with pytest.raises(CommandError, match="--dry-run only applies to --set-erred"):
        run("stuck_entities", "--dry-run")


def test_set_erred_skips_an_entity_that_moved_on_since_the_listing(entities, monkeypatch):
    """The listing is a snapshot: an entity a worker moved on meanwhile is left alone."""
    real_find = stuck_entities.find_stuck
    moved = entities["creating_old"]

    def find_then_worker_moves_on(*args, **kwargs):
        found = real_find(*args, **kwargs)
        Volume.objects.filter(pk=moved.pk).update(state=Volume.States.OK, state_changed_at=timezone.now())
        return found

    monkeypatch.setattr(stuck_entities, "find_stuck", find_then_worker_moves_on)
    out = run("stuck_entities", "--set-erred", "--model", "testapp.Volume")

    assert Volume.objects.get(pk=moved.pk).state == "ok"
    assert Volume.objects.get(pk=entities["attaching_old"].pk).state == "erred"
    assert not TransitionRecord.objects.for_entity(moved).exists()
    line = next(line for line in out.splitlines() if str(moved.uuid) in line)
    assert "skipped: moved on to 'ok' since it was listed" in line
    assert "moved 1 to erred, 1 skipped, 0 failed" in out


def test_set_erred_failure_is_reported_and_fails_the_command(entities, monkeypatch):
    def refuse(model, entity_uuid, transition_name, **kwargs):
        raise TransitionNotPermitted(f"{model._meta.label} {entity_uuid}: not allowed")

    monkeypatch.setattr(stuck_entities, "apply_transition", refuse)
    out = StringIO()
    with pytest.raises(CommandError, match="could not be moved to erred"):
        call_command("stuck_entities", "--set-erred", "--model", "example.Instance", stdout=out)

    assert "FAILED: TransitionNotPermitted" in out.getvalue()
    assert Instance.objects.get(pk=entities["stopping_old"].pk).state == "stopping"


def create_table(model) -> None:
    """Create ``model``'s table inside the test's transaction (rolled back with it).

    The schema editor is not entered: on SQLite entering it inside a transaction is
    refused, so its CREATE TABLE is collected and run by hand (no transactional test
    needed, hence no flush of every table afterwards).
    """
    editor = connection.schema_editor(collect_sql=True)
    editor.deferred_sql = []  # what entering the editor would set up
    editor.create_model(model)
    with connection.cursor() as cursor:
        for statement in [*editor.collected_sql, *map(str, editor.deferred_sql)]:
            cursor.execute(statement)


@pytest.mark.django_db
def test_set_erred_skips_models_without_uuid(monkeypatch):
    """A StateMixin model without UuidMixin is listed, but not moved (apply_transition
    addresses rows by uuid)."""
    with isolate_apps("tests.testapp"):

        class PlainJob(StateMixin):
            class Meta:
                app_label = "testapp"

    create_table(PlainJob)
    job = PlainJob.objects.create(state=StateMixin.States.CREATING)
    PlainJob.objects.filter(pk=job.pk).update(state_changed_at=timezone.now() - timedelta(hours=3))
    monkeypatch.setattr(stuck_entities, "state_models", lambda: [PlainJob])
    out, err = StringIO(), StringIO()

    call_command("stuck_entities", "--set-erred", stdout=out, stderr=err)

    assert PlainJob.objects.get(pk=job.pk).state == "creating"
    assert "testapp.PlainJob" in out.getvalue()
    assert "skipped: model has no uuid field" in out.getvalue()
    assert "Warning: testapp.PlainJob" in err.getvalue()
    listed = run_json("stuck_entities")
    assert [(row["pk"], row["uuid"], row["state"]) for row in listed] == [(job.pk, None, "creating")]


# --- graph_transitions (django-fsm-2) ---------------------------------------------------------


def test_graph_transitions_draws_a_state_mixin_model():
    pytest.importorskip("graphviz", reason="django-fsm-2's graph_transitions imports graphviz")
    out = run("graph_transitions", "example.Instance")

    assert out.lstrip().startswith("digraph")
    assert "cluster_example_Instance_state" in out
    for state in Instance.States.values():
        assert f"example.instance.state.{state}" in out, state
    for name in ("begin_stopping", "set_offline", "set_erred", "recover", "begin_creating"):
        assert f"label={name}" in out, name


def test_json_output_has_one_object_per_line(hold, names):
    hold(names.a)
    hold(names.b)
    lines = run("throttle_locks", "--json").splitlines()

    assert lines[0] == "["
    assert lines[-1] == "]"
    assert sum(1 for line in lines if f'"task_name": "{names.a}"' in line) == 1
    assert all(json.loads(line.rstrip(",")) for line in lines[1:-1])
    assert run("throttle_locks", "--json", "--task", names.c).strip() == "[]"
