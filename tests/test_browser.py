"""In a real browser: the demo page shows another user's admin change live, and the admin toasts it.

Needs Playwright (in requirements.txt) and Debian's Chromium at /usr/bin/chromium; without
Chromium these tests skip with that reason, except where REALTIME_REQUIRE_BROWSER=1 (CI),
where a missing browser is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import BASE_DIR, database_url_for_tests, start_worker

CHROMIUM = os.environ.get("REALTIME_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "docs" / "img"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = pytest.mark.django_db(transaction=True)


def unavailable(reason: str) -> None:
    """Skip locally; fail where browsers are required (CI sets REALTIME_REQUIRE_BROWSER=1)."""
    if os.environ.get("REALTIME_REQUIRE_BROWSER"):
        pytest.fail(f"browser tests are required here, but {reason}")
    pytest.skip(reason)


@pytest.fixture
def browser() -> Iterator[object]:
    if not shutil.which(CHROMIUM):
        unavailable(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright import sync_api
    except ImportError:
        unavailable("Playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def realtime_site(live_server, worker, settings):
    """The live Django server, whose token view points browsers at the test worker."""
    settings.REALTIME = {"URL": worker.url}
    return live_server


def admin_login(browser, base_url: str, username: str, password: str):
    page = browser.new_context().new_page()
    page.goto(f"{base_url}/admin/login/?next=/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    page.click("input[type=submit]")
    page.wait_for_url(f"{base_url}/admin/")
    return page


@pytest.fixture
def superusers(transactional_db) -> None:
    # Created before Playwright starts: its sync API runs an event loop in this thread,
    # and Django refuses ORM calls from a thread with a running loop.
    from django.contrib.auth import get_user_model

    User = get_user_model()
    User.objects.create_superuser("watcher", "w@example.com", "watcher-pw")
    User.objects.create_superuser("editor", "e@example.com", "editor-pw")


def test_admin_change_appears_live_on_another_users_page(realtime_site, superusers, browser):
    """User A watches /realtime/ while user B adds a group in the admin: A's page and A's admin show it."""
    base = realtime_site.url

    watcher = admin_login(browser, base, "watcher", "watcher-pw")
    watcher.goto(f"{base}/realtime/")
    watcher.wait_for_selector("#state[data-state=open]", timeout=10_000)

    # A second admin page of the watcher, to see the toast.
    toast_page = watcher.context.new_page()
    toast_page.goto(f"{base}/admin/")

    editor = admin_login(browser, base, "editor", "editor-pw")
    editor.goto(f"{base}/admin/auth/group/add/")
    editor.fill("#id_name", "Night shift")
    editor.click("input[name=_save]")

    item = watcher.wait_for_selector("li.event", timeout=10_000)
    text = item.inner_text()
    assert "admin.logentry" in text
    assert "editor: addition of auth.group “Night shift”" in text

    toast = toast_page.wait_for_selector(".realtime-toast", timeout=10_000)
    assert "editor: addition of auth.group “Night shift”" in toast.inner_text()

    if os.environ.get("REALTIME_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        watcher.screenshot(path=str(SCREENSHOTS / "demo-page.png"))
        toast_page.screenshot(path=str(SCREENSHOTS / "admin-toast.png"))


def test_page_recovers_after_worker_restart_and_shows_missed_events(realtime_site, superusers, browser, worker):
    """The JS client reconnects on its own after the worker restarts and replays what it missed, once, in order."""
    base = realtime_site.url
    page = admin_login(browser, base, "watcher", "watcher-pw")
    page.goto(f"{base}/realtime/")
    page.wait_for_selector("#state[data-state=open]", timeout=10_000)

    worker.stop()
    page.wait_for_selector("#state[data-state=closed], #state[data-state=connecting]", timeout=10_000)
    # Published while no worker runs: only the outbox has them.
    publish_script = "from realtime import publish\nfor n in range(3): publish('missed', {'n': n}, everyone=True)\n"
    subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", publish_script],
        cwd=BASE_DIR,
        env={**os.environ, "DATABASE_URL": database_url_for_tests()},
        check=True,
        timeout=60,
    )
    restarted = start_worker(port=worker.port)
    try:
        page.wait_for_function("document.querySelectorAll('li.event').length >= 3", timeout=20_000)
        page.wait_for_selector("#state[data-state=open]")
        ids = page.eval_on_selector_all("li.event", "items => items.map(item => Number(item.dataset.id))")
        texts = page.eval_on_selector_all("li.event strong", "items => items.map(item => item.textContent)")
        assert texts == ["missed"] * 3
        assert ids == sorted(ids, reverse=True)  # newest first on the page, no duplicate
        assert len(set(ids)) == 3
    finally:
        restarted.stop()


def test_logout_in_another_tab_disconnects_the_page(realtime_site, superusers, browser):
    """Logging out in a second tab closes the first tab's connection (4401) and its client stops."""
    base = realtime_site.url
    page = admin_login(browser, base, "watcher", "watcher-pw")
    page.goto(f"{base}/realtime/")
    page.wait_for_selector("#state[data-state=open]", timeout=10_000)
    other_tab = page.context.new_page()
    other_tab.goto(f"{base}/admin/")
    other_tab.click("#logout-form button")  # Django 5's admin logs out with a POST form
    other_tab.wait_for_url(f"{base}/admin/logout/")
    page.wait_for_selector("#state[data-state=stopped]", timeout=10_000)
