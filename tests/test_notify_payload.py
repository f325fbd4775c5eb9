"""The NOTIFY payload fast path: what the commit trigger sends, and a listener that trusts it only when it may.

The trigger (migrations 0006 and 0008) puts a small transaction's events in its NOTIFY, else its last position;
the listener delivers them without reading the table when their first
position follows its cursor, and reads the table otherwise. These tests hold
the payload equal to the table, byte for byte, and check that a real
``Listener`` against real PostgreSQL delivers every committed event once, in
order, through both paths, across gaps, large events, batches, control events
and concurrent commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator, Sequence

import psycopg
import pytest
from django.db import connection, transaction

from realtime import publish, publish_many
from realtime.core.audience import ControlEvent, OutboxEvent
from realtime.outbox import (
    SELECT_COLUMNS,
    TABLE,
    USER_CHANGED,
    payload_events,
    payload_position,
    publish_audience,
    publish_control,
    row_to_event,
)
from realtime.worker.listener import Listener
from tests.helpers import WAIT, database_url_for_tests, make_user

pytestmark = pytest.mark.django_db(transaction=True)


@contextlib.contextmanager
def listening() -> Iterator[psycopg.Connection]:
    with psycopg.connect(database_url_for_tests(), autocommit=True) as listener:
        listener.execute("LISTEN realtime")
        yield listener


def next_payload(listener: psycopg.Connection) -> str:
    notifies = list(listener.notifies(timeout=WAIT, stop_after=1))
    assert notifies, "no NOTIFY after a commit"
    return notifies[0].payload


def table_events(first: int, last: int) -> list[OutboxEvent | ControlEvent]:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {SELECT_COLUMNS} FROM {TABLE} WHERE position BETWEEN %s AND %s ORDER BY position", [first, last]
        )
        return [row_to_event(row) for row in cursor.fetchall()]


ODD_TEXT = 'line\nbreak "quoted" back\\slash tab\t é 漢字 \u2028 emoji 🎉 </script>'


@pytest.mark.parametrize(
    "publish_one",
    [
        lambda user: publish("plain", {"n": 1}, users=[user]),
        lambda user: publish(ODD_TEXT, {ODD_TEXT: [ODD_TEXT, 1.5, -2, 10**18, None, True]}, topic=ODD_TEXT),
        lambda user: publish("audience", None, users=[user, 2**62], groups=["g", ODD_TEXT], permission="a.b"),
        lambda user: publish("flags", [1, "x"], staff=True, everyone=True),
        lambda user: publish_audience("admin.logentry", {"k": "v"}, permissions=["a.view_b"], staff_only=True),
    ],
    ids=["plain", "odd-text", "audience", "flags", "staff-only"],
)
def test_the_payload_carries_exactly_what_the_table_holds(publish_one):
    """Message (byte for byte), publish time and audience from the payload equal the table's."""
    user = make_user("alice")
    with listening() as listener:
        with transaction.atomic():
            event = publish_one(user)
        payload = next_payload(listener)
    event.refresh_from_db()
    carried = payload_events(payload)
    assert carried == table_events(event.position, event.position)
    assert [e.position for e in carried] == [event.position]


def test_a_small_transaction_is_carried_whole_and_in_order():
    """Sixteen events of one transaction: one NOTIFY, consecutive positions, as the table has them."""
    with listening() as listener:
        with transaction.atomic():
            publish_many([{"event": "e", "data": {"i": i}, "everyone": True} for i in range(16)])
        payload = next_payload(listener)
    carried = payload_events(payload)
    assert len(carried) == 16
    assert carried == table_events(carried[0].position, carried[-1].position)
    assert [e.position for e in carried] == list(range(carried[0].position, carried[0].position + 16))


@pytest.mark.parametrize(
    "publish_transaction",
    [
        lambda: publish_many([{"event": "e", "everyone": True} for _ in range(17)]),
        lambda: publish("big", {"s": "x" * 8_000}, everyone=True),
        lambda: publish_many([{"event": "e", "data": {"s": "x" * 1_000}, "everyone": True} for _ in range(8)]),
        lambda: (publish("e", everyone=True), publish_control(USER_CHANGED, {"users": [1], "groups": []})),
    ],
    ids=["17-events", "one-large-event", "too-large-together", "with-a-control-event"],
)
def test_what_the_payload_cannot_carry_is_a_bare_wake_up(publish_transaction):
    """More than 16 events, more than 8,000 bytes, or a control event: a bare wake-up (read the table)
    that names the transaction's last position."""
    with listening() as listener:
        with transaction.atomic():
            publish_transaction()
        payload = next_payload(listener)
    last = table_events(0, 2**62)[-1].position
    assert payload == str(last)
    assert payload_events(payload) == []
    assert payload_position(payload) == last


def test_every_payload_names_its_last_position():
    """payload_position() reads the last position of an events payload without decoding it; a pre-0008 empty
    payload names none; anything else is refused."""
    with listening() as listener:
        with transaction.atomic():
            publish_many([{"event": "e", "data": {"i": i}, "everyone": True} for i in range(3)])
        payload = next_payload(listener)
    assert payload_position(payload) == payload_events(payload)[-1].position
    assert payload_position("") is None
    assert payload_events("") == []
    for junk in ("12a", "\u0661", "x\ny"):
        with pytest.raises(ValueError):
            payload_events(junk)


@contextlib.contextmanager
def failing_at_commit() -> Iterator[None]:
    """Events named ``fail-at-commit`` abort their transaction at COMMIT, after their positions were drawn.

    A deferred trigger named after the position trigger fires after it: the
    sequence has moved on, the rows vanish, and a gap is left in the positions.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE FUNCTION test_fail_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            " IF NEW.name = 'fail-at-commit' THEN RAISE EXCEPTION 'failing at commit'; END IF;"
            " RETURN NULL; END $$"
        )
        cursor.execute(
            f"CREATE CONSTRAINT TRIGGER zz_test_fail_at_commit AFTER INSERT ON {TABLE}"
            " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_fail_at_commit()"
        )
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TRIGGER zz_test_fail_at_commit ON {TABLE}")
            cursor.execute("DROP FUNCTION test_fail_at_commit()")


class RunningListener:
    """A real :class:`Listener` in an event loop of its own thread, collecting what it delivers."""

    def __init__(self) -> None:
        self.delivered: list[OutboxEvent | ControlEvent] = []
        self.batches: list[int] = []  # each delivered batch's last position, in order
        self.loop = asyncio.new_event_loop()
        # No safety-net reads within a test: an event left for them would show as a timeout.
        self.listener = Listener(database_url_for_tests(), self._collect, poll_interval=3600)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def _collect(self, events: Sequence[OutboxEvent | ControlEvent]) -> None:
        self.delivered.extend(events)
        self.batches.append(events[-1].position)

    async def _start(self) -> None:
        self.task = asyncio.create_task(self.listener.run())
        await self.listener.started.wait()

    async def _stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def __enter__(self) -> RunningListener:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(WAIT)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()

    def wait_for(self, position: int) -> None:
        waited = 0.0
        while (self.listener.cursor or 0) < position and waited < WAIT:
            threading.Event().wait(0.02)
            waited += 0.02
        assert self.listener.cursor == position, f"listener stopped at {self.listener.cursor}, not {position}"


def test_the_listener_delivers_every_commit_once_in_order_through_both_paths():
    """Single events from 3 threads at once, batches, large events, control events, a rollback and a
    commit that fails after drawing its positions: every committed event arrives once, in commit
    order, as the table has it; both the payload and the table path were used."""
    user = make_user("alice")

    def single_events(thread: int) -> None:
        try:
            for i in range(60):
                with transaction.atomic():
                    publish("single", {"thread": thread, "i": i}, users=[user])
        finally:
            connection.close()

    with failing_at_commit(), RunningListener() as running:
        threads = [threading.Thread(target=single_events, args=(n,)) for n in range(3)]
        for thread in threads:
            thread.start()
        for round_ in range(10):
            with transaction.atomic():
                publish_many([{"event": "batch", "data": {"i": i}, "everyone": True} for i in range(round_ * 3)])
            with transaction.atomic():
                publish("large", {"s": "x" * 9_000, "round": round_}, everyone=True)
            with transaction.atomic():
                publish_control(USER_CHANGED, {"users": [user.pk], "groups": []})
            with contextlib.suppress(RuntimeError), transaction.atomic():
                publish("rolled back", everyone=True)
                raise RuntimeError("roll back")
            with contextlib.suppress(Exception), transaction.atomic():
                publish("fail-at-commit", everyone=True)
        for thread in threads:
            thread.join(WAIT * 6)
        committed = table_events(0, 2**62)
        running.wait_for(committed[-1].position)

    assert running.delivered == committed  # once each, in order, equal to the table
    assert sum(1 for e in committed if isinstance(e, OutboxEvent) and b"single" in e.message.encode()) == 180
    positions = [e.position for e in committed]
    assert len(set(range(positions[0], positions[-1] + 1)) - set(positions)) >= 10, "no gap was made"
    assert running.listener.from_payload > 0
    assert running.listener.from_table > 0


def test_after_a_gap_the_listener_reads_the_table():
    """A commit that failed after drawing its position leaves a gap; the next payload does not follow the
    cursor, so the listener reads the table, delivers what is there, and trusts payloads again after."""
    user = make_user("alice")
    with failing_at_commit(), RunningListener() as running:
        with transaction.atomic():
            first = publish("before", users=[user])
        first.refresh_from_db()
        running.wait_for(first.position)
        with contextlib.suppress(Exception), transaction.atomic():
            publish("fail-at-commit", users=[user])
        reads_before = running.listener.from_table
        with transaction.atomic():
            after_gap = publish("after the gap", users=[user])
        after_gap.refresh_from_db()
        assert after_gap.position == first.position + 2
        running.wait_for(after_gap.position)
        assert running.listener.from_table == reads_before + 1
        payloads_before = running.listener.from_payload
        with transaction.atomic():
            last = publish("fast again", users=[user])
        last.refresh_from_db()
        running.wait_for(last.position)
        assert running.listener.from_payload == payloads_before + 1
    assert [e.position for e in running.delivered] == [first.position, after_gap.position, last.position]


def test_a_commit_notified_during_a_read_is_read_after_it():
    """A NOTIFY that arrives while the table is being read (here: a large event, which has no payload)
    may be for a commit the read did not see: the listener reads again, it never waits for a later commit."""
    user = make_user("alice")
    with RunningListener() as running:
        for round_ in range(20):
            with transaction.atomic():
                publish("large", {"s": "x" * 60_000, "round": round_}, users=[user])
            with transaction.atomic():
                small = publish("small", {"round": round_}, users=[user])
            small.refresh_from_db()
            running.wait_for(small.position)  # no later commit comes to wake the listener
    assert running.listener.from_table >= 20
