"""What the live admin costs a page: no query per change-list row, one query per live page.

The change form, the change list, the index and an object's history page each read the newest
event id once (the page's client replays what was committed after it); with ``PRESENCE_TOPICS``
announcing model topics, the change form and the change list read who else is there (one more).

``REALTIME_MEASURE_ADMIN=1`` also measures, in one run, the time of 200 change-list and 200
change-form requests (Django's test client, in process) with the feature on and off, interleaved,
and prints the numbers; a test asserts no timing (the machine is shared).
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
from django.contrib.auth.models import Group, Permission
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from tests.helpers import logged_in, make_user

pytestmark = pytest.mark.django_db

ON = {"MODEL_CHANGES": True}
OFF = {"MODEL_CHANGES": False}
PRESENCE = {"MODEL_CHANGES": True, "PRESENCE_TOPICS": ["model:*"]}


def queries(client, url: str, realtime: dict[str, object]) -> int:
    with override_settings(REALTIME=realtime), CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200
    return len(captured)


def make_groups(count: int) -> None:
    perms = list(Permission.objects.all()[:3])
    for n in range(Group.objects.count(), count):
        Group.objects.create(name=f"group {n:04d}").permissions.set(perms)


def test_change_list_costs_no_query_per_row():
    """The live change list makes as many queries for 40 rows as for 4: one more than without the feature,
    two with presence (who else is here)."""
    client = logged_in(make_user("root", staff=True, superuser=True))
    make_groups(4)
    url = "/admin/auth/group/"
    queries(client, url, OFF)  # warms Django's content type cache
    few = {name: queries(client, url, setting) for name, setting in (("on", ON), ("presence", PRESENCE))}
    make_groups(40)
    many = {name: queries(client, url, setting) for name, setting in (("on", ON), ("presence", PRESENCE))}
    assert many == few
    off = queries(client, url, OFF)
    assert many == {"on": off + 1, "presence": off + 2}
    assert b'id="realtime-admin-page"' in client.get(url).content


def test_index_and_history_cost_one_query():
    """The index (Recent actions) and an object's history page read the newest event id once, nothing per entry."""
    from django.contrib.admin.models import CHANGE, LogEntry

    root = make_user("root", staff=True, superuser=True)
    client = logged_in(root)
    make_groups(1)
    group = Group.objects.get()
    history = f"/admin/auth/group/{group.pk}/history/"
    LogEntry.objects.log_actions(root.pk, [group], CHANGE, change_message="first", single_object=True)
    for url in ("/admin/", history):
        queries(client, url, OFF)  # warms caches
        assert queries(client, url, ON) == queries(client, url, OFF) + 1, url
    few = queries(client, history, ON)
    for n in range(30):
        LogEntry.objects.log_actions(root.pk, [group], CHANGE, change_message=f"change {n}", single_object=True)
    assert queries(client, history, ON) == few


def test_change_form_costs_one_query():
    """A change form reads the newest event id once: one query more than without the feature."""
    client = logged_in(make_user("root", staff=True, superuser=True))
    make_groups(1)
    url = f"/admin/auth/group/{Group.objects.get().pk}/change/"
    queries(client, url, OFF)  # warms Django's content type cache
    assert queries(client, url, ON) == queries(client, url, OFF) + 1


@pytest.mark.skipif(not os.environ.get("REALTIME_MEASURE_ADMIN"), reason="set REALTIME_MEASURE_ADMIN=1 to measure")
def test_measure_page_load_with_and_without(capsys):
    """Print the time of 200 requests per page and setting (interleaved rounds of 10)."""
    client = logged_in(make_user("root", staff=True, superuser=True))
    make_groups(100)
    first = Group.objects.order_by("pk").first().pk
    pages = {"change list (100 rows)": "/admin/auth/group/"}
    pages["change form"] = f"/admin/auth/group/{first}/change/"
    pages["index"] = "/admin/"
    pages["history"] = f"/admin/auth/group/{first}/history/"
    samples: dict[tuple[str, str], list[float]] = {(p, s): [] for p in pages for s in ("on", "off")}
    for url in pages.values():  # warm up templates and caches
        for realtime in (ON, OFF):
            with override_settings(REALTIME=realtime):
                client.get(url)
    for _ in range(20):
        for name, url in pages.items():
            for label, realtime in (("on", ON), ("off", OFF)):
                with override_settings(REALTIME=realtime):
                    for _ in range(10):
                        start = time.perf_counter()
                        client.get(url)
                        samples[name, label].append(time.perf_counter() - start)
    with capsys.disabled():
        print()
        for name in pages:
            on, off = samples[name, "on"], samples[name, "off"]
            med_on, med_off = statistics.median(on) * 1000, statistics.median(off) * 1000
            mean_on, mean_off = statistics.fmean(on) * 1000, statistics.fmean(off) * 1000
            print(
                f"{name}: {len(on)} requests each; median {med_on:.2f} ms with, {med_off:.2f} ms without "
                f"({(med_on / med_off - 1) * 100:+.1f} %); mean {mean_on:.2f} / {mean_off:.2f} ms "
                f"({(mean_on / mean_off - 1) * 100:+.1f} %); queries {queries(client, pages[name], ON)} with, "
                f"{queries(client, pages[name], OFF)} without"
            )
