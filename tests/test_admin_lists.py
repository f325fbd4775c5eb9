"""In Chromium: admin change lists keep up with others' changes; Recent actions and history update live.

Browser contexts logged in as different users: two who may change groups, one who may not even
see them (who must learn nothing: no highlight, no banner, no recent action). Screenshots of
each state go to docs/img/ when REALTIME_SCREENSHOTS is set. Skips without Chromium, as
tests/test_browser.py does.
"""

from __future__ import annotations

import re

import pytest

from tests.helpers import live_admin_state
from tests.test_admin_live import WAIT, in_thread, login, open_live, publish_sentinel, shoot, wait_open
from tests.test_admin_live import presence_site as presence_site  # (fixture)
from tests.test_browser import browser, realtime_site  # noqa: F401  (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)

GROUP_PERMS = ("auth.view_group", "auth.change_group", "auth.delete_group", "auth.add_group")


@pytest.fixture
def crew(transactional_db):
    """Three groups and three users, made before Playwright starts (its loop forbids ORM calls in this thread)."""
    from django.contrib.auth.models import Group

    from tests.helpers import make_user

    groups = {name: Group.objects.create(name=name).pk for name in ("Night shift", "Day shift", "Late shift")}
    Group.objects.create(name="Cleaners")  # filtered out of the list below by its search
    make_user("alice", staff=True, perms=GROUP_PERMS)
    make_user("editor", staff=True, perms=GROUP_PERMS)
    outsider = make_user("outsider", staff=True, perms=("auth.view_user",))
    return {"groups": groups, "outsider": outsider.pk}


def row(page, pk: int):
    return page.locator(f"#result_list tr:has(input.action-select[value='{pk}'])")


def rename(page, base: str, pk: int, name: str) -> None:
    page.goto(f"{base}/admin/auth/group/{pk}/change/")
    page.fill("#id_name", name)
    page.click("input[name=_save]")
    page.wait_for_url(f"{base}/admin/auth/group/", timeout=WAIT)


def assert_outsider_learned_nothing(outsider, user_id: int) -> None:
    """A sentinel published after everything else arrives alone; the page shows nothing of the groups."""
    in_thread(publish_sentinel, user_id)
    outsider.wait_for_function("window.__events.some((e) => e.event === 'sentinel')", timeout=WAIT)
    events = outsider.evaluate("window.__events")
    assert [e["event"] for e in events] == ["sentinel"], events
    assert outsider.query_selector(".realtime-toast, #realtime-recent-others, #realtime-list-changes") is None


def test_change_list_marks_others_changes_and_keeps_filters_and_selection(realtime_site, crew, browser):  # noqa: F811
    """editor renames, deletes and adds groups while alice's filtered, sorted list is open: her rows are
    marked and a banner counts 3 changes (her own change in another tab not among them); the page is not
    reloaded, her selection stays, and "refresh" keeps the query string. A change committed before her
    page connected is replayed from the id the page was rendered at. The outsider sees nothing."""
    base = realtime_site.url
    groups = crew["groups"]
    list_url = f"{base}/admin/auth/group/?q=shift&o=1"

    outsider = open_live(browser, base, "outsider")
    outsider.evaluate("window.realtimeAdmin.subscribe('model:auth.group')")
    outsider.wait_for_function("window.__errors.some((e) => e.code === 'forbidden')", timeout=WAIT)

    alice = login(browser, base, "alice")
    # Keep alice's list from connecting until editor's first change has committed.
    alice.context.route("**/realtime/token/", lambda route: route.abort())
    alice.goto(list_url)
    assert row(alice, groups["Night shift"]).count() == 1
    alice.check(f"input.action-select[value='{groups['Day shift']}']")
    alice.evaluate("window.__notReloaded = true")
    shoot(alice, "admin-list-before.png")

    editor = login(browser, base, "editor")
    rename(editor, base, groups["Night shift"], "Night shift (2 people)")
    alice.context.unroute("**/realtime/token/")
    wait_open(alice)
    banner = alice.wait_for_selector("#realtime-list-changes li.warning", timeout=WAIT)
    assert banner.inner_text().strip() == "1 change since you opened this page — refresh"

    # alice's own change, in another tab, is not news.
    rename(alice.context.new_page(), base, groups["Day shift"], "Day shift (alice)")
    editor.goto(f"{base}/admin/auth/group/{groups['Late shift']}/delete/")
    editor.click("input[type=submit]")
    editor.wait_for_url(f"{base}/admin/auth/group/", timeout=WAIT)
    editor.goto(f"{base}/admin/auth/group/add/")
    editor.fill("#id_name", "Swing shift")
    editor.click("input[name=_save]")
    editor.wait_for_url(f"{base}/admin/auth/group/", timeout=WAIT)

    alice.wait_for_selector("#realtime-list-changes li[data-count='3']", timeout=WAIT)
    assert alice.inner_text("#realtime-list-changes li").strip() == "3 changes since you opened this page — refresh"
    assert alice.get_attribute("#realtime-list-changes a", "href") == "/admin/auth/group/?q=shift&o=1"
    night, day, late = (row(alice, groups[name]) for name in ("Night shift", "Day shift", "Late shift"))
    assert night.get_attribute("class").split().count("realtime-changed") == 1
    assert re.fullmatch(r"Changed by editor at \d\d:\d\d", night.get_attribute("title"))
    assert "realtime-deleted" in late.get_attribute("class")
    assert re.fullmatch(r"Deleted by editor at \d\d:\d\d", late.get_attribute("title"))
    assert late.evaluate("(tr) => getComputedStyle(tr.cells[1]).textDecorationLine") == "line-through"
    assert "realtime-changed" not in (day.get_attribute("class") or "")  # her own change
    # Nothing reloaded: the selection is still there, and so are the rows as rendered.
    assert alice.evaluate("window.__notReloaded") is True
    assert alice.is_checked(f"input.action-select[value='{groups['Day shift']}']")
    assert "selected" in day.get_attribute("class")
    assert re.fullmatch(r"Night shift changed by editor at \d\d:\d\d", night.locator("th").inner_text().strip())
    assert re.fullmatch(r"Late shift deleted by editor at \d\d:\d\d", late.locator("th").inner_text().strip())
    mark_style = late.evaluate("(tr) => getComputedStyle(tr.querySelector('.realtime-mark')).textDecorationLine")
    assert mark_style == "none"  # the words are not struck out
    shoot(alice, "admin-list-changes.png")

    alice.click("#realtime-list-changes a")
    alice.wait_for_function("!window.__notReloaded", timeout=WAIT)
    assert alice.url == list_url
    assert alice.query_selector("#realtime-list-changes") is None
    assert row(alice, groups["Night shift"]).inner_text().strip().startswith("Night shift (2 people)")

    assert_outsider_learned_nothing(outsider, crew["outsider"])


def test_change_list_in_dark_mode_on_a_narrow_screen(realtime_site, crew, browser):  # noqa: F811
    """On a phone-sized screen in dark mode, the banner and a changed row take the admin's dark colours and fit."""
    base = realtime_site.url
    groups = crew["groups"]
    narrow_dark = {"color_scheme": "dark", "viewport": {"width": 390, "height": 844}}
    alice = open_live(browser, base, "alice", f"{base}/admin/auth/group/", **narrow_dark)
    editor = login(browser, base, "editor")
    rename(editor, base, groups["Night shift"], "Night shift (dark)")

    alice.wait_for_selector("#realtime-list-changes li.warning", timeout=WAIT)
    looks = alice.evaluate(
        """() => {
          const banner = document.querySelector('#realtime-list-changes li');
          const cell = document.querySelector('#result_list tr.realtime-changed th');
          return {banner: getComputedStyle(banner).backgroundColor, cell: getComputedStyle(cell).backgroundColor,
                  right: banner.getBoundingClientRect().right, width: document.documentElement.clientWidth};
        }"""
    )
    assert looks["banner"] == looks["cell"] == "rgb(88, 51, 5)", looks  # dark mode's --message-warning-bg
    assert looks["right"] <= looks["width"], looks
    shoot(alice, "admin-list-dark-narrow.png")


def test_who_else_is_looking_at_the_list(presence_site, crew, browser):  # noqa: F811
    """alice and editor on the groups list each see the other, with since when; the outsider cannot join."""
    base = presence_site.url
    alice = open_live(browser, base, "alice", f"{base}/admin/auth/group/")
    editor = open_live(browser, base, "editor", f"{base}/admin/auth/group/?o=-1")  # the same list, sorted otherwise

    line = alice.wait_for_selector("#realtime-present:not([hidden])", timeout=WAIT)
    assert re.fullmatch(r"Also here: editor since \d\d:\d\d", line.inner_text().strip()), line.inner_text()
    line = editor.wait_for_selector("#realtime-present:not([hidden])", timeout=WAIT)
    assert re.fullmatch(r"Also here: alice since \d\d:\d\d", line.inner_text().strip()), line.inner_text()
    shoot(alice, "admin-list-who-else.png")

    editor.goto(f"{base}/admin/")  # leaving the list: a presence.leave follows
    alice.wait_for_selector("#realtime-present[hidden]", state="attached", timeout=WAIT)


def test_recent_actions_and_history_update_live(realtime_site, crew, browser):  # noqa: F811
    """editor changes a group: it appears at the top of alice's Recent actions and on its history page;
    alice's own action goes to "My actions"; the outsider's Recent actions stay as they were."""
    base = realtime_site.url
    pk = crew["groups"]["Night shift"]
    alice = open_live(browser, base, "alice")  # on the index
    assert alice.inner_text("#recent-actions-module p") == "None available"
    history = alice.context.new_page()
    history.goto(f"{base}/admin/auth/group/{pk}/history/")
    wait_open(history)
    outsider = open_live(browser, base, "outsider")

    editor = login(browser, base, "editor")
    rename(editor, base, pk, "Night shift (renamed)")

    item = alice.wait_for_selector("#realtime-recent-others li.changelink", timeout=WAIT)
    assert alice.inner_text("#recent-actions-module h3") == "By others, since you opened this page"
    assert re.fullmatch(r"Changed:\s*Night shift \(renamed\)\nGroup · editor at \d\d:\d\d", item.inner_text().strip())
    assert item.query_selector("a").get_attribute("href") == f"/admin/auth/group/{pk}/change/"

    entry = history.wait_for_selector("#change-history tbody tr.realtime-new", timeout=WAIT)
    cells = entry.query_selector_all("th, td")
    assert [cell.inner_text().strip() for cell in cells[1:]] == ["editor", "Changed Name."]
    assert cells[0].inner_text().strip()  # a date and time
    shoot(alice, "admin-recent-actions-live.png")
    shoot(history, "admin-history-live.png")

    # alice's own action, from another tab: at the top of "My actions", not among others'.
    rename(alice.context.new_page(), base, crew["groups"]["Day shift"], "Day shift (alice)")
    mine = alice.wait_for_selector("#recent-actions-module ul.actionlist:not(#realtime-recent-others) li", timeout=WAIT)
    assert re.fullmatch(r"Changed:\s*Day shift \(alice\)\nGroup", mine.inner_text().strip()), mine.inner_text()
    assert alice.locator("#realtime-recent-others li").count() == 1
    assert history.locator("#change-history tbody tr").count() == 1  # another object's entry

    assert_outsider_learned_nothing(outsider, crew["outsider"])


def test_without_action_checkboxes_rows_are_found_by_their_link(realtime_site, crew, browser):  # noqa: F811
    """A ModelAdmin without actions has no checkboxes: the changed row is found by its link to the change form."""
    from django.contrib import admin
    from django.contrib.auth.models import Group

    model_admin = admin.site._registry[Group]
    model_admin.actions = None  # read by the live server's thread on the next request
    try:
        base = realtime_site.url
        alice = open_live(browser, base, "alice", f"{base}/admin/auth/group/?q=night")
        assert alice.query_selector("input.action-select") is None
        rename(login(browser, base, "editor"), base, crew["groups"]["Night shift"], "Night shift (link)")
        changed = alice.wait_for_selector("#result_list tr.realtime-changed", timeout=WAIT)
        assert re.fullmatch(r"Night shift changed by editor at \d\d:\d\d", changed.inner_text().strip())
    finally:
        del model_admin.actions


def page_state(client, url: str) -> dict | None:
    """The live state a page was rendered with, or None."""
    response = client.get(url)
    assert response.status_code == 200
    return live_admin_state(response)


def test_pages_are_live_only_where_allowed(settings):
    """Change list, index and history carry their live state; an opted-out ModelAdmin, MODEL_CHANGES off,
    an anonymous user and a model the user may not see get none of it."""
    from django.contrib import admin
    from django.contrib.auth.models import Group

    from tests.helpers import logged_in, make_user

    group = Group.objects.create(name="Night shift")
    alice = logged_in(make_user("alice", staff=True, perms=(*GROUP_PERMS, "auth.view_user")))
    lists = page_state(alice, "/admin/auth/group/")
    assert lists["kind"] == "list" and lists["topics"] == ["model:auth.group"] and lists["presence"] is False
    assert lists["change_url"] == "/admin/auth/group/realtimepk0/change/"
    assert isinstance(lists["last_id"], int)
    index = page_state(alice, "/admin/")
    assert index["kind"] == "index" and index["models"] == {"auth.group": "Group", "auth.user": "User"}
    assert index["topics"] == []
    history = page_state(alice, f"/admin/auth/group/{group.pk}/history/")
    assert history == {**history, "kind": "history", "model": "auth.group", "pk": str(group.pk), "topics": []}

    outsider = logged_in(make_user("outsider", staff=True, perms=("auth.view_user",)))
    assert page_state(outsider, "/admin/")["models"] == {"auth.user": "User"}
    assert outsider.get("/admin/auth/group/").status_code == 403

    model_admin = admin.site._registry[Group]
    model_admin.realtime_changes = False  # type: ignore[attr-defined]
    try:
        assert page_state(alice, "/admin/auth/group/") is None
        assert page_state(alice, f"/admin/auth/group/{group.pk}/history/") is None
        assert page_state(alice, "/admin/")["models"] == {"auth.user": "User"}
    finally:
        del model_admin.realtime_changes  # type: ignore[attr-defined]

    settings.REALTIME = {"MODEL_CHANGES": False}
    for url in ("/admin/auth/group/", "/admin/", f"/admin/auth/group/{group.pk}/history/"):
        assert page_state(alice, url) is None, url
