"""publish() refuses, before any SQL, what PostgreSQL would refuse; rights follow a deleted permission."""

from __future__ import annotations

import contextlib
import json
import random
import time

import psycopg
import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType
from django.db import DatabaseError, DataError, InternalError, connection, transaction
from django.db.transaction import TransactionManagementError
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from realtime import outbox, publish, publish_many
from realtime.models import Event
from tests.helpers import get_token, logged_in, make_user, open_ws, receive_events

NAN = "publish() data must contain finite numbers only, not NaN, Infinity or -Infinity (JSON has none)."
NUL_DATA = (
    "publish() data must not contain NUL characters (\\x00) in its strings or keys: PostgreSQL cannot store them."
)


def surrogate_data(char: str) -> str:
    return (
        f"publish() data must not contain lone surrogates such as {char!r} in its strings or keys: "
        "they are not valid Unicode."
    )


def nul_text(what: str, value: str) -> str:
    return f"{what} must not contain NUL characters (\\x00), not {value!r}."


def surrogate_text(what: str, value: str) -> str:
    return f"{what} must not contain lone surrogates (not valid Unicode), not {value!r}."


def bigint(value: int) -> str:
    return f"users must be primary keys within PostgreSQL's bigint (-2**63 to 2**63 - 1), not {value!r}."


LONG_GROUP = "g" * 151
LONG_PERMISSION = "auth." + "p" * 251
BAD = [
    ({"data": {"n": float("nan")}, "everyone": True}, ValueError, NAN),
    ({"data": [1, float("inf")], "everyone": True}, ValueError, NAN),
    ({"data": {"deep": [{"n": float("-inf")}]}, "everyone": True}, ValueError, NAN),
    ({"data": {"s": "a\x00b"}, "everyone": True}, ValueError, NUL_DATA),
    ({"data": {"k\x00": 1}, "everyone": True}, ValueError, NUL_DATA),
    ({"data": {"s": "\\\x00"}, "everyone": True}, ValueError, NUL_DATA),  # a backslash, then a NUL
    ({"data": {"s": "\ud800"}, "everyone": True}, ValueError, surrogate_data("\ud800")),
    ({"data": {"k\udc00": "é"}, "everyone": True}, ValueError, surrogate_data("\udc00")),
    ({"event": "x\x00", "everyone": True}, ValueError, nul_text("event", "x\x00")),
    ({"event": "x\ud800", "everyone": True}, ValueError, surrogate_text("event", "x\ud800")),
    ({"topic": "room\x00"}, ValueError, nul_text("topic", "room\x00")),
    ({"topic": "room\udfff"}, ValueError, surrogate_text("topic", "room\udfff")),
    ({"groups": ["ops\x00"]}, ValueError, nul_text("group names", "ops\x00")),
    ({"groups": [Group(name="ops\ud800")]}, ValueError, surrogate_text("group names", "ops\ud800")),
    (
        {"groups": [LONG_GROUP]},
        ValueError,
        f"group names must be at most 150 characters (as Group.name), not {LONG_GROUP!r}.",
    ),
    ({"permission": "auth.view\x00"}, ValueError, nul_text("permission", "auth.view\x00")),
    ({"permission": "auth.view\ud800"}, ValueError, surrogate_text("permission", "auth.view\ud800")),
    (
        {"permission": LONG_PERMISSION},
        ValueError,
        f"permission must be at most 255 characters, not {LONG_PERMISSION!r}.",
    ),
    ({"users": [2**63]}, ValueError, bigint(2**63)),
    ({"users": [-(2**63) - 1]}, ValueError, bigint(-(2**63) - 1)),
    ({"data": {"f": object()}, "everyone": True}, TypeError, None),  # unchanged: not serialisable
]
IDS = [
    "nan",
    "inf",
    "-inf",
    "nul-value",
    "nul-key",
    "backslash-nul",
    "surrogate-value",
    "surrogate-key",
    "nul-event",
    "surrogate-event",
    "nul-topic",
    "surrogate-topic",
    "nul-group",
    "surrogate-group-object",
    "long-group",
    "nul-permission",
    "surrogate-permission",
    "long-permission",
    "user-above-bigint",
    "user-below-bigint",
    "not-serialisable",
]


def assert_committed_after(name: str) -> None:
    """Only ``name`` was written, and it committed (positions are assigned at commit)."""
    assert list(Event.objects.values_list("name", flat=True)) == [name]
    assert Event.objects.get().position is not None


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("kwargs", "error", "message"), BAD, ids=IDS)
def test_publish_refuses_bad_input_before_any_sql(kwargs, error, message):
    """Each bad input raises its exact error before any SQL, and the caller's transaction then commits a publish."""
    with transaction.atomic():
        with CaptureQueriesContext(connection) as queries, pytest.raises(error) as info:
            publish(**{"event": "x", **kwargs})
        if message is not None:
            assert str(info.value) == message
        assert not queries.captured_queries
        publish("after", {}, everyone=True)
    assert_committed_after("after")


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("kwargs", "error", "message"), BAD, ids=IDS)
def test_publish_many_refuses_bad_input_before_any_sql(kwargs, error, message):
    """publish_many() raises the same error naming the item, writes nothing, and the transaction then commits."""
    good = {"event": "ok", "everyone": True}
    with transaction.atomic():
        with CaptureQueriesContext(connection) as queries, pytest.raises(error) as info:
            publish_many([good, {"event": "x", **kwargs}])
        if message is not None:
            assert str(info.value) == f"publish_many() item 1: {message}"
        assert not queries.captured_queries
        publish_many([{"event": "after", "everyone": True}])
    assert_committed_after("after")


@pytest.mark.django_db
def test_legal_look_alikes_are_stored_unchanged():
    """Text that only looks like a NUL or a surrogate escape, non-ASCII text and the bigint bounds are accepted."""
    data = {
        "backslash-u0000": "\\u0000",
        "backslash-backslash-u0000": "\\\\u0000 \\",
        "\\u0000 key": "\\ud800",
        "emoji": "é 🎉 \U0010ffff",
        "control": "\x01\x1f",
    }
    event = publish("é.🎉", data, users=[2**63 - 1, -(2**63)], topic="salle é", groups=["équipe"])
    event.refresh_from_db()
    assert event.data == data
    assert (event.name, event.topic, event.groups) == ("é.🎉", "salle é", ["équipe"])
    assert event.users == [2**63 - 1, -(2**63)]
    assert publish_many([{"event": "many", "data": data, "everyone": True}]) == 1
    assert Event.objects.get(name="many").data == data


def test_nul_detection_reads_backslash_runs_right():
    """On 20,000 random strings of backslashes, NULs and "u0000" pieces, a NUL is found exactly when there is one."""
    rng = random.Random(11)
    pieces = ["\\", "\x00", "u", "0000", "u0000", "a", '"', "\n", "é", "🎉"]
    for _ in range(20_000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        has_nul = "\x00" in text
        if has_nul:
            with pytest.raises(ValueError, match="NUL characters"):
                outbox._json_text({text: text} if rng.random() < 0.5 else [text])
        else:
            outbox._json_text({text: text})


@pytest.mark.django_db
def test_data_size_counts_utf8_bytes():
    """MAX_DATA_SIZE counts the UTF-8 bytes of the encoded data: "é" is two bytes."""
    with override_settings(REALTIME={"MAX_DATA_SIZE": 1000}):
        publish("fits", {"s": "é" * 496}, everyone=True)  # {"s":""} is 8 bytes, + 992
        with pytest.raises(ValueError) as info:
            publish("big", {"s": "é" * 497}, everyone=True)
    assert str(info.value) == (
        "publish() data is 1002 bytes once encoded; the limit is REALTIME['MAX_DATA_SIZE'] = 1000 bytes."
    )
    assert list(Event.objects.values_list("name", flat=True)) == ["fits"]


@pytest.mark.django_db(transaction=True)
def test_admin_and_control_paths_refuse_bad_input_before_any_sql():
    """publish_audience() and publish_control() raise ValueError for what jsonb refuses, and the transaction commits."""
    with transaction.atomic():
        with CaptureQueriesContext(connection) as queries:
            with pytest.raises(ValueError) as info:
                outbox.publish_audience("admin.x", {"n": float("nan")}, permissions=["auth.view_user"], staff_only=True)
            assert str(info.value) == NAN
            with pytest.raises(ValueError) as info:
                outbox.publish_audience("admin\x00", {}, permissions=["auth.view_user"], staff_only=True)
            assert str(info.value) == nul_text("event", "admin\x00")
            with pytest.raises(ValueError) as info:
                outbox.publish_control("realtime.user_changed", {"groups": ["a\x00"]})
            assert str(info.value) == NUL_DATA
        assert not queries.captured_queries
        publish("after", {}, everyone=True)
    assert_committed_after("after")


@pytest.mark.django_db
def test_publish_many_raises_django_errors_when_copy_starts_in_a_failed_transaction():
    """A COPY refused by PostgreSQL (transaction already aborted) raises django.db.InternalError, not psycopg's."""
    with pytest.raises(InternalError) as info, transaction.atomic():
        with connection.cursor() as cursor, contextlib.suppress(DataError):
            cursor.execute("SELECT 1 / 0")  # caught, but PostgreSQL has aborted the transaction
        publish_many([{"event": "x", "everyone": True}])
    assert isinstance(info.value, DatabaseError)
    assert isinstance(info.value.__cause__, psycopg.errors.InFailedSqlTransaction)
    publish("after", {}, everyone=True)  # the savepoint rolled back: usable again
    assert list(Event.objects.values_list("name", flat=True)) == ["after"]


@pytest.mark.django_db
def test_publish_many_raises_django_errors_when_a_copied_row_fails(monkeypatch):
    """A row PostgreSQL refuses during the COPY (validation bypassed here) raises django.db.DataError."""
    validated = outbox._validated

    def unchecked(**item):
        fields = validated(**item)
        fields["users"] = [2**63]  # what validation now refuses: bigint out of range
        return fields

    monkeypatch.setattr(outbox, "_validated", unchecked)
    with pytest.raises(DataError) as info, transaction.atomic():
        publish_many([{"event": "x", "users": [1]}])
    assert isinstance(info.value.__cause__, psycopg.errors.NumericValueOutOfRange)
    assert not Event.objects.exists()


@pytest.mark.django_db
def test_publish_many_refuses_a_transaction_django_marked_broken():
    """Like publish() (a Django cursor), publish_many() raises TransactionManagementError in a broken atomic block."""
    with transaction.atomic():
        transaction.set_rollback(True)
        with pytest.raises(TransactionManagementError):
            publish("x", {}, everyone=True)
        with pytest.raises(TransactionManagementError):
            publish_many([{"event": "x", "everyone": True}])
    assert not Event.objects.exists()


def user_changed_events() -> list[dict]:
    """The data of the realtime.user_changed control events, in the order written."""
    events = Event.objects.filter(control=True, name="realtime.user_changed").order_by("id")
    return list(events.values_list("data", flat=True))


def custom_permission(content_type: ContentType | None = None) -> Permission:
    content_type = content_type or ContentType.objects.get_for_model(get_user_model())
    return Permission.objects.create(codename="see_secrets", name="Can see secrets", content_type=content_type)


@pytest.mark.django_db
def test_deleting_a_permission_tells_the_workers_who_held_it():
    """Deleting a permission writes realtime.user_changed naming its direct holders and the groups holding it."""
    perm = custom_permission()
    alice = make_user("alice")
    make_user("bob")  # holds nothing
    make_user("root", superuser=True)  # holds every permission anyway
    agents = Group.objects.create(name="agents")
    Group.objects.create(name="others")
    alice.user_permissions.add(perm)
    agents.permissions.add(perm)
    Event.objects.all().delete()  # the control events of the setup
    with transaction.atomic():
        perm.delete()
    assert user_changed_events() == [{"users": [alice.pk], "groups": ["agents"]}]


@pytest.mark.django_db
def test_deleting_an_unheld_permission_writes_nothing():
    """A permission nobody holds is deleted without any event."""
    custom_permission().delete()
    assert not Event.objects.exists()


@pytest.mark.django_db
def test_deleting_a_content_type_tells_the_workers_who_held_its_permissions():
    """A cascade (content type -> its permissions) sends pre_delete for each permission: the holders are named."""
    content_type = ContentType.objects.create(app_label="realtime_tests", model="gadget")
    view = Permission.objects.create(codename="view_gadget", name="Can view gadget", content_type=content_type)
    change = Permission.objects.create(codename="change_gadget", name="Can change gadget", content_type=content_type)
    alice, bob = make_user("alice"), make_user("bob")
    alice.user_permissions.add(view)
    fixers = Group.objects.create(name="fixers")
    fixers.permissions.add(change)
    bob.groups.add(fixers)
    Event.objects.all().delete()
    with transaction.atomic():
        content_type.delete()
    assert not Permission.objects.filter(pk__in=[view.pk, change.pk]).exists()
    assert sorted(user_changed_events(), key=json.dumps) == sorted(
        [{"users": [alice.pk], "groups": []}, {"users": [], "groups": ["fixers"]}], key=json.dumps
    )


@pytest.mark.django_db(transaction=True)
def test_holder_stops_receiving_a_deleted_permissions_events(worker):
    """Once the only permission a user held is deleted, that user's connection no longer gets its events."""
    perm = custom_permission()
    name = f"{perm.content_type.app_label}.{perm.codename}"
    alice = make_user("alice")
    alice.user_permissions.add(perm)
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    publish("before", {}, permission=name)
    assert receive_events(ws, 1)[0]["event"] == "before"
    perm.delete()
    time.sleep(1.0)  # the re-check runs off the event loop; "about a second" is the promise
    publish("after-delete", {}, permission=name)
    publish("sentinel", {}, users=[alice])
    assert receive_events(ws, 1)[0]["event"] == "sentinel"
    ws.close()
