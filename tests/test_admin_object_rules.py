"""In Chromium: the live admin of a ModelAdmin with object-level rules (``tests.object_rules``).

alice and bob may both change groups, but each sees only the groups named after them. root
renames alice's group: alice's list and her change form show it at once; bob, on the same list
with the same model permission, learns nothing. Skips without Chromium, as tests/test_browser.py does.
"""

from __future__ import annotations

import pytest

from tests.helpers import start_worker
from tests.object_rules import group_rules
from tests.test_admin_lists import rename, row
from tests.test_admin_live import WAIT, in_thread, login, open_live, publish_sentinel, shoot
from tests.test_browser import browser  # noqa: F401  (fixture)

pytestmark = pytest.mark.django_db(transaction=True)

GROUP_PERMS = ("auth.view_group", "auth.change_group", "auth.delete_group", "auth.add_group")


@pytest.fixture
def rules_site(live_server, settings, transactional_db):
    """The live server and a worker, both with the object-level GroupAdmin."""
    worker = start_worker(extra_env={"DJANGO_SETTINGS_MODULE": "tests.object_rules_settings"})
    settings.REALTIME = {"URL": worker.url}
    try:
        with group_rules():
            yield live_server
    finally:
        worker.stop()


@pytest.fixture
def teams(transactional_db):
    from django.contrib.auth.models import Group

    from tests.helpers import make_user

    make_user("root", staff=True, superuser=True)
    make_user("alice", staff=True, perms=GROUP_PERMS)
    bob = make_user("bob", staff=True, perms=GROUP_PERMS)
    groups = {name: Group.objects.create(name=name).pk for name in ("alice team", "bob team")}
    return {"groups": groups, "bob": bob.pk}


def test_changes_reach_only_those_the_admin_shows_the_object_to(rules_site, teams, browser):  # noqa: F811
    base = rules_site.url
    groups = teams["groups"]
    alice_list = open_live(browser, base, "alice", f"{base}/admin/auth/group/")
    assert row(alice_list, groups["alice team"]).count() == 1 and row(alice_list, groups["bob team"]).count() == 0
    alice_form = open_live(browser, base, "alice", f"{base}/admin/auth/group/{groups['alice team']}/change/")
    bob_list = open_live(browser, base, "bob", f"{base}/admin/auth/group/")
    assert row(bob_list, groups["bob team"]).count() == 1 and row(bob_list, groups["alice team"]).count() == 0

    rename(login(browser, base, "root"), base, groups["alice team"], "alice team (renamed)")

    alice_list.wait_for_selector("#realtime-list-changes li[data-count='1']", timeout=WAIT)
    assert "realtime-changed" in row(alice_list, groups["alice team"]).get_attribute("class")
    notice = alice_form.wait_for_selector("#realtime-conflict li.warning", timeout=WAIT)
    assert notice.inner_text().strip().startswith("Changed by root at ")
    shoot(alice_list, "admin-object-rules-alice.png")

    # bob holds the model's permissions but not this object: nothing, not even a frame.
    in_thread(publish_sentinel, teams["bob"])
    bob_list.wait_for_function("window.__events.some((e) => e.event === 'sentinel')", timeout=WAIT)
    assert [e["event"] for e in bob_list.evaluate("window.__events")] == ["sentinel"]
    assert bob_list.query_selector("#realtime-list-changes, .realtime-toast") is None
    shoot(bob_list, "admin-object-rules-bob.png")
