"""Rights that change while connected take effect without reconnecting; slow clients hurt only themselves."""

from __future__ import annotations

import json
import time

import pytest
from django.contrib.auth.models import Group, Permission

from realtime import publish
from tests.helpers import (
    ORIGIN,
    assert_nothing_more,
    get_token,
    logged_in,
    make_user,
    open_ws,
    receive_events,
    start_worker,
)
from tests.rawws import raw_connect, send_text

pytestmark = pytest.mark.django_db(transaction=True)


def test_permission_granted_and_revoked_while_connected(worker):
    """Granting a permission starts delivery and revoking it stops it, on the same connection."""
    alice = make_user("alice")
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    publish("before", {}, permission="auth.view_user")
    assert_nothing_more(ws, alice)
    perm = Permission.objects.get(content_type__app_label="auth", codename="view_user")
    perm.user_set.add(alice)  # from the Permission side
    # Rights changes apply in commit order: the first event published after the grant is delivered.
    publish("granted", {}, permission="auth.view_user")
    assert [e["event"] for e in receive_events(ws, 1)] == ["granted"]
    perm.user_set.clear()  # a clear from the Permission side too
    publish("after-revoke", {}, permission="auth.view_user")
    assert_nothing_more(ws, alice)
    ws.close()


def test_group_permissions_follow_membership_and_group_changes(worker):
    """Joining a group with a permission, and the group losing it, both apply live."""
    alice = make_user("alice")
    ws, _ = open_ws(worker, get_token(logged_in(alice)))
    staffers = Group.objects.create(name="staffers")
    perm = Permission.objects.get(content_type__app_label="auth", codename="change_group")
    staffers.permissions.add(perm)
    alice.groups.add(staffers)
    publish("via-group", {}, permission="auth.change_group")
    publish("to-group", {}, groups=["staffers"])
    assert [e["event"] for e in receive_events(ws, 2)] == ["via-group", "to-group"]
    staffers.delete()
    publish("after-delete", {}, permission="auth.change_group")
    publish("after-delete", {}, groups=["staffers"])
    assert_nothing_more(ws, alice)
    ws.close()


def test_slow_reader_is_closed_1013_and_others_get_everything(transactional_db):
    """A client that stops reading is closed with 1013 once its buffer passes MAX_BUFFER; a reader misses nothing."""
    worker = start_worker(realtime={"MAX_BUFFER": 256 * 1024})
    try:
        alice = make_user("alice")
        good, _ = open_ws(worker, get_token(logged_in(alice)))
        slow = raw_connect(worker.port, rcvbuf=4096, origin=ORIGIN)
        send_text(slow, json.dumps({"type": "auth", "token": get_token(logged_in(alice)), "last_id": None}))
        time.sleep(0.3)  # authenticated; from now on it never reads
        blob = "x" * 100_000
        for n in range(60):
            publish("bulk", {"n": n, "blob": blob}, users=[alice])
        events = receive_events(good, 60, timeout=60)
        assert [e["data"]["n"] for e in events] == list(range(60))
        _, text = worker.http("/metrics")
        assert "realtime_slow_clients_closed_total 1.0" in text, worker.log()[-3000:]
        assert "closed 1013: not reading fast enough" in worker.log()
        _, text = worker.http("/metrics")
        assert "realtime_connections 1.0" in text  # the slow one is out of the registry
        good.close()
        slow.close()
    finally:
        worker.stop()
