"""The admin in a real browser (Playwright driving Chromium) against a live server, with
a real Celery worker holding the throttle slot and running the example chain.

The live server runs in a thread of this process (pytest-django's ``live_server``); the
worker is the session's ``example_worker`` on the same test database, so the test commits
its rows (``transaction=True``). Waits are Celery events and Playwright's auto-waiting
assertions, never sleeps.

Screenshots go to ``test-artifacts/`` (throttle-locks.png, throttle-locks-1280.png,
release-confirm.png, instance-history.png, transition-form.png,
transition-form-refused.png), every page at 1280 px wide. With ``TW_DOCS_SCREENSHOTS=1``
the locks page (of the 1280 px test, with waiters) and the instance history are also
written to ``docs/`` for the README.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from django import forms
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.db import connections
from django.urls import reverse
from playwright.sync_api import Browser, Page, expect, sync_playwright

from example_project.models import Instance
from example_project.tasks import stop_instance
from task_workflow.models import TransitionRecord
from task_workflow.tasks import throttle
from task_workflow.throttle import HeldSlot, SlotGroup, get_backend
from tests.blocked_callers import let_blocked_callers_finish
from tests.testapp.tasks import hold_slot
from tests.waiting import wait_until
from tests.workers import ARTIFACTS_DIR, HANG_TIMEOUT, ROOT, WorkerProcess

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_DIR = ROOT / "docs"
PASSWORD = "correct horse battery staple"
#: Upper bound for a worker to pick up a task or run the example chain (~0.5 s).
TIMEOUT = HANG_TIMEOUT


def screenshot(page: Page, name: str, docs_name: str | None = None) -> Path:
    """Save a full-page screenshot to test-artifacts/ (and docs/ when asked)."""
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS_DIR / name
    page.screenshot(path=str(path), full_page=True)
    if docs_name and os.environ.get("TW_DOCS_SCREENSHOTS") == "1":
        DOCS_DIR.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS_DIR / docs_name)
    return path


@pytest.fixture
def browser(django_db_setup, live_server, transactional_db, monkeypatch) -> Iterator[Browser]:
    """Headless Chromium for one test.

    The session's live server is started after the test database exists, so it is
    stopped (closing its connections) before the database is dropped.

    Playwright's sync API keeps an asyncio loop running in this thread. Django then
    refuses ORM calls unless ``DJANGO_ALLOW_ASYNC_UNSAFE`` is set (the test body needs
    them; the loop never runs while they do), and it keeps such "async" calls' database
    connection apart from the thread's usual one: that second connection is closed here,
    before Playwright stops, or it would outlive the test and block dropping the test
    database. Chromium is set up after ``transactional_db``, so the flush at teardown runs
    on the usual connection with no loop around.
    """
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does)")
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
            connections.close_all()


@pytest.fixture
def page(browser, live_server) -> Iterator[Page]:
    """A page of a fresh browser context whose relative URLs go to the live server."""
    # 1280 px: the narrowest window the admin pages are made to fit.
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def superuser(django_user_model):
    return django_user_model.objects.create_superuser("ops", "ops@example.com", PASSWORD)


@pytest.fixture
def fresh_worker(example_worker) -> WorkerProcess:
    """The session's worker, restarted: its pool processes cache ``ContentType`` rows
    (``TransitionRecord`` needs them), and every transactional test's flush re-creates
    those rows with new ids, so a worker that recorded a transition in an earlier test
    fails the next one with a foreign key violation. Restarting empties the cache. (Not
    needed once worker processes clear that cache before each task, e.g. a
    ``task_prerun`` receiver calling ``ContentType.objects.clear_cache()``.)"""
    example_worker.stop()
    example_worker.process = None
    return example_worker.start()


def log_in(page: Page, user, *, sees_locks: bool = True) -> None:
    """Through the admin's login form, as a person would."""
    page.goto(f"{reverse('admin:login')}?next={reverse('admin:index')}")
    page.get_by_label("Username:").fill(user.get_username())
    page.get_by_label("Password:").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator("#user-tools")).to_contain_text(f"Welcome, {user.get_username()}")
    if sees_locks:
        expect(page.locator("div.app-task_workflow")).to_contain_text("Throttle locks")


def staff_user(django_user_model, username: str, *perms: str):
    """A staff user (not a superuser) with just these ``app_label.codename`` permissions."""
    user = django_user_model.objects.create_user(username, password=PASSWORD, is_staff=True)
    for perm in perms:
        app_label, codename = perm.split(".")
        user.user_permissions.add(
            Permission.objects.get(content_type__app_label=app_label, codename=codename)
        )
    return user


def wait_for_slot(task_id: str, timeout: float = TIMEOUT) -> HeldSlot:
    """The slot the task holds, once it appears in the backend (the task takes it right
    after it starts; this bounds the few milliseconds in between)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [slot for slot in get_backend().held_slots() if slot.task_id == task_id]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"task {task_id} took no throttle slot within {timeout}s"
        time.sleep(0.02)


def test_force_release_a_workers_slot_in_the_browser(
    page, superuser, example_worker, task_events, celery_app
):
    """A worker's task holds ops.demo[backend-1]: the operator finds the row (worker
    host, real task id), selects it, confirms, and the slot is gone; a second slot, held
    by this process, stays."""
    result = hold_slot.delay("ops.demo", "backend-1", 30)
    other = throttle(name="ops.report", concurrency=3, wait=0, ttl=900).acquire()
    try:
        task_events.wait_for_id(result.id, ("task-started",), timeout=TIMEOUT)
        slot = wait_for_slot(result.id)
        assert slot.hostname == example_worker.hostname

        log_in(page, superuser)
        page.locator("div.app-task_workflow").get_by_role("link", name="Throttle locks").click()
        expect(page).to_have_title("Throttle locks | Django site admin")
        row = page.locator(f'tr.tw-lock[data-task-id="{result.id}"]')
        expect(row).to_have_count(1)
        expect(row.locator("td").nth(1)).to_have_text("ops.demo")
        expect(row.locator("td").nth(2)).to_have_text("backend-1")
        expect(row.locator("td.tw-task-id code")).to_have_text(f"{result.id[:8]}…")
        expect(row.locator("td.tw-task-id code")).to_have_attribute("title", result.id)
        expect(row.locator("td.tw-host")).to_have_text(f"{example_worker.hostname} / {slot.pid}")
        expect(row.locator("td.tw-use")).to_have_text("1 of 1")
        groups = page.locator("#tw-groups")
        expect(groups.locator("tr", has_text="ops.demo")).to_contain_text("1 of 1")
        expect(groups.locator("tr", has_text="ops.report")).to_contain_text("1 of 3")
        screenshot(page, "throttle-locks.png")  # the docs' one is the 1280 px test's

        row.get_by_role("checkbox").check()
        page.get_by_role("button", name="Release selected locks…").click()
        expect(page).to_have_title("Release throttle locks? | Django site admin")
        expect(page.locator("#tw-release-list li")).to_have_count(1)
        expect(page.locator("#tw-release-list")).to_contain_text("ops.demo[backend-1]")
        screenshot(page, "release-confirm.png")
        assert slot.token in {s.token for s in get_backend().held_slots()}  # not before confirming

        page.get_by_role("button", name="Yes, release").click()
        expect(page.locator("ul.messagelist li.success")).to_have_text("Released 1 of 1 selected locks")
        expect(page.locator(f'tr.tw-lock[data-task-id="{result.id}"]')).to_have_count(0)
        expect(page.locator('tr.tw-lock[data-task="ops.report"]')).to_have_count(1)
        held = {s.token for s in get_backend().held_slots()}
        assert slot.token not in held
        assert other.token in held
    finally:
        other.release()
        # Do not leave the worker busy for the rest of the 30 s.
        celery_app.control.revoke(result.id, terminate=True)


def test_instance_history_after_the_stop_chain_in_the_browser(page, superuser, fresh_worker, task_events):
    """online -> stopping -> offline on the real worker; the change page shows the state
    badge, both transitions with the tasks that applied them, and the next buttons."""
    instance = Instance.objects.create(name="web-1", backend_id="i-0a1b2c3d", state=Instance.States.ONLINE)
    instance_uuid = str(instance.uuid)
    stop_instance.delay(instance_uuid)
    done = task_events.wait_for(
        "example.stop_instance_succeeded", args_contain=instance_uuid, timeout=TIMEOUT
    )
    first = task_events.wait_for("example.stop_instance", args_contain=instance_uuid, timeout=TIMEOUT)
    assert first.succeeded, first
    assert done.succeeded, done

    log_in(page, superuser)
    page.goto(reverse("admin:example_instance_change", args=[instance.pk]))
    expect(page.locator(".field-state_badge .tw-state")).to_have_text("offline")
    history = page.locator("#task_workflow-transitionrecord-content_type-object_id-group tr.has_original")
    expect(history).to_have_count(2)
    newest, oldest = history.nth(0), history.nth(1)
    expect(newest.locator("td.field-transition")).to_have_text("set_offline")
    expect(newest.locator("td.field-task_name")).to_have_text("example.stop_instance_succeeded")
    expect(newest.locator("td.field-task_id")).to_have_text(done.uuid)
    expect(oldest.locator("td.field-transition")).to_have_text("begin_stopping")
    expect(oldest.locator("td.field-source_state")).to_have_text("online")
    expect(oldest.locator("td.field-task_name")).to_have_text("example.stop_instance")
    expect(oldest.locator("td.field-task_id")).to_have_text(first.uuid)
    buttons = page.locator('button[name="_fsm_transition_to"]')
    expect(buttons).to_have_count(2)
    expect(page.get_by_role("button", name="begin_starting")).to_be_visible()
    expect(page.get_by_role("button", name="set_erred")).to_be_visible()
    screenshot(page, "instance-history.png", "admin-instance-history.png")


class ConfirmSetOffline(forms.Form):
    """A transition form without fields: the form view only asks to confirm."""


def test_transition_form_needs_change_permission_in_the_browser(
    browser, page, live_server, django_user_model, monkeypatch
):
    """The example's admin asks for a form before set_offline (django-fsm-2's ``fsm_forms``).
    A staff user who may only view instances sees no button, is refused the form page by
    URL (403) and a POST to it (403): the instance stays where it is. An engineer who may
    change instances presses the button, gets the form, applies it."""
    monkeypatch.setattr(admin.site.get_model_admin(Instance), "fsm_forms", {"set_offline": ConfirmSetOffline})
    instance = Instance.objects.create(name="web-2", backend_id="i-2", state=Instance.States.STOPPING)
    change = reverse("admin:example_instance_change", args=[instance.pk])
    form_url = reverse("admin:example_instance_transition", args=[instance.pk, "set_offline"])

    watcher = staff_user(django_user_model, "watcher", "example.view_instance")
    log_in(page, watcher, sees_locks=False)
    page.goto(change)
    expect(page.locator(".field-state_badge .tw-state")).to_have_text("stopping")
    expect(page.locator('button[name="_fsm_transition_to"]')).to_have_count(0)
    response = page.goto(form_url)
    assert response is not None
    assert response.status == 403
    expect(page.locator("body")).to_contain_text("403 Forbidden")
    expect(page.locator("body")).not_to_contain_text("Apply")
    screenshot(page, "transition-form-refused.png")
    # A POST with the session's CSRF token, as a hand-made form would send it.
    [csrf] = [c["value"] for c in page.context.cookies() if c["name"] == "csrftoken"]
    posted = page.request.post(
        f"{live_server.url}{form_url}",
        form={"csrfmiddlewaretoken": csrf},
        headers={"Referer": live_server.url},
    )
    assert posted.status == 403
    assert Instance.objects.get(pk=instance.pk).state == Instance.States.STOPPING
    assert not TransitionRecord.objects.exists()

    engineer = staff_user(django_user_model, "engineer", "example.view_instance", "example.change_instance")
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    try:
        other = context.new_page()
        log_in(other, engineer, sees_locks=False)
        other.goto(change)
        other.get_by_role("button", name="set_offline").click()
        expect(other).to_have_url(f"{live_server.url}{form_url}")
        expect(other.locator("#content h1")).to_have_text("set_offline")
        screenshot(other, "transition-form.png")
        other.get_by_role("button", name="Apply").click()
        expect(other).to_have_url(f"{live_server.url}{change}")
        expect(other.locator("ul.messagelist li.success")).to_have_text("Transition 'set_offline' applied.")
        expect(other.locator(".field-state_badge .tw-state")).to_have_text("offline")
    finally:
        context.close()
    [record] = TransitionRecord.objects.all()
    assert (record.transition, record.user) == ("set_offline", engineer)


#: Realistic worst cases: a long dotted task path, a Kubernetes pod's host name, a key
#: that names a tenant, region and zone.
LONG_TASK = "example_project.infrastructure.tasks.provision_dedicated_bare_metal_server"
LONG_HOST = "celery@worker-eu-west-1-production-pool-a-7f9c8d6b5-xk2lp.internal.example.com"
LONG_KEY = "tenant-5f3a9c1e-acme-corporation/region-eu-west-1/availability-zone-b"


def test_locks_page_fits_1280_pixels_with_waiters_in_the_browser(browser, live_server, superuser):
    """At a 1280 px wide window, 12 held slots of long task names, keys and host names and
    two callers waiting for one of them: the page does not scroll sideways, the locks table
    is no wider than the window, and the waiters are listed with their places in line."""
    backend = get_backend()
    written: list[tuple[SlotGroup, str]] = []
    for number in range(12):
        group = SlotGroup(f"{LONG_TASK}_{number:02d}", f"{LONG_KEY}-{number:02d}")
        token = uuid.uuid4().hex
        meta = {
            "task_name": group.task_name,
            "key": group.key,
            "concurrency": 1,
            "task_id": str(uuid.uuid4()),
            "hostname": LONG_HOST,
            "pid": 4_194_303,
            "ttl": 900.0,
            "acquired_at": time.time() - 3 * 3600 - 7 * 60,
        }
        assert backend.acquire(group, token, 1, 900.0, meta).acquired
        written.append((group, token))
    first_group = written[0][0]
    taken: list = []
    threads = []

    def waiters() -> list:
        return [call for call in backend.waiting_calls() if call.group == first_group]

    context = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 900})
    context.set_default_timeout(15_000)
    try:
        for count in (1, 2):
            limiter = throttle(key=first_group.key, name=first_group.task_name, wait=60, ttl=900)
            thread = threading.Thread(
                target=lambda limiter=limiter: taken.append(limiter.acquire()), daemon=True
            )
            thread.start()
            threads.append(thread)
            wait_until(lambda count=count: len(waiters()) == count, TIMEOUT, f"{count} caller(s) in line")

        page = context.new_page()
        log_in(page, superuser)
        page.goto(reverse("admin:task_workflow_throttlelock_changelist"))
        expect(page.locator("tr.tw-lock")).to_have_count(12)
        widths = page.evaluate(
            """() => ({
                page: document.documentElement.scrollWidth,
                window: window.innerWidth,
                locks: document.getElementById("result_list").getBoundingClientRect().right,
                waiters: document.getElementById("tw-waiters")?.getBoundingClientRect().right ?? 0,
            })"""
        )
        screenshot(page, "throttle-locks-1280.png", "admin-throttle-locks.png")
        assert widths["window"] == 1280
        assert widths["page"] <= 1280, f"the page scrolls sideways: {widths}"
        assert widths["locks"] <= 1280, f"the locks table is wider than the window: {widths}"
        assert widths["waiters"] <= 1280, f"the waiters table is wider than the window: {widths}"
        lines = page.locator("#tw-waiters tr.tw-waiter")
        expect(lines).to_have_count(2)
        expect(lines.nth(0).locator("td.tw-place")).to_have_text("1")
        expect(lines.nth(1).locator("td.tw-place")).to_have_text("2")
        expect(lines.nth(0)).to_contain_text(first_group.task_name)
        expect(lines.nth(0)).to_contain_text("ago")
    finally:
        context.close()
        for group, token in written:
            backend.release(group, token)
        let_blocked_callers_finish(threads, taken)
