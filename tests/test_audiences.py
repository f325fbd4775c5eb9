"""Randomized: every event reaches exactly the users Django says may see it, live and on replay."""

from __future__ import annotations

import json
import random

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission

from realtime import publish
from tests.helpers import get_token, logged_in, make_user, open_ws, receive

pytestmark = pytest.mark.django_db(transaction=True)

GROUPS = ["red", "green", "blue"]
PERMISSIONS = ["auth.view_user", "auth.change_group", "auth.delete_permission"]
TOPICS = ["t1", "t2", "t3"]


def allowed(user, topics: set[str], audience: dict) -> bool:
    """The oracle, from Django's own answers (has_perm, groups, flags), not from the registry."""
    if not user.is_active:
        return False
    return (
        audience.get("everyone", False)
        or user.pk in audience.get("users", [])
        or (audience.get("staff", False) and user.is_staff)
        or user.groups.filter(name__in=audience.get("groups", [])).exists()
        or (audience.get("permission") is not None and user.has_perm(audience["permission"]))
        or (audience.get("topic") is not None and audience["topic"] in topics)
    )


@pytest.mark.parametrize("seed", [1, 2])
def test_random_audiences_reach_exactly_the_permitted_users(worker, seed):
    """60 events with random audiences over 10 random users: each gets exactly what it may see, live and replayed."""
    rng = random.Random(seed)
    groups = {name: Group.objects.create(name=name) for name in GROUPS}
    permissions = {
        p: Permission.objects.get(content_type__app_label=p.split(".")[0], codename=p.split(".")[1])
        for p in PERMISSIONS
    }
    groups["blue"].permissions.add(permissions["auth.change_group"])  # a permission through a group
    users, sockets, topics, webs = [], {}, {}, {}
    start = None
    for n in range(10):
        user = make_user(f"u{n}", staff=rng.random() < 0.4, superuser=rng.random() < 0.15)
        user.groups.add(*[groups[g] for g in GROUPS if rng.random() < 0.35])
        user.user_permissions.add(*[permissions[p] for p in PERMISSIONS if rng.random() < 0.3])
        user = get_user_model().objects.get(pk=user.pk)  # fresh permission caches
        topics[user.pk] = {t for t in TOPICS if rng.random() < 0.4}
        webs[user.pk] = logged_in(user)
        ws, welcome = open_ws(worker, get_token(webs[user.pk]), topics=sorted(topics[user.pk]))
        start = welcome["last_id"] if start is None else min(start, welcome["last_id"])
        for _ in topics[user.pk]:
            assert receive(ws)["type"] == "subscribed"
        users.append(user)
        sockets[user.pk] = ws
    expected: dict[int, list[int]] = {user.pk: [] for user in users}
    for n in range(60):
        audience: dict = {}
        kind = rng.choice(["users", "groups", "permission", "staff", "topic", "everyone", "mixed"])
        if kind in ("users", "mixed"):
            audience["users"] = [u.pk for u in rng.sample(users, rng.randint(1, 3))]
        if kind in ("groups", "mixed"):
            audience["groups"] = rng.sample(GROUPS, rng.randint(1, 2))
        if kind in ("permission", "mixed"):
            audience["permission"] = rng.choice(PERMISSIONS)
        if kind == "staff":
            audience["staff"] = True
        if kind in ("topic", "mixed"):
            audience["topic"] = rng.choice(TOPICS)
        if kind == "everyone":
            audience["everyone"] = True
        publish("random", {"n": n, "audience": audience}, **audience)
        for user in users:
            if allowed(user, topics[user.pk], audience):
                expected[user.pk].append(n)
    # A final event for everyone marks the end of each stream.
    publish("end", {}, everyone=True)
    for user in users:
        received = []
        while True:
            message = json.loads(sockets[user.pk].recv(10))
            if message["type"] != "event":
                continue
            if message["event"] == "end":
                break
            received.append(message["data"]["n"])
        assert received == expected[user.pk], (seed, user.username, user.is_staff, user.is_superuser)
        sockets[user.pk].close()
    # Replay, filtered by PostgreSQL: a reconnection from before the first event gets the same events.
    for user in users:
        ws, _ = open_ws(worker, get_token(webs[user.pk]), last_id=start, topics=sorted(topics[user.pk]))
        replayed = []
        while True:
            message = json.loads(ws.recv(10))
            if message["type"] != "event":
                continue
            if message["event"] == "end":
                break
            replayed.append(message["data"]["n"])
        assert replayed == expected[user.pk], (seed, user.username, "replay")
        ws.close()
