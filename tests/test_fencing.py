"""Fenced writes (``task_workflow.fencing``): a row accepts a write iff the lease's fencing
token is newer than the one it holds, or the same token from the same owner.

The invariant, checked after every write (by the stateful test against the real database,
and by the concurrent writers on PostgreSQL):

- the row holds the largest fencing token among accepted writes, with its owner;
- no accepted write carries a token older than one accepted before it;
- no token is accepted from two owners.

Runs on PostgreSQL in the main run and on SQLite in the ``TEST_DATABASE=sqlite`` run,
except the tests marked ``postgres`` (other processes racing on one row) or ``services``
(a real throttle on Redis).
"""

from __future__ import annotations

import ast
import itertools
import re
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from django.db import connections, transaction
from django.db.models import F
from django.test import override_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

import task_workflow.throttle as throttle_module
from task_workflow.exceptions import TaskWorkflowError
from task_workflow.fencing import FencedWriteRefused, fence_condition
from task_workflow.tasks import throttle
from task_workflow.throttle import Lease, RedisThrottleBackend, SlotGroup, get_backend
from task_workflow.throttle.lease import lease_renewer
from tests.testapp.models import DocsBackend, FencedResource
from tests.throttle_model import settings_for

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL_PAGE = ROOT / "docs" / "design" / "throttle-protocol.md"


def make_lease(fencing_token: int, owner: str | None = None, **fields: Any) -> Lease:
    """A lease as the throttle hands it out (its store is never called here)."""
    return Lease(
        backend=None,  # type: ignore[arg-type]
        group=SlotGroup("tests.fencing"),
        token=uuid.uuid4().hex if owner is None else owner,
        slot="0",
        ttl=60.0,
        fencing_token=fencing_token,
        **fields,
    )


@pytest.fixture
def resource(db: None) -> FencedResource:
    return FencedResource.objects.create(name=f"r-{uuid.uuid4().hex[:8]}")


# --- The documented example -------------------------------------------------------------


def documented_fencing_example() -> str:
    """The first ``python`` block of the protocol page's "Fencing tokens" section."""
    text = PROTOCOL_PAGE.read_text(encoding="utf-8")
    section = text.split("\n## Fencing tokens\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "the Fencing tokens section shows no python example"
    return match.group(1)


class StaleHolder(Exception):
    """The example's own refusal."""


@pytest.mark.django_db
def test_documented_example_refuses_a_second_owner_of_the_same_token() -> None:
    """Two holders granted one fencing token (a failover that lost the grant): the first
    writes, the second must be refused. The example as first documented (``fence__lte``)
    accepted both. The example's ``Backend`` model is the test's ``DocsBackend`` (a model
    class cannot be declared outside an app): its declaration is left out."""
    row = DocsBackend.objects.create()
    example = ast.parse(documented_fencing_example(), str(PROTOCOL_PAGE))
    example.body = [
        node for node in example.body if not (isinstance(node, ast.ClassDef) and node.name == "Backend")
    ]
    code = compile(example, str(PROTOCOL_PAGE), "exec")

    def write(lease: Lease, spec: dict[str, str]) -> None:
        class HeldThrottle:
            def __init__(self, **kwargs: Any) -> None:
                pass

            def __enter__(self) -> Lease:
                return lease

            def __exit__(self, *exc_info: object) -> None:
                pass

        exec(
            code,
            {
                "throttle": HeldThrottle,
                "volume": SimpleNamespace(backend_id=row.pk),
                "Backend": DocsBackend,
                "new_spec": spec,
                "StaleHolder": StaleHolder,
            },
        )

    first, second = make_lease(1_800_000_000_000_000), make_lease(1_800_000_000_000_000)
    write(first, {"by": "first"})
    with pytest.raises((StaleHolder, TaskWorkflowError)):
        write(second, {"by": "second"})
    row.refresh_from_db()
    assert row.spec == {"by": "first"}


# --- The rule, call by call ---------------------------------------------------------------

TOKEN = 1_800_000_000_000_000  # about what the clock-based tokens are today


def stored(row: FencedResource) -> tuple[int, str]:
    row.refresh_from_db()
    return row.fencing_token, row.fencing_owner


@pytest.mark.django_db
def test_a_newer_token_writes_the_values_and_the_fence(resource: FencedResource) -> None:
    lease = make_lease(TOKEN)
    written = FencedResource.objects.filter(pk=resource.pk).fenced_update(lease, payload="a")
    assert written == 1
    assert stored(resource) == (TOKEN, lease.token)
    assert resource.payload == "a"


@pytest.mark.django_db
def test_the_same_holder_writes_again_with_its_token(resource: FencedResource) -> None:
    lease = make_lease(TOKEN)
    for n in range(1, 4):
        resource.fenced_update(lease, payload=f"write {n}", writes=F("writes") + 1)
        assert resource.writes == n  # an expression is read back
    # The same values again: a database that counts changed rows only would say 0.
    assert resource.try_fenced_update(lease, payload="write 3") == 1
    assert stored(resource) == (TOKEN, lease.token)


@pytest.mark.django_db
def test_an_older_token_is_refused_with_what_the_row_holds(resource: FencedResource) -> None:
    newer, older = make_lease(TOKEN + 1), make_lease(TOKEN)
    resource.fenced_update(newer, payload="newer")
    with pytest.raises(FencedWriteRefused) as refused:
        resource.fenced_update(older, payload="older")
    error = refused.value
    assert (error.reason, error.model, error.pk) == ("older token", "testapp.FencedResource", resource.pk)
    assert (error.fencing_token, error.owner) == (TOKEN, older.token)
    assert (error.stored_fencing_token, error.stored_owner) == (TOKEN + 1, newer.token)
    assert "newer fencing token" in str(error)
    assert resource.payload == "newer"  # the instance is left as it was
    assert stored(resource) == (TOKEN + 1, newer.token)
    assert resource.payload == "newer"


@pytest.mark.django_db
def test_the_same_token_from_another_owner_is_refused(resource: FencedResource) -> None:
    first, second = make_lease(TOKEN), make_lease(TOKEN)
    FencedResource.objects.filter(pk=resource.pk).fenced_update(first, payload="first")
    with pytest.raises(FencedWriteRefused) as refused:
        FencedResource.objects.filter(pk=resource.pk).fenced_update(second, payload="second")
    assert refused.value.reason == "same token, other owner"
    assert (refused.value.stored_fencing_token, refused.value.stored_owner) == (TOKEN, first.token)
    assert FencedResource.objects.filter(pk=resource.pk).try_fenced_update(second, payload="second") == 0
    assert stored(resource) == (TOKEN, first.token)
    assert resource.payload == "first"


@pytest.mark.django_db
def test_try_variants_return_the_count_instead_of_raising(resource: FencedResource) -> None:
    other = FencedResource.objects.create(name=f"other-{uuid.uuid4().hex[:8]}")
    both = FencedResource.objects.filter(pk__in=[resource.pk, other.pk])
    newer, older = make_lease(TOKEN + 1), make_lease(TOKEN)
    other.fenced_update(newer, payload="newer")
    # Each row is fenced on its own: the row that saw the newer token refuses.
    assert both.try_fenced_update(older, payload="older") == 1
    assert both.fenced_update(older, payload="older") == 1  # some row accepted: no exception
    assert both.try_fenced_update(newer, payload="newer") == 2
    assert both.try_fenced_update(older, payload="older") == 0
    with pytest.raises(FencedWriteRefused) as refused:
        both.fenced_update(older, payload="older")
    assert (refused.value.stored_fencing_token, refused.value.stored_owner) == (TOKEN + 1, newer.token)
    assert resource.try_fenced_update(older, payload="older") == 0
    assert resource.try_fenced_update(make_lease(TOKEN + 2), payload="newest") == 1
    assert resource.payload == "newest"
    assert FencedResource.objects.filter(pk=-1).fenced_update(newer, payload="x") == 0  # no row selected


@pytest.mark.django_db
def test_a_refusal_is_decided_in_one_update_statement(resource: FencedResource) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    newer, older = make_lease(TOKEN + 1), make_lease(TOKEN)
    with CaptureQueriesContext(connection) as accepted:
        assert FencedResource.objects.filter(pk=resource.pk).try_fenced_update(newer, payload="n") == 1
    with CaptureQueriesContext(connection) as refused:
        assert FencedResource.objects.filter(pk=resource.pk).try_fenced_update(older, payload="o") == 0
    for captured in (accepted, refused):
        statements = [query["sql"] for query in captured.captured_queries]
        assert len(statements) == 1, statements
        assert statements[0].upper().startswith("UPDATE")
        assert '"fencing_token" <' in statements[0]
        assert '"fencing_owner" =' in statements[0]


@pytest.mark.django_db
def test_a_lost_or_released_lease_sends_nothing(
    resource: FencedResource, django_assert_num_queries: Any
) -> None:
    lost = make_lease(TOKEN + 5, valid_until=0.0)  # its own view of the lease ran out
    released = make_lease(TOKEN + 5, released=True)
    for lease, reason in ((lost, "lease lost"), (released, "lease released")):
        with django_assert_num_queries(0):
            assert resource.try_fenced_update(lease, payload="late") == 0
            assert FencedResource.objects.filter(pk=resource.pk).try_fenced_update(lease, payload="late") == 0
            with pytest.raises(FencedWriteRefused) as refused:
                resource.fenced_update(lease, payload="late")
            assert refused.value.reason == reason
            assert refused.value.stored_fencing_token is None
            with pytest.raises(FencedWriteRefused):
                FencedResource.objects.filter(pk=resource.pk).fenced_update(lease, payload="late")
    assert stored(resource) == (0, "")


@pytest.mark.django_db
def test_bad_calls_are_refused_before_the_database(resource: FencedResource) -> None:
    lease = make_lease(TOKEN)
    with pytest.raises(TypeError, match="fencing_token"):
        resource.fenced_update(lease, fencing_token=TOKEN + 9)
    with pytest.raises(TypeError, match="fencing_owner"):
        FencedResource.objects.try_fenced_update(lease, fencing_owner="me")
    for token in (0, -1, True, "5", None):
        with pytest.raises(ValueError, match="fencing_token"):
            resource.fenced_update(make_lease(token), payload="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="owner"):
        fence_condition(make_lease(TOKEN, owner=""))
    assert stored(resource) == (0, "")


@pytest.mark.django_db
def test_a_deleted_row_is_does_not_exist(resource: FencedResource) -> None:
    FencedResource.objects.filter(pk=resource.pk).delete()
    with pytest.raises(FencedResource.DoesNotExist):
        resource.fenced_update(make_lease(TOKEN), payload="x")
    assert resource.try_fenced_update(make_lease(TOKEN), payload="x") == 0


@pytest.mark.django_db
def test_saving_an_instance_read_before_a_newer_write_keeps_the_newer_fence(resource: FencedResource) -> None:
    """``save()`` writes every field: an instance read before a newer holder wrote must not
    put its older token back, or a stale holder could write again."""
    older, newer = make_lease(TOKEN), make_lease(TOKEN + 1)
    resource.fenced_update(older, payload="older")
    read_before = FencedResource.objects.get(pk=resource.pk)
    FencedResource.objects.filter(pk=resource.pk).fenced_update(newer, payload="newer")
    read_before.writes = 7
    read_before.save()
    assert stored(resource) == (TOKEN + 1, newer.token)
    assert resource.writes == 7
    with pytest.raises(FencedWriteRefused):
        resource.fenced_update(older, payload="older again")
    # Named explicitly, the columns are saved (an operator resetting a fence).
    read_before.save(update_fields=["fencing_token", "fencing_owner"])
    assert stored(resource) == (TOKEN, older.token)


@pytest.mark.django_db
def test_the_refusal_is_rebuilt_from_its_message() -> None:
    """As every task_workflow error: a Celery client rebuilds it as ``cls(message)``."""
    error = FencedWriteRefused("refused", reason="older token", stored_fencing_token=5)
    rebuilt = FencedWriteRefused(str(error))
    assert isinstance(rebuilt, TaskWorkflowError)
    assert str(rebuilt) == "refused"


@pytest.mark.django_db
def test_fence_condition_fences_an_update_of_your_own(resource: FencedResource) -> None:
    newer, older = make_lease(TOKEN + 1), make_lease(TOKEN)
    mine = FencedResource.objects.filter(fence_condition(newer), pk=resource.pk)
    assert mine.update(fencing_token=newer.fencing_token, fencing_owner=newer.token, payload="mine") == 1
    assert not FencedResource.objects.filter(fence_condition(older), pk=resource.pk).exists()
    assert FencedResource.objects.filter(fence_condition(newer), pk=resource.pk).exists()


# --- The invariant, by random sequences of writes -----------------------------------------

#: Examples and steps of the stateful test: a few seconds on either database.
EXAMPLES = 60
STEPS = 30

OWNERS = [f"{n:032x}" for n in range(1, 5)]


class FencedWrites(RuleBasedStateMachine):
    """Leases with small tokens (so they repeat, go back, tie across owners) and a few
    owners (so one owner repeats its token) write to one fresh row, through every entry
    point; the database decides, and after every step the row and the record of accepted
    writes keep the invariant. A model of the rule predicts each outcome."""

    def __init__(self) -> None:
        super().__init__()
        self.row = FencedResource.objects.create(name=f"machine-{uuid.uuid4().hex}")
        #: (token, owner, payload) of every accepted write, in the order the row took them.
        self.accepted: list[tuple[int, str, str]] = []
        self.step = 0
        #: An instance read at some earlier step (saved later: must not move the fence).
        self.snapshot = FencedResource.objects.get(pk=self.row.pk)
        #: The other columns: the last accepted write's, or the snapshot's once it is saved.
        self.payload, self.writes = "", 0

    def expected_acceptance(self, token: int, owner: str) -> bool:
        if not self.accepted:
            return True
        stored_token, stored_owner, _ = self.accepted[-1]
        return token > stored_token or (token == stored_token and owner == stored_owner)

    @rule(
        token=st.integers(1, 12),
        owner=st.sampled_from(OWNERS),
        entry=st.sampled_from(["instance", "try instance", "queryset", "try queryset"]),
    )
    def write(self, token: int, owner: str, entry: str) -> None:
        self.step += 1
        payload = f"{token}:{owner[-1]}:{self.step}"
        lease = make_lease(TOKEN + token, owner)
        rows = FencedResource.objects.filter(pk=self.row.pk)
        refusal: FencedWriteRefused | None = None
        try:
            if entry == "instance":
                self.row.fenced_update(lease, payload=payload, writes=F("writes") + 1)
                written = 1
            elif entry == "try instance":
                written = self.row.try_fenced_update(lease, payload=payload, writes=F("writes") + 1)
            elif entry == "queryset":
                written = rows.fenced_update(lease, payload=payload, writes=F("writes") + 1)
            else:
                written = rows.try_fenced_update(lease, payload=payload, writes=F("writes") + 1)
        except FencedWriteRefused as error:
            refusal, written = error, 0
        assert written == int(self.expected_acceptance(token, owner)), (token, owner, self.accepted[-1:])
        if refusal is not None:
            newest_token, newest_owner, _ = self.accepted[-1]
            reason = "older token" if newest_token > token else "same token, other owner"
            assert (refusal.reason, refusal.stored_fencing_token, refusal.stored_owner) == (
                reason,
                TOKEN + newest_token,
                newest_owner,
            )
        if written:
            self.accepted.append((token, owner, payload))
            self.payload, self.writes = payload, self.writes + 1

    @rule(token=st.integers(1, 12), owner=st.sampled_from(OWNERS), lost=st.booleans())
    def write_after_the_lease_ended(self, token: int, owner: str, lost: bool) -> None:
        lease = make_lease(TOKEN + token, owner, **({"valid_until": 0.0} if lost else {"released": True}))
        assert self.row.try_fenced_update(lease, payload="late") == 0
        with pytest.raises(FencedWriteRefused):
            FencedResource.objects.filter(pk=self.row.pk).fenced_update(lease, payload="late")

    @rule()
    def save_an_instance_read_earlier(self) -> None:
        self.snapshot.save()
        self.payload, self.writes = self.snapshot.payload, self.snapshot.writes
        self.snapshot = FencedResource.objects.get(pk=self.row.pk)

    @invariant()
    def row_holds_the_newest_accepted_write(self) -> None:
        row = FencedResource.objects.get(pk=self.row.pk)
        assert (row.payload, row.writes) == (self.payload, self.writes)
        if not self.accepted:
            assert (row.fencing_token, row.fencing_owner) == (0, "")
            return
        newest = max(self.accepted, key=lambda write: write[0])
        assert (row.fencing_token, row.fencing_owner) == (TOKEN + newest[0], newest[1])

    @invariant()
    def accepted_tokens_never_go_back_nor_change_owner(self) -> None:
        for (token, owner, _), (later_token, later_owner, _) in itertools.pairwise(self.accepted):
            assert later_token >= token
            assert later_token > token or later_owner == owner
        owners_by_token: dict[int, set[str]] = {}
        for token, owner, _ in self.accepted:
            owners_by_token.setdefault(token, set()).add(owner)
        assert all(len(owners) == 1 for owners in owners_by_token.values())


@pytest.mark.django_db
def test_accepted_writes_keep_the_invariant() -> None:
    run_state_machine_as_test(FencedWrites, settings=settings_for(EXAMPLES, STEPS))


# --- Real concurrency: writers racing on one row (PostgreSQL) -----------------------------

WRITERS = 4
TOKENS = 120


@dataclass(frozen=True)
class LoggedWrite:
    token: int
    owner: str
    #: The row's ``writes`` right after this write, in its own transaction: the place of an
    #: accepted write in the order the row took them (0 when refused).
    place: int


def race_fenced_writes(pk: int, leases: list[Lease], start: threading.Barrier) -> list[LoggedWrite]:
    """One writer (a thread with its own database connection): each of its leases writes
    three times, in the order given."""
    log: list[LoggedWrite] = []
    try:
        start.wait(timeout=30)
        for lease in leases:
            for _ in range(3):
                with transaction.atomic():
                    rows = FencedResource.objects.filter(pk=pk)
                    written = rows.try_fenced_update(
                        lease, writes=F("writes") + 1, payload=f"{lease.fencing_token}"
                    )
                    # Our UPDATE holds the row lock until commit: this reads our own write.
                    place = rows.values_list("writes", flat=True).get() if written else 0
                log.append(LoggedWrite(lease.fencing_token, lease.token, place))
    finally:
        connections.close_all()
    return log


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_racing_writers_accept_tokens_in_order_and_one_owner_per_token() -> None:
    """Tokens dealt round robin to the writers (each writer's own tokens increase, as a
    holder's do), every fifth one also to the next writer with another owner (two holders
    granted one token): however the statements interleave, the accepted writes, in the
    order the row took them, never go back in token and never change owner within one."""
    row = FencedResource.objects.create(name=f"race-{uuid.uuid4().hex[:8]}")
    plans: list[list[Lease]] = [[] for _ in range(WRITERS)]
    for n in range(1, TOKENS + 1):
        plans[n % WRITERS].append(make_lease(TOKEN + n))
        if n % 5 == 0:
            plans[(n + 1) % WRITERS].append(make_lease(TOKEN + n))
    start = threading.Barrier(WRITERS)
    with ThreadPoolExecutor(WRITERS) as pool:
        logs = list(pool.map(lambda plan: race_fenced_writes(row.pk, plan, start), plans))
    writes = [write for log in logs for write in log]

    accepted = sorted((write for write in writes if write.place), key=lambda write: write.place)
    assert [write.place for write in accepted] == list(range(1, len(accepted) + 1))
    for earlier, later in itertools.pairwise(accepted):
        assert later.token >= earlier.token, (earlier, later)
        assert later.token > earlier.token or later.owner == earlier.owner, (earlier, later)
    row.refresh_from_db()
    assert (row.fencing_token, row.fencing_owner) == (accepted[-1].token, accepted[-1].owner)
    assert row.writes == len(accepted)
    refused = len(writes) - len(accepted)
    assert accepted
    assert refused, f"{len(accepted)} accepted, none refused: the writers did not race"


# --- With a real throttle on Redis ---------------------------------------------------------


@pytest.fixture
def redis_throttle_cache() -> Iterator[str]:
    """``TASK_WORKFLOW["CACHE"]`` pointed at the test Redis under a fresh key prefix; the
    group's keys are deleted afterwards."""
    from django.conf import settings

    alias, prefix = "tw_fencing_locks", uuid.uuid4().hex
    config = {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": settings.REDIS_URL,
        "KEY_PREFIX": prefix,
    }
    throttle_module._backends.clear()
    try:
        with override_settings(
            CACHES={**settings.CACHES, alias: config},
            TASK_WORKFLOW={**settings.TASK_WORKFLOW, "CACHE": alias},
        ):
            backend = get_backend()
            assert isinstance(backend, RedisThrottleBackend)
            try:
                yield alias
            finally:
                keys = list(backend.client.scan_iter(match=f"*{prefix}*"))
                if keys:
                    backend.client.delete(*keys)
    finally:
        throttle_module._backends.clear()


@pytest.mark.services
@pytest.mark.django_db
def test_a_holder_paused_past_its_lease_cannot_write_after_the_next_holder(
    resource: FencedResource, redis_throttle_cache: str
) -> None:
    """A takes the slot with a short lease and stops renewing it (its process paused);
    the store gives the slot to B, which writes. A's late write is refused: by
    ``lease.lost`` before anything is sent, and, had A been paused right after that
    check, by the row itself (B's token is newer)."""
    name = f"tests.fencing.{uuid.uuid4().hex[:12]}"
    paused = throttle(name=name, ttl=0.5, wait=0).acquire()
    lease_renewer.discard(paused)  # paused: its renewer thread does not run
    resource.fenced_update(paused, payload="A before the pause")

    successor = throttle(name=name, ttl=30, wait=10).acquire()  # granted once A's lease lapsed
    try:
        assert successor.fencing_token > paused.fencing_token
        resource.fenced_update(successor, payload="B")

        assert paused.lost  # its own view ran out before the store gave the slot away
        with pytest.raises(FencedWriteRefused) as refused_before_sending:
            resource.fenced_update(paused, payload="A after the pause")
        assert refused_before_sending.value.reason == "lease lost"

        # Paused between its check of ``lease.lost`` and the statement: the row decides.
        as_the_row_sees_it = make_lease(paused.fencing_token, paused.token)
        with pytest.raises(FencedWriteRefused) as refused_by_the_row:
            resource.fenced_update(as_the_row_sees_it, payload="A after the pause")
        assert refused_by_the_row.value.reason == "older token"
        assert (refused_by_the_row.value.stored_fencing_token, refused_by_the_row.value.stored_owner) == (
            successor.fencing_token,
            successor.token,
        )
        assert stored(resource) == (successor.fencing_token, successor.token)
        assert resource.payload == "B"
    finally:
        successor.release()
        paused.release()


# --- MariaDB / MySQL ------------------------------------------------------------------------

MARIADB = {
    "ENGINE": "django.db.backends.mysql",
    "USER": "root",
    "PASSWORD": "",
    "HOST": "127.0.0.1",
    "PORT": "3306",
}


@pytest.fixture
def mariadb_alias(django_db_blocker: Any) -> Iterator[str]:
    """The local MariaDB as the connection alias ``mariadb_fencing``, on a database of its
    own holding the ``FencedResource`` table; dropped afterwards."""
    try:
        import MySQLdb
    except ImportError:
        pymysql = pytest.importorskip("pymysql", reason="needs mysqlclient or PyMySQL (the dev extra)")
        pymysql.install_as_MySQLdb()
    import MySQLdb

    name = f"tw_fencing_{uuid.uuid4().hex[:12]}"
    admin = MySQLdb.connect(
        host=MARIADB["HOST"], port=int(MARIADB["PORT"]), user=MARIADB["USER"], password=""
    )
    alias = "mariadb_fencing"
    original = connections.settings
    try:
        admin.cursor().execute(f"CREATE DATABASE {name}")
        connections.settings = connections.configure_settings({**original, alias: {**MARIADB, "NAME": name}})
        with django_db_blocker.unblock():
            with connections[alias].schema_editor() as editor:
                editor.create_model(FencedResource)
            try:
                yield alias
            finally:
                connections[alias].close()
    finally:
        if alias in connections.settings:
            del connections[alias]
        connections.settings = original
        admin.cursor().execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


@pytest.mark.services
def test_the_rule_holds_on_mariadb(mariadb_alias: str) -> None:
    """MySQL and MariaDB evaluate the UPDATE's WHERE on the locked row too; a repeated
    write of the same values by the holder counts as written (Django asks the server for
    matched rows, not changed rows)."""
    rows = FencedResource.objects.db_manager(mariadb_alias)
    row = rows.create(name="mariadb")
    first, same_token, older, newer = (
        make_lease(TOKEN + 1),
        make_lease(TOKEN + 1),
        make_lease(TOKEN),
        make_lease(TOKEN + 2),
    )
    assert rows.filter(pk=row.pk).try_fenced_update(first, payload="first") == 1
    assert rows.filter(pk=row.pk).try_fenced_update(first, payload="first") == 1  # same values again
    with pytest.raises(FencedWriteRefused) as refused:
        row.fenced_update(same_token, payload="same token")
    assert refused.value.reason == "same token, other owner"
    assert row.try_fenced_update(older, payload="older") == 0
    row.fenced_update(newer, payload="newer", writes=F("writes") + 1)
    assert row.writes == 1
    fresh = rows.get(pk=row.pk)
    assert (fresh.fencing_token, fresh.fencing_owner, fresh.payload) == (TOKEN + 2, newer.token, "newer")


# --- The rule in SQL, for resources outside Django -----------------------------------------

HOWTO_PAGE = ROOT / "docs" / "howto" / "fenced-writes.md"


@pytest.mark.django_db
def test_the_documented_sql_applies_the_same_rule() -> None:
    """The how-to's UPDATE for a resource outside Django, run on a table of its shape."""
    from django.db import connection

    blocks = re.findall(r"```sql\n(.*?)```", HOWTO_PAGE.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "the how-to shows one SQL statement"
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE resource (id integer PRIMARY KEY, spec text NOT NULL, "
            "fence bigint NOT NULL, fence_owner varchar(64) NOT NULL)"
        )
        cursor.execute("INSERT INTO resource VALUES (1, '', 0, '')")

        def write(lease: Lease, spec: str) -> int:
            params: dict[str, int | str] = {
                "id": 1,
                "spec": spec,
                "token": lease.fencing_token,
                "owner": lease.token,
            }
            cursor.execute(blocks[0], params)
            return cursor.rowcount

        first, same_token, older, newer = (
            make_lease(TOKEN + 1),
            make_lease(TOKEN + 1),
            make_lease(TOKEN),
            make_lease(TOKEN + 2),
        )
        assert [
            write(first, "first"),
            write(first, "first again"),
            write(same_token, "same token"),
            write(older, "older"),
            write(newer, "newer"),
            write(first, "first, late"),
        ] == [1, 1, 0, 0, 1, 0]
        cursor.execute("SELECT spec, fence, fence_owner FROM resource WHERE id = 1")
        assert cursor.fetchone() == ("newer", TOKEN + 2, newer.token)
