"""The registry of connected clients: routing by audience, and every change told to its observer once.

Unit tests: no socket, no database. The agreement of ``recipients()`` with the
audience rule over random inputs is in ``tests/test_audience_rule.py``; here,
each audience kind and each change on known examples.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from realtime.core.audience import Audience, Identity
from realtime.worker.registry import Client, Registry


def identity(
    user_id: int,
    *,
    session: str | None = None,
    staff: bool = False,
    superuser: bool = False,
    groups: Iterable[str] = (),
    permissions: Iterable[str] = (),
) -> Identity:
    return Identity(
        user_id=user_id,
        username=f"user{user_id}",
        session_hash=session or f"session{user_id}",
        is_staff=staff,
        is_superuser=superuser,
        groups=frozenset(groups),
        permissions=frozenset(permissions),
    )


def connect(registry: Registry, user_id: int, *, topics: Iterable[str] = (), **rights: Any) -> Client:
    """Register a client of ``user_id`` with ``rights`` (the keyword arguments of :func:`identity`)."""
    client = Client(object(), identity(user_id, **rights))
    registry.add(client, topics)
    return client


def recipients(registry: Registry, **audience: Any) -> list[Client]:
    """``registry.recipients()`` as a list, after checking that it names each client once."""
    found = list(registry.recipients(Audience(**audience)))
    assert len(found) == len(set(found)), found
    return found


class Recorder:
    """An observer that records what it is told, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Client, object]] = []

    def joined(self, client: Client) -> None:
        self.calls.append(("joined", client, client.topics))

    def left(self, client: Client) -> None:
        self.calls.append(("left", client, None))

    def subscribed(self, client: Client, topic: str) -> None:
        self.calls.append(("subscribed", client, topic))

    def unsubscribed(self, client: Client, topic: str) -> None:
        self.calls.append(("unsubscribed", client, topic))


# recipients(), by audience kind


def test_users_audience_reaches_every_connection_of_those_users():
    """An audience of users reaches all their connections and no one else's."""
    registry = Registry()
    first, second = connect(registry, 1), connect(registry, 1, session="other")
    third = connect(registry, 3)
    connect(registry, 2)
    assert set(recipients(registry, users=[1])) == {first, second}
    assert set(recipients(registry, users=[1, 3, 99])) == {first, second, third}
    assert recipients(registry, users=[99]) == []


def test_groups_audience_reaches_members_of_any_named_group():
    """An audience of groups reaches the members of any of them, not members of other groups."""
    registry = Registry()
    red = connect(registry, 1, groups=["red"])
    both = connect(registry, 2, groups=["red", "blue"])
    blue = connect(registry, 3, groups=["blue"])
    connect(registry, 4, groups=["green"])
    connect(registry, 5)
    assert set(recipients(registry, groups=["red"])) == {red, both}
    assert set(recipients(registry, groups=["red", "blue"])) == {red, both, blue}
    assert recipients(registry, groups=["nobody"]) == []


def test_permission_audience_reaches_holders_and_superusers():
    """A permission reaches those who hold it and every superuser, who holds every permission."""
    registry = Registry()
    holder = connect(registry, 1, permissions=["auth.view_user"])
    root = connect(registry, 2, superuser=True)
    connect(registry, 3, permissions=["auth.change_group"])
    connect(registry, 4, staff=True)
    assert set(recipients(registry, permissions=["auth.view_user"])) == {holder, root}
    assert recipients(registry, permissions=["auth.delete_user"]) == [root]


def test_superusers_receive_nothing_by_being_superusers_alone():
    """Without a permission in the audience, being a superuser reaches nothing."""
    registry = Registry()
    connect(registry, 1, superuser=True, staff=True, groups=["red"])
    assert recipients(registry, users=[2], groups=["blue"], topic="t") == []


def test_staff_audience_reaches_staff_only():
    """The staff audience reaches staff connections, superusers who are not staff excluded."""
    registry = Registry()
    staff = connect(registry, 1, staff=True)
    staff_root = connect(registry, 2, staff=True, superuser=True)
    connect(registry, 3, superuser=True)
    connect(registry, 4)
    assert set(recipients(registry, staff=True)) == {staff, staff_root}


def test_everyone_audience_reaches_every_client_in_connection_order():
    """Everyone reaches every registered client, once, in the order they connected."""
    registry = Registry()
    clients = [connect(registry, 1), connect(registry, 2, staff=True), connect(registry, 1, topics=["t"])]
    assert recipients(registry, everyone=True) == clients
    assert recipients(registry, everyone=True, users=[1], topic="t") == clients


def test_topic_audience_reaches_subscribers_only():
    """A topic reaches the clients subscribed to it, whoever they are."""
    registry = Registry()
    subscriber = connect(registry, 1, topics=["room:1"])
    other_room = connect(registry, 2, topics=["room:2"])
    connect(registry, 3)
    later = connect(registry, 4)
    registry.subscribe(later, "room:1")
    assert set(recipients(registry, topic="room:1")) == {subscriber, later}
    assert recipients(registry, topic="room:2") == [other_room]
    assert recipients(registry, topic="room:3") == []


def test_staff_only_keeps_the_staff_among_any_audience():
    """staff_only narrows every other part of an audience (everyone included) to staff connections."""
    registry = Registry()
    staff = connect(registry, 1, staff=True, groups=["red"], topics=["t"])
    connect(registry, 2, groups=["red"], topics=["t"])
    root = connect(registry, 3, superuser=True)
    staff_root = connect(registry, 4, superuser=True, staff=True)
    assert recipients(registry, users=[1, 2], staff_only=True) == [staff]
    assert recipients(registry, groups=["red"], staff_only=True) == [staff]
    assert recipients(registry, topic="t", staff_only=True) == [staff]
    assert recipients(registry, permissions=["auth.view_user"], staff_only=True) == [staff_root]
    assert set(recipients(registry, everyone=True, staff_only=True)) == {staff, staff_root}
    assert root not in recipients(registry, everyone=True, staff_only=True)
    assert recipients(registry, staff_only=True) == []


def test_a_client_matching_several_parts_is_a_recipient_once():
    """A client named by its user, group, permission, staff flag and topic at once receives the event once."""
    registry = Registry()
    client = connect(
        registry, 1, staff=True, superuser=True, groups=["red"], permissions=["auth.view_user"], topics=["t"]
    )
    audience = {"users": [1], "groups": ["red"], "permissions": ["auth.view_user"], "staff": True, "topic": "t"}
    assert recipients(registry, **audience) == [client]
    assert recipients(registry, **audience, everyone=True) == [client]


# remove()


def test_remove_drops_every_index_entry_and_is_idempotent():
    """After remove(), once or twice, no lookup and no audience finds the client; others stay."""
    registry = Registry()
    rights = {"session": "s", "staff": True, "groups": ["red"], "permissions": ["auth.view_user"]}
    gone = connect(registry, 1, topics=["t"], **rights)
    stays = connect(registry, 2, topics=["t"], **rights)
    registry.remove(gone)
    registry.remove(gone)
    assert len(registry) == 1
    assert registry.for_user(1) == set()
    assert registry.for_group("red") == {stays}
    assert registry.for_session("s") == {stays}
    audiences = [
        {"users": [1, 2]},
        {"groups": ["red"]},
        {"permissions": ["auth.view_user"]},
        {"staff": True},
        {"everyone": True},
        {"topic": "t"},
    ]
    for audience in audiences:
        assert recipients(registry, **audience) == [stays], audience
    # user 2, group red, permission, topic t, session s: user 1's own key went with it.
    assert registry.index_keys() == 5
    registry.remove(stays)
    assert registry.index_keys() == 0  # nothing keyed by clients that have left


def test_removing_a_superuser_forgets_it_for_every_permission():
    """A removed superuser no longer receives permission audiences."""
    registry = Registry()
    root = connect(registry, 1, superuser=True)
    registry.remove(root)
    assert recipients(registry, permissions=["auth.view_user"]) == []
    assert len(registry) == 0


# update_identity()


def test_update_identity_reindexes_groups_permissions_and_flags():
    """New rights are routed by at once; rights taken away (a group, a permission, staff) no longer match."""
    registry = Registry()
    client = connect(registry, 1, staff=True, groups=["red", "blue"], permissions=["auth.view_user"])
    registry.update_identity(client, identity(1, groups=["blue", "green"], permissions=["auth.change_group"]))
    assert recipients(registry, groups=["red"]) == []
    assert registry.for_group("red") == set()
    assert recipients(registry, groups=["green"]) == [client]
    assert registry.for_group("blue") == {client}
    assert recipients(registry, permissions=["auth.view_user"]) == []
    assert recipients(registry, permissions=["auth.change_group"]) == [client]
    assert recipients(registry, staff=True) == []
    assert recipients(registry, users=[1]) == [client]
    assert registry.for_session("session1") == {client}


def test_update_identity_to_and_from_superuser():
    """Becoming a superuser grants every permission; ceasing to be one takes them back."""
    registry = Registry()
    client = connect(registry, 1)
    registry.update_identity(client, identity(1, superuser=True))
    assert recipients(registry, permissions=["auth.delete_user"]) == [client]
    registry.update_identity(client, identity(1))
    assert recipients(registry, permissions=["auth.delete_user"]) == []


def test_update_identity_keeps_topics():
    """A rights change alone does not touch the client's subscriptions."""
    registry = Registry()
    client = connect(registry, 1, topics=["t"], groups=["red"])
    registry.update_identity(client, identity(1))
    assert client.topics == {"t"}
    assert recipients(registry, topic="t") == [client]


# subscribe() and unsubscribe()


def test_subscribe_and_unsubscribe_route_topic_events():
    """A client receives a topic's events from its subscription until its unsubscription."""
    registry = Registry()
    client = connect(registry, 1, topics=["a"])
    registry.subscribe(client, "b")
    assert client.topics == {"a", "b"}
    assert recipients(registry, topic="b") == [client]
    registry.unsubscribe(client, "a")
    assert client.topics == {"b"}
    assert recipients(registry, topic="a") == []
    assert recipients(registry, topic="b") == [client]


def test_subscribe_of_an_unregistered_client_does_nothing():
    """A client that is not (or no longer) registered cannot be subscribed: a closed client stays out of routing."""
    registry = Registry()
    client = Client(object(), identity(1))
    registry.subscribe(client, "t")
    assert client.topics == frozenset()
    assert recipients(registry, topic="t") == []
    removed = connect(registry, 2)
    registry.remove(removed)
    registry.subscribe(removed, "t")
    assert recipients(registry, topic="t") == []


# The observer


def test_observer_is_told_of_each_change_once():
    """add, subscribe, unsubscribe and remove are each told to the observer exactly once, in order."""
    recorder = Recorder()
    registry = Registry(observer=recorder)
    client = connect(registry, 1, topics=["a", "b"])
    registry.subscribe(client, "c")
    registry.unsubscribe(client, "a")
    registry.remove(client)
    assert recorder.calls == [
        ("joined", client, frozenset({"a", "b"})),
        ("subscribed", client, "c"),
        ("unsubscribed", client, "a"),
        ("left", client, None),
    ]


def test_observer_is_not_told_of_what_changes_nothing():
    """Unsubscribing from a topic not held, a second remove() and a rights change tell the observer nothing."""
    recorder = Recorder()
    registry = Registry(observer=recorder)
    client = connect(registry, 1, topics=["a"])
    recorder.calls.clear()
    registry.unsubscribe(client, "never")
    registry.update_identity(client, identity(1, groups=["red"]))
    assert recorder.calls == []
    registry.remove(client)
    registry.remove(client)
    assert recorder.calls == [("left", client, None)]
    registry.subscribe(client, "b")  # removed: not subscribed, so not told
    assert recorder.calls == [("left", client, None)]


def test_the_observer_hears_no_repeats_and_nothing_after_removal():
    """Subscribing to a held topic, or unsubscribing a removed client, tells the observer nothing."""
    observer = Recorder()
    registry = Registry(observer)
    client = connect(registry, 1, topics=["t"])
    registry.subscribe(client, "t")
    registry.remove(client)
    registry.unsubscribe(client, "t")
    assert observer.calls == [("joined", client, frozenset({"t"})), ("left", client, None)]
