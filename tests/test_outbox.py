"""publish(): validation, transactions, and commit-ordered positions in the database."""

from __future__ import annotations

import contextlib
import datetime
import decimal
import threading
from collections.abc import Iterator

import psycopg
import pytest
from django.db import connection, transaction
from django.test import override_settings

from realtime import publish
from realtime.models import Event
from realtime.outbox import payload_events
from tests.helpers import WAIT, database_url_for_tests, make_user


@contextlib.contextmanager
def listening() -> Iterator[psycopg.Connection]:
    """A connection of its own that LISTENs on the workers' channel (Django's are pooled: shared)."""
    with psycopg.connect(database_url_for_tests(), autocommit=True) as listener:
        listener.execute("LISTEN realtime")
        yield listener


@pytest.mark.django_db
def test_publish_requires_an_audience():
    """An event with nobody to receive it is a programming error."""
    with pytest.raises(TypeError, match=r"publish\('x'\) has no audience"):
        publish("x", {})


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"event": "", "everyone": True}, ValueError, "non-empty string"),
        ({"event": "realtime.session_ended", "everyone": True}, ValueError, "reserved"),
        ({"event": "x", "users": ["alice"]}, TypeError, "integer primary keys"),
        ({"event": "x", "groups": [3]}, TypeError, "Group objects or group names"),
        ({"event": "x", "permission": "view_user"}, ValueError, "app_label.codename"),
        ({"event": "x", "topic": ""}, ValueError, "topic must be"),
        ({"event": "x", "data": {"f": object()}, "everyone": True}, TypeError, "JSON-serialisable"),
    ],
)
def test_publish_rejects_bad_arguments(kwargs, error, match):
    """Each bad argument raises a clear error and writes nothing."""
    with pytest.raises(error, match=match):
        publish(**kwargs)
    assert not Event.objects.exists()


@pytest.mark.django_db
def test_data_size_cap():
    """Data over MAX_DATA_SIZE is refused with the limit in the message; under it is stored."""
    with override_settings(REALTIME={"MAX_DATA_SIZE": 1000}):
        with pytest.raises(ValueError, match=r"limit is REALTIME\['MAX_DATA_SIZE'\] = 1000 bytes"):
            publish("big", {"s": "x" * 1000}, everyone=True)
        publish("small", {"s": "x" * 900}, everyone=True)
    assert list(Event.objects.values_list("name", flat=True)) == ["small"]


@pytest.mark.django_db
def test_django_types_are_encoded():
    """Dates, decimals and UUID-like values are stored as DjangoJSONEncoder strings."""
    event = publish("typed", {"d": datetime.date(2026, 1, 2), "n": decimal.Decimal("1.50")}, everyone=True)
    event.refresh_from_db()
    assert event.data == {"d": "2026-01-02", "n": "1.50"}


@pytest.mark.django_db(transaction=True)
def test_position_is_assigned_at_commit_only():
    """Inside the transaction the position is unset; after commit it is set and NOTIFY was sent."""
    user = make_user("alice")
    with listening() as listener:
        with transaction.atomic():
            event = publish("x", {}, users=[user])
            event.refresh_from_db()
            assert event.position is None
        event.refresh_from_db()
        assert event.position is not None
        notifies = list(listener.notifies(timeout=WAIT, stop_after=1))
    assert [n.channel for n in notifies] == ["realtime"]
    # One NOTIFY, sent at commit, carrying the event (tests/test_notify_payload.py has the details).
    assert [e.position for e in payload_events(notifies[0].payload)] == [event.position]


@pytest.mark.django_db(transaction=True)
def test_a_cursor_reader_never_skips_an_event_under_concurrent_commits():
    """A reader that only asks for positions above its cursor, while 4 threads commit, sees every event."""
    user = make_user("alice")
    writers_done = threading.Event()
    seen: list[int] = []

    def writer(n: int) -> None:
        try:
            for i in range(50):
                with transaction.atomic():
                    publish("n", {"n": n, "i": i}, users=[user])
                    # Hold the transaction open a moment so commits interleave out of id order.
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT pg_sleep(0.001 * %s)", [i % 3])
        finally:
            connection.close()

    def reader() -> None:
        cursor_position = 0
        try:
            while True:
                done = writers_done.is_set()
                with connection.cursor() as cursor:
                    cursor.execute(
                        "SELECT position FROM realtime_event WHERE position > %s ORDER BY position",
                        [cursor_position],
                    )
                    rows = [row[0] for row in cursor.fetchall()]
                if rows:
                    seen.extend(rows)
                    cursor_position = rows[-1]
                if done:
                    return
        finally:
            connection.close()

    reading = threading.Thread(target=reader)
    reading.start()
    writers = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(WAIT * 6)
    writers_done.set()
    reading.join(WAIT)
    committed = list(Event.objects.order_by("position").values_list("position", flat=True))
    assert len(committed) == 200
    assert seen == committed  # nothing skipped, nothing twice, in order


@pytest.mark.django_db(transaction=True)
def test_publish_many_commits_a_batch_in_order_with_one_wake_up():
    """publish_many() writes every event in one go; at commit they get consecutive ids in the order given."""
    from realtime import publish_many

    user = make_user("alice")
    with listening() as listener:
        with transaction.atomic():
            count = publish_many({"event": "batch", "data": {"n": n}, "users": [user]} for n in range(1000))
        notifies = list(listener.notifies(timeout=1, stop_after=2))
    assert count == 1000
    rows = list(Event.objects.filter(name="batch").order_by("position").values_list("position", "data"))
    assert [data["n"] for _, data in rows] == list(range(1000))
    positions = [position for position, _ in rows]
    assert positions == list(range(positions[0], positions[0] + 1000))
    assert len(notifies) == 1  # one wake-up for the whole batch


@pytest.mark.django_db
def test_publish_many_validates_every_item_before_writing():
    """A bad item anywhere in the batch raises, naming its index, and nothing is written."""
    from realtime import publish_many

    good = {"event": "ok", "data": {}, "everyone": True}
    with pytest.raises(TypeError, match="publish_many\\(\\) item 2: publish\\('x'\\) has no audience"):
        publish_many([good, good, {"event": "x", "data": {}}])
    with pytest.raises(TypeError, match="item 1 has unknown keys: colour"):
        publish_many([good, {**good, "colour": "red"}])
    with pytest.raises(TypeError, match="item 0 must be a dict"):
        publish_many(["nope"])
    assert publish_many([]) == 0
    assert not Event.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("name", "topic", "data"),
    [
        ("plain.event", None, {}),
        ('odd "name" \\ with\nlines', "topic é/\t1", {"text": 'quote " backslash \\ tab \t é 🎉', "n": [1, 2.5, None]}),
        ("nested", "t", {"a": {"b": [True, False, {"c": "\u0001"}]}, "big": 2**53}),
    ],
)
def test_the_message_postgresql_builds_is_the_protocols_event(name, topic, data):
    """The worker sends the message PostgreSQL builds from the row: protocol.encode_event's, field for field."""
    import json

    from realtime.core.protocol import encode_event
    from realtime.outbox import read_events

    with transaction.atomic():
        publish(name, data, everyone=True, topic=topic)
    row = Event.objects.get()
    (event,) = read_events(0, None, 10)
    sent = json.loads(event.message)
    expected = json.loads(encode_event(row.position, name, topic, json.dumps(data), row.created_at.isoformat()))
    assert datetime.datetime.fromisoformat(sent.pop("at")) == row.created_at
    expected.pop("at")
    assert sent == expected
    assert event.created == pytest.approx(row.created_at.timestamp(), abs=1e-6)
