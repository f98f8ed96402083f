"""Each Lua script of the Redis backend on its own: run with the KEYS and ARGV its header
documents, on the real Redis, its replies and writes checked against that header.

The backend's behaviour through these scripts is in ``test_throttle_redis_protocol.py``;
that every key a script touches is declared, in ``test_throttle_script_keys.py``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings

from task_workflow.throttle.redis_backend import KEY_SUFFIXES, SCRIPTS_DIR, load_script

pytestmark = [pytest.mark.services]

REDIS_URL = getattr(settings, "REDIS_URL", "") or "redis://127.0.0.1:6379/15"
SCRIPT_NAMES = ["acquire", "release", "announce", "renew", "cancel_wait"]

#: ARGV 1-4 of every script: restart grace 0, counter 1 day, waiters 3 s, claims 5 s.
CONSTANTS = [0, 24 * 3600 * 1000, 3000, 5000]


class Group:
    """One group's keys, and each script run the way its header says."""

    def __init__(self, client: redis.Redis, constants: list[int] = CONSTANTS) -> None:
        self.client = client
        self.base = f"tw-test:{uuid.uuid4().hex}:{{{uuid.uuid4().hex}}}"
        self.keys = [f"{self.base}{suffix}" for suffix in KEY_SUFFIXES]
        self.constants = constants
        self.scripts = {name: client.register_script(load_script(name)) for name in SCRIPT_NAMES}

    def key(self, name: str) -> str:
        return f"{self.base}:{name}"

    def wake(self, token: str) -> str:
        return f"{self.base}:wake:{token}"

    def run(self, name: str, token: str, *args: object) -> object:
        return self.scripts[name](keys=[*self.keys, self.wake(token)], args=[*self.constants, token, *args])

    def acquire(self, token: str, limit: int = 1, ttl_ms: int = 60_000) -> object:
        return self.run("acquire", token, limit, ttl_ms, json.dumps({"who": token}))

    def holders(self) -> dict[str, float]:
        leases = self.client.zrange(self.keys[0], 0, -1, withscores=True)
        return {member.decode(): score for member, score in leases}

    def fence(self, token: str) -> int:
        """The fencing token of ``token``'s slot, as stored in ``meta``."""
        return int(self.client.hget(self.key("meta"), token).split(b" ")[0])

    def cleanup(self) -> None:
        self.client.delete(*self.client.keys(f"{self.base}*"))


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    yield client
    client.close()


@pytest.fixture
def group(client) -> Iterator[Group]:
    group = Group(client)
    yield group
    group.cleanup()


# --- The files -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_each_script_file_documents_its_keys_arguments_reply_and_invariants(name):
    header = "\n".join(
        line for line in (SCRIPTS_DIR / f"{name}.lua").read_text().splitlines() if line.startswith("--")
    )
    for heading in ("KEYS:", "ARGV:", "Reply:", "Invariants kept here:"):
        assert heading in header, f"{name}.lua has no {heading!r} in its header"
    assert header.startswith(f"-- {name}.lua: ")


def test_the_prelude_is_put_in_front_of_each_script_and_has_no_placeholders():
    prelude = (SCRIPTS_DIR / "prelude.lua").read_text()
    for name in SCRIPT_NAMES:
        text = load_script(name)
        assert text.startswith(prelude)
        assert text.endswith((SCRIPTS_DIR / f"{name}.lua").read_text())
        placeholders = re.findall(r"\{(?:waiter_ms|claim_ms|seq_ms|grace_ms|base_end)\}", text)
        assert placeholders == [], "constants come in ARGV, not by substitution"


def test_the_prelude_takes_its_constants_from_argv(client):
    """ARGV[3] is how long a refused caller counts as waiting: 50 ms here."""
    group = Group(client, [0, CONSTANTS[1], 50, CONSTANTS[3]])
    try:
        assert group.acquire("H") > 0
        assert group.acquire("W") < 0
        assert 0 < client.zscore(group.key("alive"), "W") - time.time() * 1000 <= 60
    finally:
        group.cleanup()


# --- acquire.lua -------------------------------------------------------------------------------


def test_acquire_grants_with_a_fencing_token_or_refuses_with_the_time_to_the_earliest_expiry(group):
    fence = group.acquire("A", ttl_ms=10_000)
    assert isinstance(fence, int)
    assert fence > 0
    assert group.client.hget(group.key("meta"), "A") == f'{fence} {{"who": "A"}}'.encode()
    refusal = group.acquire("B")
    assert -1 - 10_000 <= refusal < -1 - 9_000  # -1 - ms until A's lease ends
    assert group.client.zrange(group.key("line"), 0, -1) == [b"B"]
    assert group.client.hget(group.key("waiter_meta"), "B") == b'60000 {"who": "B"}'
    assert list(group.holders()) == ["A"]


def test_acquire_of_a_handed_slot_confirms_it(group):
    assert group.acquire("H") > 0
    assert group.acquire("W") < 0
    assert group.run("release", "H") == 1
    fence = group.fence("W")
    assert group.acquire("W") == fence  # its own slot, found by attempting
    assert group.client.hget(group.key("handed"), "W") is None  # nothing left to announce
    assert not group.client.exists(group.key("wake"))
    assert group.run("announce", "W", fence) == 0
    assert not group.client.exists(group.wake("W"))
    assert group.holders()["W"] > time.time() * 1000 + 55_000  # its own lease now


# --- release.lua -------------------------------------------------------------------------------


def test_release_replies_1_or_0_and_announces_a_handoff_on_the_groups_list(group):
    assert group.run("release", "nobody") == 0
    assert group.acquire("A") > 0
    assert group.run("release", "A") == 1
    assert group.acquire("B", ttl_ms=60_000) > 0
    assert group.acquire("W", ttl_ms=2_000) < 0
    assert group.run("release", "B") == 1
    fence = group.fence("W")
    assert group.client.lrange(group.key("wake"), 0, -1) == [f"W {fence}".encode()]
    assert group.client.hget(group.key("handed"), "W") == str(fence).encode()
    claim_ends = group.holders()["W"]
    assert 1_500 < claim_ends - time.time() * 1000 <= 2_000  # the waiter's ttl: shorter
    assert 0 < group.client.pexpiretime(group.key("wake")) < claim_ends


def test_the_groups_wake_list_never_outlives_the_earliest_claim_it_announces(group):
    assert group.acquire("A", limit=2) > 0
    assert group.acquire("B", limit=2) > 0
    assert group.acquire("short", limit=2, ttl_ms=1_000) < 0
    assert group.acquire("long", limit=2) < 0
    assert group.run("release", "A") == 1  # to "short": a 1 s claim
    assert group.run("release", "B") == 1  # to "long": a 5 s claim
    assert group.client.llen(group.key("wake")) == 2
    assert group.client.pexpiretime(group.key("wake")) < group.holders()["short"]


def test_release_of_a_handed_slot_before_its_waiter_woke_withdraws_the_announcement(group):
    assert group.acquire("H") > 0
    assert group.acquire("W") < 0
    assert group.run("release", "H") == 1
    fence = group.fence("W")
    assert group.run("release", "W") == 1  # an operator's force release
    assert not group.client.exists(group.key("wake"))
    assert group.client.hget(group.key("handed"), "W") is None
    assert group.run("announce", "W", fence) == 0
    assert not group.client.exists(group.wake("W"))


# --- announce.lua ------------------------------------------------------------------------------


def test_announce_passes_a_handoff_on_once_and_it_expires_before_the_claim(group):
    assert group.acquire("H") > 0
    assert group.acquire("W") < 0
    assert group.acquire("X") < 0
    assert group.run("release", "H") == 1
    assert group.client.lpop(group.key("wake")) == f"W {group.fence('W')}".encode()  # X's pop
    fence = group.fence("W")
    assert group.run("announce", "W", fence) == 1
    assert group.client.lrange(group.wake("W"), 0, -1) == [str(fence).encode()]
    assert 0 < group.client.pexpiretime(group.wake("W")) < group.holders()["W"]
    assert group.run("announce", "W", fence) == 0  # passed on once
    assert group.client.llen(group.wake("W")) == 1


def test_announce_of_another_fencing_token_or_a_lapsed_claim_passes_nothing_on(client):
    group = Group(client, [*CONSTANTS[:3], 100])  # 100 ms claims
    try:
        assert group.acquire("H") > 0
        assert group.acquire("W") < 0
        assert group.run("release", "H") == 1
        fence = group.fence("W")
        assert group.run("announce", "W", fence + 1) == 0
        time.sleep(0.15)
        assert group.run("announce", "W", fence) == 0
        assert not client.exists(group.wake("W"))
        assert not client.exists(group.key("wake"))  # expired with the claim
    finally:
        group.cleanup()


# --- renew.lua ---------------------------------------------------------------------------------


def test_renew_confirms_a_handoff(group):
    assert group.acquire("H") > 0
    assert group.acquire("W") < 0
    assert group.run("release", "H") == 1
    assert group.run("renew", "W", 60_000) == 1  # the woken waiter extends its claim
    assert group.client.hget(group.key("handed"), "W") is None
    assert not group.client.exists(group.key("wake"))


def test_renew_extends_a_live_lease_and_drops_a_lapsed_one(group):
    assert group.acquire("A", ttl_ms=1_000) > 0
    assert group.run("renew", "A", 60_000) == 1
    assert group.holders()["A"] > time.time() * 1000 + 55_000
    assert group.run("renew", "nobody", 60_000) == 0
    assert group.acquire("B", limit=2, ttl_ms=50) > 0
    time.sleep(0.1)
    assert group.run("renew", "B", 60_000) == 0
    assert list(group.holders()) == ["A"]
    assert group.client.hget(group.key("meta"), "B") is None


# --- cancel_wait.lua ---------------------------------------------------------------------------


def test_cancel_wait_leaves_the_line_and_reports_a_slot_handed_meanwhile(group):
    assert group.acquire("H") > 0
    assert group.acquire("W") < 0
    assert group.acquire("X") < 0
    assert group.run("cancel_wait", "X") == 0
    assert group.client.zrange(group.key("line"), 0, -1) == [b"W"]
    assert group.run("release", "H") == 1
    fence = group.fence("W")
    assert group.run("cancel_wait", "W") == fence  # it holds the slot
    assert not group.client.exists(group.key("wake"))  # the announcement is withdrawn
    assert group.client.hget(group.key("handed"), "W") is None
    assert group.client.zcard(group.key("line")) == 0
