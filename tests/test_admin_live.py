"""In Chromium: the admin's change form tells of another user's save at once, and refuses a stale save.

Three browser contexts, each logged in as another user: two who may change groups, one who may
not even see them (who must learn nothing). Screenshots of each state go to docs/img/ when
REALTIME_SCREENSHOTS is set. Skips without Chromium, as tests/test_browser.py does.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.test_browser import SCREENSHOTS, browser, realtime_site  # noqa: F401  (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)

WAIT = 15_000  # ms: generous, the machine is shared
RECORD_EVENTS = """
window.__events = [];
window.__errors = [];
document.addEventListener("realtime:event", (e) => window.__events.push(e.detail));
document.addEventListener("realtime:error", (e) => window.__errors.push(e.detail));
"""


@pytest.fixture
def people(transactional_db):
    """Users and a group, made before Playwright starts (its loop forbids ORM calls in this thread)."""
    from django.contrib.auth.models import Group

    from tests.helpers import make_user

    group = Group.objects.create(name="Night shift")
    make_user("alice", staff=True, perms=("auth.view_group", "auth.change_group", "auth.delete_group"))
    make_user("editor", staff=True, perms=("auth.view_group", "auth.change_group", "auth.delete_group"))
    outsider = make_user("outsider", staff=True, perms=("auth.view_user",))
    return {"group": group.pk, "outsider": outsider.pk}


def login(browser, base: str, username: str, **context_options):  # noqa: F811
    context = browser.new_context(**context_options)
    context.add_init_script(RECORD_EVENTS)
    page = context.new_page()
    page.goto(f"{base}/admin/login/?next=/admin/")
    page.fill("#id_username", username)
    page.fill("#id_password", "pw-" + username)
    page.click("input[type=submit]")
    page.wait_for_url(f"{base}/admin/")
    return page


def wait_open(page) -> None:
    page.wait_for_function("window.realtimeAdmin && window.realtimeAdmin.state === 'open'", timeout=WAIT)


def open_live(browser, base: str, username: str, url: str | None = None, **context_options):  # noqa: F811
    """Log ``username`` in, open ``url`` (else stay on the admin index) and wait for its live client."""
    page = login(browser, base, username, **context_options)
    if url is not None:
        page.goto(url)
    wait_open(page)
    return page


def in_thread(function, *args):
    """Run ORM code outside Playwright's event loop thread."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(function, *args).result()


def shoot(page, name: str) -> None:
    if os.environ.get("REALTIME_SCREENSHOTS"):
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOTS / name), full_page=True)


def publish_sentinel(user_id: int) -> None:
    from django.db import connection

    from realtime import publish

    publish("sentinel", {}, users=[user_id])
    connection.close()


def test_edit_conflict_notice_and_stale_save(realtime_site, people, browser):  # noqa: F811
    """alice and editor edit one group; editor saves: alice sees who and when, and must confirm to save hers."""
    base = realtime_site.url
    url = f"{base}/admin/auth/group/{people['group']}/change/"

    alice = open_live(browser, base, "alice", url)
    editor = open_live(browser, base, "editor", url)
    outsider = open_live(browser, base, "outsider")
    # The outsider may not even subscribe to the group's topic.
    outsider.evaluate(f"window.realtimeAdmin.subscribe('model:auth.group:{people['group']}')")
    outsider.wait_for_function("window.__errors.some((e) => e.code === 'forbidden')", timeout=WAIT)

    shoot(alice, "admin-change-form-before.png")
    alice.fill("#id_name", "Night shift (alice)")
    editor.fill("#id_name", "Late shift")
    editor.click("input[name=_continue]")
    editor.wait_for_selector("ul.messagelist li.success", timeout=WAIT)

    notice = alice.wait_for_selector("#realtime-conflict li.warning", timeout=WAIT)
    text = notice.inner_text()
    assert re.fullmatch(
        r"Changed by editor at \d\d:\d\d — your save would overwrite it: reload, or keep editing\. "
        r"Open the current version in a new tab\.",
        text.strip(),
    ), text
    new_tab = alice.locator("#realtime-conflict a[target=_blank]")
    assert new_tab.get_attribute("href") == f"/admin/auth/group/{people['group']}/change/"
    assert new_tab.get_attribute("rel") == "noopener"
    assert alice.input_value("#id_name") == "Night shift (alice)"  # the edit in progress is kept
    # The editor's own page, reloaded after the save, has no notice.
    assert editor.query_selector("#realtime-conflict") is None
    shoot(alice, "admin-conflict-notice.png")

    alice.click("input[name=_save]")
    alice.wait_for_selector(".errornote", timeout=WAIT)
    errors = alice.inner_text(".errorlist.nonfield")
    assert re.search(r"editor changed this group at \d\d:\d\d, after you opened this page", errors), errors
    # The refused page still knows of the change (replayed from the page's first load).
    alice.wait_for_selector("#realtime-conflict li.warning", timeout=WAIT)
    shoot(alice, "admin-stale-save-refused.png")
    alice.check("input[name=_realtime_overwrite]")
    alice.click("input[name=_save]")
    alice.wait_for_url(f"{base}/admin/auth/group/", timeout=WAIT)

    # The outsider learned nothing: a sentinel published after all of it arrives alone.
    in_thread(publish_sentinel, people["outsider"])
    outsider.wait_for_function("window.__events.some((e) => e.event === 'sentinel')", timeout=WAIT)
    events = outsider.evaluate("window.__events")
    assert [e["event"] for e in events] == ["sentinel"], events
    assert outsider.query_selector(".realtime-toast") is None


def test_deletion_notice_in_dark_mode_on_a_narrow_screen(realtime_site, people, browser):  # noqa: F811
    """On a phone-sized screen in dark mode, a deletion by another user shows in the form, readable."""
    base = realtime_site.url
    url = f"{base}/admin/auth/group/{people['group']}/change/"
    alice = open_live(browser, base, "alice", url, color_scheme="dark", viewport={"width": 390, "height": 844})
    editor = login(browser, base, "editor")
    editor.goto(f"{url.removesuffix('change/')}delete/")
    editor.click("input[type=submit]")
    editor.wait_for_url(f"{base}/admin/auth/group/", timeout=WAIT)

    notice = alice.wait_for_selector("#realtime-conflict li.warning", timeout=WAIT)
    assert re.fullmatch(
        r"Deleted by editor at \d\d:\d\d — this object no longer exists: your changes cannot be saved\.",
        notice.inner_text().strip(),
    )
    # Dark mode: the notice uses the admin's dark colours, and fits the narrow screen.
    colours = alice.evaluate(
        """() => {
          const li = document.querySelector('#realtime-conflict li');
          const style = getComputedStyle(li);
          return {bg: style.backgroundColor, fg: style.color, right: li.getBoundingClientRect().right,
                  width: document.documentElement.clientWidth};
        }"""
    )
    assert colours["bg"] != "rgb(255, 255, 204)", colours  # not the light theme's warning yellow
    assert colours["right"] <= colours["width"], colours
    shoot(alice, "admin-conflict-dark-narrow.png")


@pytest.fixture
def presence_site(live_server, settings, transactional_db):
    """The live server and a worker that announce model topics (PRESENCE_TOPICS), with fast presence rounds."""
    from tests.helpers import start_worker

    options = {"PRESENCE_TOPICS": ["model:*"], "PRESENCE_INTERVAL": 0.5}
    worker = start_worker(realtime=options)
    settings.REALTIME = {"URL": worker.url, **options}
    try:
        yield live_server
    finally:
        worker.stop()


def test_who_else_is_here(presence_site, people, browser):  # noqa: F811
    """Each of two editors of one group sees the other, with since when; the one who leaves disappears."""
    base = presence_site.url
    url = f"{base}/admin/auth/group/{people['group']}/change/"
    alice = open_live(browser, base, "alice", url)
    editor = open_live(browser, base, "editor", url)

    line = alice.wait_for_selector("#realtime-present:not([hidden])", timeout=WAIT)
    assert re.fullmatch(r"Also here: editor since \d\d:\d\d", line.inner_text().strip()), line.inner_text()
    line = editor.wait_for_selector("#realtime-present:not([hidden])", timeout=WAIT)
    assert re.fullmatch(r"Also here: alice since \d\d:\d\d", line.inner_text().strip()), line.inner_text()
    shoot(alice, "admin-who-else-is-here.png")

    editor.context.close()  # closing the tab ends the connection: a presence.leave follows
    alice.wait_for_selector("#realtime-present[hidden]", state="attached", timeout=WAIT)


def publish_and_prune() -> None:
    """Commit an event, then prune every event: a page rendered before can no longer be replayed to."""
    from django.db import connection

    from realtime import publish, retention

    publish("noise", {}, everyone=True)
    assert retention.prune(0) >= 1
    connection.close()


@pytest.mark.parametrize(
    ("path", "text"),
    [
        ("/admin/auth/group/{pk}/change/", "to tell whether others changed this object since"),
        ("/admin/auth/group/", "to tell what others changed since"),
        ("/admin/", "to show every action since"),
    ],
)
def test_a_page_that_missed_more_than_retention_asks_for_a_reload(realtime_site, people, browser, path, text):  # noqa: F811
    """A page rendered before the events after it were pruned gets a reset: it says so and offers a reload."""
    base = realtime_site.url
    alice = login(browser, base, "alice")
    # The page connects only after the prune.
    alice.context.route("**/realtime/token/", lambda route: route.abort())
    alice.goto(base + path.format(pk=people["group"]))
    in_thread(publish_and_prune)
    alice.context.unroute("**/realtime/token/")
    wait_open(alice)
    item = alice.wait_for_selector("#realtime-reset li.warning[data-reset=yes]", timeout=WAIT)
    kind = "list" if path.endswith("group/") else "page"
    assert item.inner_text().strip() == f"This {kind} was opened too long ago {text}: reload."
    if kind == "list":
        shoot(alice, "admin-reset-list.png")
    assert alice.get_attribute("#realtime-reset a", "href") == path.format(pk=people["group"])


def test_delete_page_notice_and_a_delete_confirmed_before_the_change_asked_again(realtime_site, people, browser):  # noqa: F811
    """alice is on the delete page when editor renames the group: a notice says so, and her
    confirmation brings her back to the page as it is now, where a second confirmation deletes."""
    base = realtime_site.url
    url = f"{base}/admin/auth/group/{people['group']}/delete/"
    alice = open_live(browser, base, "alice", url)
    editor = login(browser, base, "editor")
    rename_group(editor, base, people["group"], "Night shift (keep)")

    notice = alice.wait_for_selector("#realtime-conflict li.warning", timeout=WAIT)
    text = notice.inner_text().strip()
    assert re.fullmatch(r"Changed by editor at \d\d:\d\d — check what you are deleting: reload\.", text), text
    shoot(alice, "admin-delete-notice.png")
    alice.click("#content form input[type=submit]")
    message = alice.wait_for_selector("ul.messagelist li.warning", timeout=WAIT)
    assert "This group was changed by editor at" in message.inner_text()
    assert "Night shift (keep)" in alice.inner_text("#content")
    shoot(alice, "admin-delete-asked-again.png")
    wait_open(alice)
    alice.click("#content form input[type=submit]")
    alice.wait_for_url(f"{base}/admin/auth/group/", timeout=WAIT)
    assert "was deleted successfully" in alice.inner_text("ul.messagelist")


def rename_group(page, base: str, pk: int, name: str) -> None:
    page.goto(f"{base}/admin/auth/group/{pk}/change/")
    page.fill("#id_name", name)
    page.click("input[name=_save]")
    page.wait_for_url(f"{base}/admin/auth/group/", timeout=WAIT)
