"""A model of the throttle protocol and a state machine that holds a backend to it.

Shared by ``tests/test_throttle_properties.py`` (a modest example budget, run by ``make
test``) and ``tests/campaigns/test_throttle_properties_budget.py`` (a large
one, ``make campaigns``). Hypothesis drives one
backend on its real store (Redis, or a DatabaseCache on PostgreSQL or SQLite) with
sequences of these steps, by callers named ``A``..``E`` (``A2`` is the next caller named
A) in one or two slot groups of concurrency 1-3:

- ``arrive``: a caller comes with a fresh token and a lease of 0.15-1 s (or 30 s) and
  asks for a slot; refused, it is a waiter;
- ``attempt``: a waiter asks again (same token, same lease length);
- ``wait``: a waiter waits briefly (``wait_for_release``, 10 or 50 ms), which may return a
  slot a release handed it; or gives up (``cancel_wait``), which may return one too;
- ``release``, ``renew`` (with another lease length) of a holder;
- ``crash``: a holder stops renewing and never releases; a waiter stops attempting;
- ``force_release``: an operator releases a listed holder of a group;
- ``let_leases_lapse``: sleep just past the earliest deadline of a lease nobody renews
  (the only deliberate sleep: time passing is what it tests); with ``zombie``, a crashed
  holder whose lease ran out (or one that lost it) then comes back, renews and releases.

The model renews every live holder's lease (its "renewer") before each step, so a lease
runs out only when its caller crashed. A grant is believed from the request: a lease
granted or renewed by a call sent at ``t0`` and answered at ``t1`` ends between
``t0 + ttl`` and ``t1 + ttl``. After every step the store is read (``held_slots``,
``waiting``, for Redis the keys' PTTL) and these invariants checked, with ``TOL`` for the
clocks and ``MARGIN`` for the round trips (one exception class per kind, below):

1. at most ``concurrency`` live leases per group, and no token holds two;
2. every lease the model knows to be live is in the store with its own deadline (not
   shortened, not extended: only its holder's acquire or renewal moves it) and fencing
   token; a lease the model knows to be over (or force-released) is not renewed back to
   life; a release or renewal of a live lease succeeds;
3. a slot is handed over only to a live waiter that holds no slot; nobody else (a caller
   that released, gave up, lost its lease, or never asked) is a live holder; a waiter
   handed a slot gets it from ``wait_for_release``, ``cancel_wait`` or ``acquire``, but
   not once the handed claim was force-released or lapsed; every holder is listed with
   its own metadata;
4. FIFO: a grant (an acquire or a handoff) never leaves more earlier-arrived live waiters
   in line than there are free slots; ``waiting()`` lists exactly the live waiters, by
   first arrival, and no holder; a caller is not refused while there are more free slots
   than live waiters ahead of it;
5. the group's records outlive its leases and waiters (Redis: PTTL of each key);
6. fencing tokens strictly increase per group, in the order of the grants.

A waiter counts as live while its last refused attempt is younger than the backend's
waiter window (``WAITER_MS``) minus ``WAITER_MARGIN``, and as gone once it is older than
the window plus that margin; in between the model checks nothing about it.

The store's answers depend on time, so a replayed sequence may fail a step earlier or
later than the first time: a failure is kept and raised at teardown (see ``deferred``).
"""

from __future__ import annotations

import functools
import itertools
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from task_workflow.throttle.base import AcquireResult, HeldSlot, SlotGroup, ThrottleBackend

ROOT = Path(__file__).resolve().parent.parent
#: Failing examples are kept here (gitignored) and replayed first by the next run.
EXAMPLE_DATABASE = DirectoryBasedExampleDatabase(ROOT / ".hypothesis" / "examples")

CALLERS = ("A", "B", "C", "D", "E")
TTLS = (0.15, 0.3, 0.6, 1.0, 30.0)
WAITS = (0.01, 0.05)
#: Rules pick the n-th caller they apply to.
PICK = st.integers(0, 4)

#: Seconds: clock reads and the stores' rounding (Redis: milliseconds; same host, same clock).
TOL = 0.003
#: Seconds: "comfortably" live or over, beyond a round trip and a scheduling hiccup.
MARGIN = 0.05
#: Seconds of doubt about a waiter's liveness either side of the backend's window.
WAITER_MARGIN = 0.3
#: The model's renewer renews a lease this long before its deadline (plus what the step
#: about to run may block).
RENEW_AHEAD = 0.12
#: ``let_leases_lapse`` waits for a lease ending at most this far ahead, then this much past it.
MAX_LAPSE = 1.2
LAPSE_PAST = 0.03


def settings_for(examples: int, steps: int, **overrides: Any) -> settings:
    """Hypothesis settings for a run of ``examples`` sequences of up to ``steps`` steps."""
    options: dict[str, Any] = {
        "max_examples": examples,
        "stateful_step_count": steps,
        "deadline": None,
        "database": EXAMPLE_DATABASE,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.filter_too_much],
    }
    return settings(**{**options, **overrides})


class ProtocolViolation(AssertionError):
    """The store broke an invariant of the throttle protocol (a subclass per kind, so that
    hypothesis tells distinct bugs apart)."""


class TooManyHolders(ProtocolViolation):
    """Invariant 1: more live leases than the concurrency, or a token holding two."""


class LeaseTampered(ProtocolViolation):
    """Invariant 2: a lease moved, vanished, or came back to life, not by its holder."""


class WrongHolder(ProtocolViolation):
    """Invariant 3: a slot held by (or handed to) a caller that should not hold it."""


class LineBroken(ProtocolViolation):
    """Invariant 4: ``waiting()`` misses a live waiter, or lists a holder or a leaver."""


class NotFifo(ProtocolViolation):
    """Invariant 4: a later arrival served before an earlier live waiter."""


class RecordsExpire(ProtocolViolation):
    """Invariant 5: a group record would expire before a live lease or waiter."""


class FencingBroken(ProtocolViolation):
    """Invariant 6: a fencing token repeated, or not increasing in the order of grants."""


class WrongMetadata(ProtocolViolation):
    """A holder listed with metadata that is not its own (operators see the wrong task)."""


class ApiMismatch(ProtocolViolation):
    """A call answered something the interface does not allow."""


# --- Backends under test -------------------------------------------------------------------


class Subject:
    """A backend as the machine drives it (the current API), and what it can be asked.

    ``waiter_window``: seconds a refused caller stays a live waiter after an attempt;
    ``None`` when the backend keeps no line (then FIFO is not checked).
    """

    fencing = True

    def __init__(
        self,
        backend: ThrottleBackend,
        label: str,
        *,
        cleanup: Callable[[], None] = lambda: None,
        waiter_window: float | None = None,
    ) -> None:
        self.backend = backend
        self.label = label
        self._cleanup = cleanup
        self.has_line = getattr(type(backend), "waiting", None) is not getattr(
            ThrottleBackend, "waiting", None
        )
        if waiter_window is None and self.has_line:
            waiter_ms = getattr(backend, "WAITER_MS", None)
            waiter_window = waiter_ms / 1000 if waiter_ms else 1.0
        self.waiter_window = waiter_window

    @property
    def wakes_waiters(self) -> bool:
        return self.backend.wakes_waiters

    @property
    def handoff_claim(self) -> float:
        return self.backend.handoff_claim

    def acquire(
        self, group: SlotGroup, token: str, concurrency: int, ttl: float, meta: dict
    ) -> AcquireResult:
        return self.backend.acquire(group, token, concurrency, ttl, meta)

    def release(self, group: SlotGroup, token: str, slot: str) -> bool:
        return self.backend.release(group, token, slot)

    def renew(self, group: SlotGroup, token: str, slot: str, ttl: float) -> bool:
        return self.backend.renew(group, token, slot, ttl)

    def wait_for_release(self, group: SlotGroup, token: str, timeout: float) -> AcquireResult | None:
        return self._grant_or_none("wait_for_release", self.backend.wait_for_release(group, token, timeout))

    def cancel_wait(self, group: SlotGroup, token: str) -> AcquireResult | None:
        return self._grant_or_none("cancel_wait", self.backend.cancel_wait(group, token))

    @staticmethod
    def _grant_or_none(call: str, value: Any) -> AcquireResult | None:
        if value is not None and not isinstance(value, AcquireResult):
            raise ApiMismatch(f"{call} returned {value!r}: a grant (AcquireResult) or None expected")
        return value

    def waiting(self, group: SlotGroup) -> list[str] | None:
        return list(self.backend.waiting(group)) if self.has_line else None

    def held_slots(self) -> list[HeldSlot]:
        return self.backend.held_slots()

    def record_problems(self, group: SlotGroup, live: list[HeldSlot]) -> list[str]:
        """What is wrong with how long the group's records last (stores with key expiry)."""
        return []

    def close(self) -> None:
        self._cleanup()


class RedisSubject(Subject):
    """The Redis backend, plus a look at its keys' expiry."""

    #: Keys that must outlive every live lease of the group, and those that must outlive
    #: every live waiter (``ALIVE``: the sorted set scored by until when a waiter is live).
    LEASE_KEYS = (":holders", ":meta")
    WAITER_KEYS = (":line", ":alive", ":waiter_meta")
    ALIVE = ":alive"

    def __init__(self, backend: Any, label: str = "redis", **kwargs: Any) -> None:
        super().__init__(backend, label, **kwargs)
        self.client = backend.client

    def _base(self, group: SlotGroup) -> str:
        return f"{self.backend.key_prefix}{{{group.digest}}}"

    def record_problems(self, group: SlotGroup, live: list[HeldSlot]) -> list[str]:
        base = self._base(group)
        names = [base + suffix for suffix in (*self.LEASE_KEYS, *self.WAITER_KEYS)]
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        pipe.zrange(base + self.ALIVE, 0, -1, withscores=True)
        for name in names:
            pipe.pttl(name)
        (seconds, micros), alive, *pttls = pipe.execute()
        now_ms = seconds * 1000 + micros / 1000
        problems = []
        lease_left = max((slot.lease_deadline * 1000 - now_ms for slot in live), default=0.0)
        waiter_left = max((until - now_ms for _, until in alive), default=0.0)
        for name, pttl in zip(names, pttls, strict=True):
            suffix = name[len(base) :]
            needed = lease_left if suffix in self.LEASE_KEYS else waiter_left
            if needed <= TOL * 1000 or pttl == -1:
                continue
            if pttl == -2:
                problems.append(f"key {suffix} is gone while a lease/waiter needs it for {needed:.0f} ms")
            elif pttl < needed - TOL * 1000:
                problems.append(
                    f"key {suffix} expires in {pttl} ms, before its lease/waiter ({needed:.0f} ms)"
                )
        return problems


# --- The model -----------------------------------------------------------------------------


@dataclass
class Group:
    group: SlotGroup
    concurrency: int


@dataclass
class Handover:
    """A slot the store handed to a waiter, as the listing showed it."""

    step: int
    deadline: float
    fence: int | None
    revoked: bool = False  # force-released before its waiter took it


@dataclass(eq=False)
class Caller:
    name: str  # "A", "A2" for the second caller named A, ...
    token: str
    group: int
    ttl: float
    #: waiting | abandoned (stopped attempting) | holding | crashed | lost | done
    state: str = "new"
    first_refusal: float | None = None  # when it joined the line this time
    in_order: bool = True  # its place in line is known (it attempted again in time)
    last_attempt: float = 0.0  # start of its last refused acquire
    slot: str = ""
    lo: float = 0.0  # its lease deadline lies in [lo, hi]
    hi: float = 0.0
    fence: int | None = None
    handover: Handover | None = None
    sent: set[float] = field(default_factory=set)  # the acquired_at of every acquire it sent

    @property
    def in_line(self) -> bool:
        return self.state in ("waiting", "abandoned") and self.handover is None

    @property
    def may_hold(self) -> bool:
        if self.state in ("holding", "crashed"):
            return True
        return self.handover is not None and not self.handover.revoked


@dataclass
class PendingGrant:
    """A grant, judged for FIFO against the listing at the end of its step."""

    caller: Caller
    arrival: float
    at: float


@dataclass
class Snapshot:
    before: float
    after: float
    slots: dict[int, list[HeldSlot]] = field(default_factory=dict)  # per group, as listed
    lines: dict[int, list[str] | None] = field(default_factory=dict)

    def live(self, index: int) -> list[HeldSlot]:
        return [slot for slot in self.slots[index] if slot.lease_deadline > slot.now + TOL / 2]


def deferred(method: Callable[..., None]) -> Callable[..., None]:
    """Run a rule (or invariant) unless an earlier step failed; keep its failure for teardown.

    The store's answers depend on time, so replaying a sequence may fail a step earlier or
    later. Hypothesis needs every replay to draw the same choices, so a failure does not
    stop the run: later steps draw their arguments and do nothing, and ``teardown`` raises
    the first failure (with its own traceback).
    """

    @functools.wraps(method)
    def run(self: ThrottleMachine, *args: Any, **kwargs: Any) -> None:
        if self.failure is None:
            try:
                method(self, *args, **kwargs)
            except Exception as exc:
                self.failure = exc

    return run


class ThrottleMachine(RuleBasedStateMachine):
    """Drives one backend (``make_subject``, set by a subclass) and checks it after every step."""

    make_subject: ClassVar[Callable[[], Subject]]
    #: examples and steps run (all subclasses), for the benchmark's report
    stats: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.subject = self.make_subject()
        self.stats[f"{self.subject.label}:examples"] += 1
        self.groups: list[Group] = []
        self.current: dict[str, Caller] = {}
        self.by_token: dict[str, Caller] = {}
        self.arrivals: Counter[str] = Counter()
        self.fences: dict[int, list[tuple[int, int, str]]] = {}
        self.pending: list[PendingGrant] = []
        self.step = 0
        self.step_started = self.started = time.time()
        self.trace: list[str] = []
        self.last: Snapshot | None = None
        self.run_id = uuid.uuid4().hex[:8]
        self.failure: Exception | None = None

    def teardown(self) -> None:
        self.subject.close()
        if self.failure is not None:
            raise self.failure

    # --- bookkeeping

    def _t(self, moment: float) -> str:
        return f"{moment - self.started:.3f}"

    def _log(self, text: str) -> None:
        self.trace.append(f"  #{self.step:<3} t={self._t(time.time())} {text}")

    def _fail(self, kind: type[ProtocolViolation], problem: str) -> None:
        trace = "\n".join(self.trace[-60:])
        raise kind(
            f"{self.subject.label}: {problem}\nmodel trace (t: seconds since the example began):\n{trace}"
        )

    def _begin(self, text: str, blocking: float = 0.0) -> None:
        self.step += 1
        self.step_started = time.time()
        self.stats[f"{self.subject.label}:steps"] += 1
        self._renew_due(RENEW_AHEAD + blocking)
        self._log(text)

    def _callers(self, *states: str) -> list[Caller]:
        return [c for c in self.by_token.values() if c.state in states]

    def _group_callers(self, index: int) -> list[Caller]:
        return [c for c in self.by_token.values() if c.group == index]

    def _window(self) -> float | None:
        return self.subject.waiter_window

    def _surely_live_waiter(self, c: Caller, at: float) -> bool:
        window = self._window()
        return window is not None and c.in_line and at - c.last_attempt < window - WAITER_MARGIN

    def _maybe_live_waiter(self, c: Caller, at: float) -> bool:
        window = self._window()
        return window is not None and c.in_line and at - c.last_attempt <= window + WAITER_MARGIN

    def _metadata(self, c: Caller) -> dict[str, Any]:
        """What ``throttle`` stores with a lease; ``acquired_at`` tells the callers apart."""
        g = self.groups[c.group]
        acquired_at = time.time()
        c.sent.add(acquired_at)
        return {
            "task_name": g.group.task_name,
            "key": g.group.key,
            "concurrency": g.concurrency,
            "task_id": None,
            "hostname": "props",
            "pid": 1,
            "ttl": c.ttl,
            "acquired_at": acquired_at,
        }

    def _new_caller(self, who: str, group: int, ttl: float) -> Caller:
        self.arrivals[who] += 1
        name = who if self.arrivals[who] == 1 else f"{who}{self.arrivals[who]}"
        c = Caller(name, f"{name}-{self.run_id}", group % len(self.groups), ttl)
        self.current[who] = c
        self.by_token[c.token] = c
        return c

    def _lease(self, c: Caller) -> str:
        return f"lease until t={self._t(c.lo)}..{self._t(c.hi)}"

    # --- talking to the store

    def _renew(self, c: Caller, ttl: float, why: str, *, may_fail: bool = False) -> bool:
        g = self.groups[c.group]
        t0 = time.time()
        renewed = self.subject.renew(g.group, c.token, c.slot, ttl)
        t1 = time.time()
        if renewed:
            if c.hi + MARGIN < t0:
                self._fail(
                    LeaseTampered,
                    f"{why}: {c.name}'s lease was over by t={self._t(c.hi)}, yet renew succeeded",
                )
            c.ttl, c.lo, c.hi = ttl, t0 + ttl, t1 + ttl
            self._log(f"{why}: {c.name} renewed ({ttl}s), {self._lease(c)}")
        else:
            if c.lo > t1 + MARGIN and c.state == "holding" and not may_fail:
                self._fail(
                    LeaseTampered,
                    f"{why}: renew of {c.name}'s live lease ({self._lease(c)}) failed: the slot was lost",
                )
            c.state = "lost"
            self._log(f"{why}: {c.name}'s renew failed: lease lost")
        return renewed

    def _renew_due(self, horizon: float) -> None:
        now = time.time()
        for c in self._callers("holding"):
            if c.lo - now < horizon:
                self._renew(c, c.ttl, "renewer")

    def _fence_event(self, index: int, step: int, fence: int | None, c: Caller, how: str) -> None:
        if not self.subject.fencing:
            return
        if not isinstance(fence, int) or isinstance(fence, bool) or fence <= 0:
            self._fail(
                FencingBroken, f"{how} to {c.name}: fencing token {fence!r}, a positive integer expected"
            )
        events = self.fences.setdefault(index, [])
        for other_step, other, name in events:
            if other == fence:
                self._fail(
                    FencingBroken, f"{how} to {c.name}: fencing token {fence} was already granted to {name}"
                )
            if other_step < step and other > fence:
                self._fail(
                    FencingBroken,
                    f"{how} to {c.name} at step {step}: fencing token {fence} is below {other}, "
                    f"granted to {name} earlier (step {other_step})",
                )
        events.append((step, fence, c.name))
        c.fence = fence

    def _granted(self, c: Caller, result: AcquireResult, t0: float, t1: float, via: str) -> None:
        handover = c.handover
        fence = result.fencing_token
        # A claim handed to c earlier is the slot granted now, unless it is over: then this is
        # a grant of its own (to a caller no longer in line). Around its end, either.
        over = handover is not None and (handover.revoked or handover.deadline < t0 - TOL)
        ending = handover is not None and not over and handover.deadline < t1 + TOL
        if handover is not None and over and handover.fence is not None and fence == handover.fence:
            # Force-released, or lapsed before the call began: the slot may be someone
            # else's, and its fencing token was granted once already.
            self._fail(
                WrongHolder,
                f"{via} granted {c.name} the slot handed to it at step {handover.step} (fence {fence}), "
                + (
                    "which an operator force-released before it woke"
                    if handover.revoked
                    else f"whose claim ended at t={self._t(handover.deadline)}, before the call"
                ),
            )
        if handover is not None and (fence == handover.fence or (handover.fence is None and not over)):
            c.fence = fence
            if handover.fence is None:
                self._fence_event(c.group, handover.step, fence, c, via)
        elif handover is not None and not over and not ending and self.subject.fencing:
            self._fail(
                FencingBroken,
                f"{via} gave {c.name} fencing token {fence}; the store recorded {handover.fence} "
                "for the slot handed to it",
            )
        else:
            self._fence_event(c.group, self.step, fence, c, via)
            if handover is not None:
                self.pending.append(PendingGrant(c, t0, t0))
            elif c.state != "waiting" or c.in_order:
                arrival = c.first_refusal if c.state == "waiting" and c.first_refusal is not None else t0
                self.pending.append(PendingGrant(c, arrival, t0))
            handover = None
        c.state, c.slot = "holding", result.slot or c.slot
        c.first_refusal, c.in_order, c.handover = None, True, None
        if via == "acquire" and not result.handed_over:
            c.lo, c.hi = t0 + c.ttl, t1 + c.ttl
            self._log(f"{c.name} granted slot {c.slot!r}, fence {fence}, {self._lease(c)}")
            return
        # Handed over under a short claim: the holder extends it at once (as throttle does).
        claim = min(c.ttl, self.subject.handoff_claim)
        c.lo, c.hi = (handover.deadline, handover.deadline) if handover else (t0, t1 + claim)
        self._log(f"{c.name} granted a handed-over slot {c.slot!r} ({via}), fence {fence}")
        # The claim may be over, or force-released: then the renewal finds the slot lost.
        live = handover is not None and not handover.revoked and handover.deadline > time.time() + MARGIN
        if not self._renew(c, c.ttl, "after the handoff", may_fail=True) and live:
            self._fail(
                LeaseTampered, f"{c.name} could not extend the slot handed to it though its claim was live"
            )

    # --- rules
    #
    # Rules draw from fixed strategies and have no preconditions: which callers a rule
    # applies to depends on the store's answers and on time, and hypothesis needs the same
    # draws when it replays a sequence. A rule draws ``pick``, an index into the callers it
    # applies to (in order of name), and does nothing when there are none.

    @initialize(concurrencies=st.lists(st.integers(1, 3), min_size=1, max_size=2))
    @deferred
    def setup(self, concurrencies: list[int]) -> None:
        for index, concurrency in enumerate(concurrencies):
            group = SlotGroup(f"props.{self.run_id}", str(index))
            self.groups.append(Group(group, concurrency))
        groups = ", ".join(f"{i}: concurrency {g.concurrency}" for i, g in enumerate(self.groups))
        self.trace.append(f"  groups {groups}")

    def _caller(self, pick: int, *states: str) -> Caller | None:
        candidates = [c for _, c in sorted(self.current.items()) if c.state in states]
        return candidates[pick % len(candidates)] if candidates else None

    # One argument, (group, ttl): hypothesis tries rules with fewer arguments first, and
    # arrivals are what makes contention.
    @rule(lease=st.tuples(st.sampled_from([0, 1]), st.sampled_from(TTLS)))
    @deferred
    def arrive(self, lease: tuple[int, float]) -> None:
        """A new caller (the first free name, a fresh token) asks for a slot of group
        ``lease[0]`` with a lease of ``lease[1]`` seconds."""
        group, ttl = lease
        busy = {who for who, c in self.current.items() if c.state in ("holding", "waiting")}
        free = [who for who in CALLERS if who not in busy]
        if not free:
            self._begin("every caller holds or waits: no arrival")
            return
        c = self._new_caller(free[0], group, ttl)
        self._begin(f"{c.name} arrives: acquire group {c.group}, ttl {c.ttl}")
        self._acquire(c)

    @rule(pick=PICK)
    @deferred
    def attempt(self, pick: int) -> None:
        """A waiter attempts again (same token, same lease length)."""
        c = self._caller(pick, "waiting")
        if c is None:
            self._begin("nobody waits: no attempt")
            return
        self._begin(f"{c.name} attempts again: acquire group {c.group}, ttl {c.ttl}")
        self._acquire(c)

    def _acquire(self, c: Caller) -> None:
        g = self.groups[c.group]
        before = self.last
        t0 = time.time()
        result = self.subject.acquire(g.group, c.token, g.concurrency, c.ttl, self._metadata(c))
        t1 = time.time()
        if result.acquired:
            self._granted(c, result, t0, t1, "acquire")
            return
        handover = c.handover
        if handover is not None and not handover.revoked and handover.deadline > t1 + MARGIN:
            self._fail(
                WrongHolder,
                f"acquire refused {c.name}, which the store lists as holding the slot handed to it",
            )
        if result.retry_after is not None and result.retry_after < 0:
            self._fail(ApiMismatch, f"acquire refused {c.name} with retry_after {result.retry_after}")
        window = self._window()
        if c.first_refusal is None or c.handover is not None:
            c.first_refusal, c.in_order = t0, True
        elif window is not None and t0 - c.last_attempt >= window - WAITER_MARGIN:
            c.in_order = False  # it may have dropped out of line and joined again at the back
        c.state, c.last_attempt, c.handover = "waiting", t0, None
        self._log(f"{c.name} refused (retry_after {result.retry_after}): waits")
        if before is not None:
            self._check_refusal(c, before, t0)

    def _check_refusal(self, c: Caller, before: Snapshot, at: float) -> None:
        """Refused: then the slots free at the last listing were all for waiters ahead."""
        g = self.groups[c.group]
        free = g.concurrency - len(before.live(c.group))
        ahead = [
            w
            for w in self._group_callers(c.group)
            if w is not c
            and self._maybe_live_waiter(w, at)
            and (not (w.in_order and c.in_order) or (w.first_refusal or 0) < (c.first_refusal or at))
        ]
        if free > len(ahead):
            names = ", ".join(w.name for w in ahead) or "none"
            self._fail(
                NotFifo,
                f"acquire refused {c.name} though {free} of {g.concurrency} slots were free at the last "
                f"listing (t={self._t(before.after)}) and live waiters ahead of it: {names}",
            )

    @rule(pick=PICK)
    @deferred
    def release(self, pick: int) -> None:
        c = self._caller(pick, "holding")
        if c is None:
            self._begin("nobody holds a slot: no release")
            return
        g = self.groups[c.group]
        self._begin(f"{c.name} releases slot {c.slot!r}")
        released = self.subject.release(g.group, c.token, c.slot)
        t1 = time.time()
        if not released and c.lo > t1 + MARGIN:
            self._fail(LeaseTampered, f"release of {c.name}'s live lease ({self._lease(c)}) freed nothing")
        c.state = "done"
        self._log(f"{c.name} released: {released}")

    @rule(pick=PICK, ttl=st.sampled_from(TTLS))
    @deferred
    def renew(self, pick: int, ttl: float) -> None:
        """A holder renews with another lease length (its renewer keeps renewing with it)."""
        c = self._caller(pick, "holding")
        if c is None:
            self._begin("nobody holds a slot: no renew")
            return
        self._begin(f"{c.name} renews with ttl {ttl}")
        if c.state == "holding":  # (the renewer may have found it lost just now)
            self._renew(c, ttl, "renew")

    @rule(pick=PICK)
    @deferred
    def crash(self, pick: int) -> None:
        """A holder stops renewing (and never releases); a waiter stops attempting."""
        c = self._caller(pick, "holding", "waiting")
        if c is None:
            self._begin("nobody holds or waits: no crash")
            return
        c.state = "crashed" if c.state == "holding" else "abandoned"
        self._begin(
            f"{c.name} crashes: stops renewing ({self._lease(c)})"
            if c.state == "crashed"
            else f"{c.name} crashes: stops attempting"
        )

    @rule(pick=PICK, timeout=st.sampled_from((*WAITS, None)))
    @deferred
    def wait(self, pick: int, timeout: float | None) -> None:
        """A waiter blocks briefly in ``wait_for_release``, or (``timeout=None``) gives up:
        ``cancel_wait``, keeping a slot handed to it meanwhile."""
        c = self._caller(pick, "waiting")
        if c is None:
            self._begin("nobody waits: no wait")
            return
        g = self.groups[c.group]
        call = "wait_for_release" if timeout is not None else "cancel_wait"
        if timeout is None:
            self._begin(f"{c.name} gives up waiting (cancel_wait)")
        else:
            self._begin(f"{c.name} waits up to {timeout}s for a release", blocking=timeout)
        t0 = time.time()
        if timeout is None:
            result = self.subject.cancel_wait(g.group, c.token)
        else:
            result = self.subject.wait_for_release(g.group, c.token, timeout)
        t1 = time.time()
        if result is not None:
            if not result.acquired:
                self._fail(ApiMismatch, f"{call} returned a refusal {result!r}: a grant or None expected")
            self._granted(c, result, t0, t1, call)
            return
        handover = c.handover
        live_claim = handover is not None and not handover.revoked and handover.deadline > t1 + MARGIN
        if live_claim and (timeout is None or self.subject.wakes_waiters):
            self._fail(
                WrongHolder,
                f"{call} returned nothing, yet the store lists {c.name} holding a slot handed to it",
            )
        if timeout is None:
            c.state = "done"
            self._log(f"{c.name} left the line")
        else:
            self._log(f"{c.name} woke without a slot")

    @rule(group=st.sampled_from([0, 1]), pick=PICK)
    @deferred
    def force_release(self, group: int, pick: int) -> None:
        """An operator force-releases a listed holder (the admin's button)."""
        index = group % len(self.groups)
        g = self.groups[index]
        listed = [s for s in self.subject.held_slots() if s.group == g.group and s.lease_deadline > s.now]
        if not listed:
            self._begin(f"operator: no live holder in group {index} to force-release")
            return
        slot = sorted(listed, key=lambda s: s.token)[pick % len(listed)]
        c = self.by_token.get(slot.token)
        name = c.name if c else slot.token
        self._begin(f"operator force-releases {name} (group {index}, slot {slot.slot!r})")
        released = self.subject.release(g.group, slot.token, slot.slot)
        t1 = time.time()
        if not released and slot.lease_deadline > t1 + MARGIN:
            self._fail(LeaseTampered, f"force release of {name}'s live lease freed nothing")
        self._log(f"force release of {name}: {released}")
        if c is None:
            return
        if c.state == "holding":
            # Its renewer finds out at its next renewal: the lease is lost.
            if self.subject.renew(g.group, c.token, c.slot, c.ttl):
                self._fail(LeaseTampered, f"{c.name} renewed its lease after an operator force-released it")
            self._log(f"{c.name}'s next renew fails: lease lost")
            c.state = "lost"
        elif c.state == "crashed":
            c.state = "done"
        elif c.handover is not None:
            c.handover.revoked = True

    def _next_lapse(self) -> tuple[float, str] | None:
        """The earliest end of a lease nobody renews, if it is due within ``MAX_LAPSE``."""
        now = time.time()
        ends = [(c.hi, c.name) for c in self._callers("crashed")]
        ends += [
            (c.handover.deadline, f"{c.name}'s handed-over claim")
            for c in self._callers("waiting", "abandoned")
            if c.handover is not None and not c.handover.revoked
        ]
        due = [(end, name) for end, name in ends if now - LAPSE_PAST < end <= now + MAX_LAPSE]
        return min(due) if due else None

    @rule(zombie=st.booleans())
    @deferred
    def let_leases_lapse(self, zombie: bool) -> None:
        """Sleep just past the earliest end of a lease nobody renews (the renewer keeps the
        others). With ``zombie``, a crashed holder whose lease ran out (or one that lost it)
        then comes back: its renewal must fail, its release must be harmless."""
        lapse = self._next_lapse()
        if lapse is not None:
            end, name = lapse
            self._begin(f"time passes: until just after {name} ends (t={self._t(end)})")
            target = end + LAPSE_PAST
            while (now := time.time()) < target:
                due = [c.lo - RENEW_AHEAD for c in self._callers("holding")]
                time.sleep(max(0.0, min([target, *due]) - now))
                self._renew_due(RENEW_AHEAD + 0.01)
        elif not zombie:
            self._begin("no lease to let lapse")
            return
        if zombie:
            now = time.time()
            zombies = [
                c
                for _, c in sorted(self.current.items())
                if c.state == "lost" or (c.state == "crashed" and c.hi + MARGIN < now)
            ]
            if lapse is None:
                self._begin("a zombie comes back" if zombies else "no lease to let lapse, no zombie")
            for c in zombies[:1]:
                self._zombie(c)

    def _zombie(self, c: Caller) -> None:
        g = self.groups[c.group]
        self._log(f"{c.name} comes back: renews, then releases")
        if self.subject.renew(g.group, c.token, c.slot, c.ttl):
            self._fail(LeaseTampered, f"{c.name} renewed a lease that was over ({self._lease(c)}) or lost")
        released = self.subject.release(g.group, c.token, c.slot)
        c.state = "done"
        self._log(f"{c.name}: renew failed, release {released}")

    # --- invariants

    def _snapshot(self) -> Snapshot:
        snap = Snapshot(before=time.time(), after=0.0)
        index_of = {g.group: i for i, g in enumerate(self.groups)}
        snap.slots = {i: [] for i in range(len(self.groups))}
        for slot in self.subject.held_slots():
            if slot.group in index_of:
                snap.slots[index_of[slot.group]].append(slot)
        for i, g in enumerate(self.groups):
            snap.lines[i] = self.subject.waiting(g.group)
        snap.after = time.time()
        return snap

    @invariant()
    @deferred
    def protocol_holds(self) -> None:
        if not self.groups:
            return
        snap = self._snapshot()
        for index in range(len(self.groups)):
            self._detect_handovers(index, snap)
        for index in range(len(self.groups)):
            self._check_group(index, snap)
        self._check_pending(snap)
        self.pending.clear()
        self.last = snap

    def _detect_handovers(self, index: int, snap: Snapshot) -> None:
        window = self._window()
        for slot in snap.live(index):
            c = self.by_token.get(slot.token)
            if c is None or not c.in_line:
                continue
            fence = getattr(slot, "fencing_token", None)  # (None: the store records none)
            c.handover = Handover(self.step, slot.lease_deadline, fence)
            self._log(
                f"(store) handed {c.name} a slot: claim until t={self._t(slot.lease_deadline)}, fence {fence}"
            )
            if window is not None and self.step_started - c.last_attempt > window + WAITER_MARGIN:
                self._fail(
                    WrongHolder,
                    f"a slot was handed to {c.name}, which stopped attempting at t={self._t(c.last_attempt)} "
                    f"(longer ago than the waiter window of {window}s)",
                )
            if fence is not None:
                self._fence_event(index, self.step, fence, c, "handoff")
            if c.in_order and c.first_refusal is not None:
                self.pending.append(PendingGrant(c, c.first_refusal, self.step_started))
            c.first_refusal = None

    def _check_group(self, index: int, snap: Snapshot) -> None:
        g = self.groups[index]
        listed = {slot.token: slot for slot in snap.slots[index]}
        live = snap.live(index)
        tokens = Counter(slot.token for slot in snap.slots[index])
        twice = [self._name(t) for t, n in tokens.items() if n > 1]
        if twice:
            self._fail(TooManyHolders, f"group {index}: {', '.join(twice)} hold(s) more than one slot")
        if len(live) > g.concurrency:
            holders = ", ".join(f"{self._name(s.token)} (until t={self._t(s.lease_deadline)})" for s in live)
            self._fail(
                TooManyHolders,
                f"group {index}: {len(live)} live leases, concurrency {g.concurrency}: {holders}",
            )
        for slot in live:
            c = self.by_token.get(slot.token)
            if c is not None and (slot.acquired_at not in c.sent or slot.concurrency != g.concurrency):
                self._fail(
                    WrongMetadata,
                    f"group {index}: {c.name}'s slot is listed with metadata it never sent "
                    f"(acquired_at {slot.acquired_at}, concurrency {slot.concurrency})",
                )
            if c is None:
                self._fail(WrongHolder, f"group {index}: unknown token {slot.token!r} holds a slot")
            elif not c.may_hold:
                self._fail(
                    WrongHolder, f"group {index}: {c.name} ({c.state}) holds a slot it never got or gave back"
                )
        for c in self._group_callers(index):
            self._check_lease(index, c, listed.get(c.token), snap)
        problems = self.subject.record_problems(g.group, live)
        if problems:
            self._fail(RecordsExpire, f"group {index}: " + "; ".join(problems))
        line = snap.lines[index]
        if line is not None:
            self._check_line(index, line, live, snap)

    def _name(self, token: str) -> str:
        c = self.by_token.get(token)
        return c.name if c else token

    def _check_lease(self, index: int, c: Caller, slot: HeldSlot | None, snap: Snapshot) -> None:
        if c.state in ("holding", "crashed"):
            lo, hi, what = c.lo, c.hi, f"{c.name}'s lease ({self._lease(c)})"
        elif c.handover is not None and not c.handover.revoked:
            lo = hi = c.handover.deadline
            what = f"the claim handed to {c.name} (until t={self._t(lo)})"
        else:
            return
        if slot is None:
            if lo > snap.after + MARGIN:
                self._fail(LeaseTampered, f"group {index}: {what} is live but missing from the store")
            return
        if not lo - TOL <= slot.lease_deadline <= hi + TOL:
            change = "shortened" if slot.lease_deadline < lo else "extended"
            self._fail(
                LeaseTampered,
                f"group {index}: {what} was {change} by someone else: the store has it until "
                f"t={self._t(slot.lease_deadline)}",
            )
        fence = getattr(slot, "fencing_token", None)
        if c.fence is not None and fence is not None and fence != c.fence:
            self._fail(
                FencingBroken, f"group {index}: {c.name}'s fencing token changed from {c.fence} to {fence}"
            )

    def _check_line(self, index: int, line: list[str], live: list[HeldSlot], snap: Snapshot) -> None:
        holding = {slot.token for slot in live}
        for token in line:
            c = self.by_token.get(token)
            if token in holding:
                names = [self._name(t) for t in line]
                self._fail(
                    LineBroken,
                    f"group {index}: {self._name(token)} holds a slot and is still in line {names}",
                )
            if c is None or not c.in_line:
                state = c.state if c else "unknown"
                self._fail(
                    LineBroken, f"group {index}: {self._name(token)} ({state}) is in line but not waiting"
                )
            window = self._window()
            if window is not None and snap.before - c.last_attempt > window + WAITER_MARGIN:
                self._fail(
                    LineBroken,
                    f"group {index}: {c.name} stopped attempting at t={self._t(c.last_attempt)}, "
                    f"yet is still a live waiter",
                )
        names = [self._name(t) for t in line]
        for c in self._group_callers(index):
            if self._surely_live_waiter(c, snap.after) and c.token not in line:
                self._fail(
                    LineBroken,
                    f"group {index}: live waiter {c.name} (last attempt t={self._t(c.last_attempt)}) "
                    f"is missing from the line {names}",
                )
        self._check_line_order(index, line)

    def _check_line_order(self, index: int, line: list[str]) -> None:
        names = [self._name(t) for t in line]
        ordered = [self.by_token[t] for t in line if self.by_token[t].in_order]
        for first, second in itertools.pairwise(ordered):
            if (first.first_refusal or 0) > (second.first_refusal or 0):
                self._fail(
                    NotFifo,
                    f"group {index}: line {names} is not in order of arrival: {second.name} joined at "
                    f"t={self._t(second.first_refusal or 0)}, before {first.name} "
                    f"(t={self._t(first.first_refusal or 0)})",
                )

    def _check_pending(self, snap: Snapshot) -> None:
        for grant in self.pending:
            c, index = grant.caller, grant.caller.group
            g = self.groups[index]
            free = g.concurrency - len(snap.live(index))
            earlier = [
                w
                for w in self._group_callers(index)
                if w is not c
                and w.in_order
                and w.first_refusal is not None
                and w.first_refusal < grant.arrival
                and self._surely_live_waiter(w, grant.at)
            ]
            if len(earlier) > free:
                names = ", ".join(f"{w.name} (since t={self._t(w.first_refusal or 0)})" for w in earlier)
                self._fail(
                    NotFifo,
                    f"group {index}: FIFO: {c.name} (arrived t={self._t(grant.arrival)}) got a slot while "
                    f"earlier live waiters still wait with {max(free, 0)} slot(s) free: {names}",
                )


def machine_for(label: str, make_subject: Callable[[], Subject]) -> type[ThrottleMachine]:
    """A state machine class on one backend (its name shows in hypothesis' output)."""
    name = "".join(part.capitalize() for part in label.replace("_", "-").split("-")) + "ThrottleMachine"
    return type(name, (ThrottleMachine,), {"make_subject": staticmethod(make_subject)})


# --- Backends on real stores ---------------------------------------------------------------


def redis_subject(url: str, subject_class: type[RedisSubject] = RedisSubject) -> RedisSubject:
    """The Redis backend on a raw client, under a fresh key prefix (deleted afterwards)."""
    import redis

    from task_workflow.throttle import RedisThrottleBackend

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    prefix = f"tw-props:{uuid.uuid4().hex}:"

    def cleanup() -> None:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()

    return subject_class(RedisThrottleBackend(client, prefix), cleanup=cleanup)


def database_subject(table: str, label: str) -> Subject:
    """The DatabaseCache backend on ``table`` of the default database (Django is set up and
    the table exists), under a fresh key prefix (its rows deleted afterwards)."""
    from django.core.cache.backends.db import DatabaseCache

    from task_workflow.throttle import DatabaseCacheThrottleBackend

    # No culling: DatabaseCache deletes live entries once it holds more than MAX_ENTRIES.
    cache = DatabaseCache(table, {"KEY_PREFIX": uuid.uuid4().hex, "OPTIONS": {"MAX_ENTRIES": 10**9}})
    backend = DatabaseCacheThrottleBackend(cache)

    def cleanup() -> None:
        close = getattr(backend, "close", None)  # its own connections, where it keeps any
        if close is not None:
            close()
        cache.clear()

    return Subject(backend, label, cleanup=cleanup)
