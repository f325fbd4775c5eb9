"""What the live admin costs a page: no query per change-list row, one query per live page.

The change form, the change list, the index and an object's history page each read the newest
event id once (the page's client replays what was committed after it); with ``PRESENCE_TOPICS``
announcing model topics, the change form and the change list read who else is there (one more).

``REALTIME_MEASURE_ADMIN=1`` also measures the time of 200 requests per page (change list, change
form, index, history) with the feature on and off, interleaved, in process (Django's test client)
and served by gunicorn (as it timed them), and prints the numbers; no test asserts a time (the
machine is shared).
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import sys
import time

import pytest
from django.contrib.auth.models import Group, Permission
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from tests.helpers import logged_in, make_user, web_server

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


MEASURE = pytest.mark.skipif(not os.environ.get("REALTIME_MEASURE_ADMIN"), reason="set REALTIME_MEASURE_ADMIN=1")
ROUNDS, PER_ROUND = 20, 10  # 200 requests per page and setting, in interleaved rounds of 10


def measured_pages() -> dict[str, str]:
    """The four live pages, on a change list of 100 groups."""
    make_groups(100)
    first = Group.objects.order_by("pk").first().pk
    return {
        "change list (100 rows)": "/admin/auth/group/",
        "change form": f"/admin/auth/group/{first}/change/",
        "index": "/admin/",
        "history": f"/admin/auth/group/{first}/history/",
    }


def report(title: str, pages: dict[str, str], samples: dict[tuple[str, str], list[float]], client) -> None:
    """Print the median and mean of each page with and without the live admin, and their queries."""
    print(f"\n{title}")
    for name, url in pages.items():
        on, off = samples[name, "on"], samples[name, "off"]
        med_on, med_off = statistics.median(on) * 1000, statistics.median(off) * 1000
        mean_on, mean_off = statistics.fmean(on) * 1000, statistics.fmean(off) * 1000
        print(
            f"{name}: {len(on)} requests each; median {med_on:.2f} ms with, {med_off:.2f} ms without "
            f"({(med_on / med_off - 1) * 100:+.1f} %); mean {mean_on:.2f} / {mean_off:.2f} ms "
            f"({(mean_on / mean_off - 1) * 100:+.1f} %); queries {queries(client, url, ON)} with, "
            f"{queries(client, url, OFF)} without"
        )


@MEASURE
def test_measure_page_load_with_and_without(capsys):
    """Print the time of 200 requests per page and setting in process (Django's test client, which also
    records every template's context: more templates cost more here than in a server)."""
    client = logged_in(make_user("root", staff=True, superuser=True))
    pages = measured_pages()
    samples: dict[tuple[str, str], list[float]] = {(p, s): [] for p in pages for s in ("on", "off")}
    for url in pages.values():  # warm up templates and caches
        for realtime in (ON, OFF):
            with override_settings(REALTIME=realtime):
                client.get(url)
    for _ in range(ROUNDS):
        for name, url in pages.items():
            for label, realtime in (("on", ON), ("off", OFF)):
                with override_settings(REALTIME=realtime):
                    for _ in range(PER_ROUND):
                        start = time.perf_counter()
                        client.get(url)
                        samples[name, label].append(time.perf_counter() - start)
    with capsys.disabled():
        report("In process (Django's test client):", pages, samples, client)


@MEASURE
@pytest.mark.django_db(transaction=True)
def test_measure_page_load_through_gunicorn(capsys, tmp_path):
    """Print the time of 200 requests per page and setting served by gunicorn (one sync worker per setting,
    side by side), as gunicorn timed them (its access log's %(D)s: the server's own time)."""
    client = logged_in(make_user("root", staff=True, superuser=True))
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    pages = measured_pages()
    logs = {label: tmp_path / f"{label}.log" for label in ("on", "off")}

    def gunicorn(label: str):
        command = [sys.executable, "-m", "gunicorn", "project.wsgi", "-b", "127.0.0.1:{port}", "-w", "1"]
        command += ["--access-logfile", str(logs[label]), "--access-logformat", "%(U)s %(D)s"]
        overrides = json.dumps(ON if label == "on" else OFF)
        return web_server(command, "tests.worker_settings", {"REALTIME_TEST_OVERRIDES": overrides})

    def get(base: str, url: str) -> None:
        host, port = base.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            connection.request("GET", url, headers={"Cookie": cookie})
            response = connection.getresponse()
            response.read()
            assert response.status == 200, (url, response.status)
        finally:
            connection.close()

    with gunicorn("on") as on_base, gunicorn("off") as off_base:
        bases = {"on": on_base, "off": off_base}
        for base in bases.values():  # warm up templates, caches and connections
            for url in pages.values():
                for _ in range(PER_ROUND):
                    get(base, url)
        marks = {label: len(logs[label].read_text().splitlines()) for label in bases}
        for _ in range(ROUNDS):
            for url in pages.values():
                for base in bases.values():
                    for _ in range(PER_ROUND):
                        get(base, url)
        time.sleep(0.5)  # the access log is written after the response
    samples: dict[tuple[str, str], list[float]] = {(p, s): [] for p in pages for s in ("on", "off")}
    by_url = {url: name for name, url in pages.items()}
    for label in bases:
        for line in logs[label].read_text().splitlines()[marks[label] :]:
            url, micros = line.split()
            samples[by_url[url], label].append(int(micros) / 1e6)
    with capsys.disabled():
        report("Served by gunicorn (its own time per request):", pages, samples, client)
