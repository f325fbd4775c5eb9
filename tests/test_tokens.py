"""Tokens: the endpoint, and every way a token must be refused (4401)."""

from __future__ import annotations

import json
import time

import pytest
from django.core import signing
from django.test import Client as HttpClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from realtime import tokens
from realtime.models import Ticket
from tests.helpers import ORIGIN, WAIT, get_token, logged_in, make_user

pytestmark = pytest.mark.django_db(transaction=True)


def auth_close_code(worker, token: str) -> int | None:
    """Authenticate with ``token``; return the close code, or None if welcomed."""
    with connect(worker.url, origin=ORIGIN) as ws:
        ws.send(json.dumps({"type": "auth", "token": token, "last_id": None}))
        try:
            message = json.loads(ws.recv(WAIT))
        except ConnectionClosed as exc:
            return exc.rcvd.code
        assert message["type"] == "welcome"
        return None


def test_token_endpoint_contract():
    """Logged in: 200 with token, url and expires_in, never cached; anonymous: 401 with an error."""
    alice = make_user("alice")
    response = logged_in(alice).get("/realtime/token/")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token", "url", "expires_in"}
    assert body["url"] == "ws://testserver:8765/"
    assert body["expires_in"] == 60
    assert "no-store" in response["Cache-Control"]
    anonymous = HttpClient().get("/realtime/token/")
    assert anonymous.status_code == 401
    assert anonymous.json() == {"error": "Authentication required: log in first."}


def test_tokens_minted_in_the_same_second_differ():
    """Two tokens for one session are distinct, so single use refuses neither."""
    client = logged_in(make_user("alice"))
    assert get_token(client) != get_token(client)


def test_valid_token_is_accepted_once(worker):
    """A fresh token authenticates; the same token replayed is refused with 4401."""
    token = get_token(logged_in(make_user("alice")))
    assert auth_close_code(worker, token) is None
    assert auth_close_code(worker, token) == 4401


def test_tampered_token_is_refused(worker):
    """Changing one character of the signature invalidates the token."""
    token = get_token(logged_in(make_user("alice")))
    tampered = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert auth_close_code(worker, tampered) == 4401


def test_token_for_another_user_is_refused(worker):
    """Re-signing is impossible without the key, and a payload naming another user finds no ticket."""
    alice, bob = make_user("alice"), make_user("bob")
    token = get_token(logged_in(alice))
    payload = signing.loads(token, salt=tokens.SALT)
    forged = signing.dumps({"u": bob.pk, "n": payload["n"]}, salt="wrong-salt")
    assert auth_close_code(worker, forged) == 4401


def test_expired_token_is_refused(worker):
    """A token older than TOKEN_MAX_AGE is refused even though its ticket exists."""

    class Past(signing.TimestampSigner):
        def timestamp(self) -> str:
            return signing.b62_encode(int(time.time()) - 3600)

    token = get_token(logged_in(make_user("alice")))
    payload = signing.loads(token, salt=tokens.SALT)
    old = Past(salt=tokens.SALT).sign_object(payload)
    assert auth_close_code(worker, old) == 4401
    assert tokens.verify(old) is None


def test_token_of_logged_out_session_is_refused(worker):
    """After logout the session is gone, so its unused token is refused."""
    client = logged_in(make_user("alice", staff=True))
    token = get_token(client)
    client.post("/admin/logout/")
    assert auth_close_code(worker, token) == 4401


def test_token_of_inactive_user_is_refused(worker):
    """A user deactivated after minting cannot connect."""
    alice = make_user("alice")
    token = get_token(logged_in(alice))
    alice.is_active = False
    alice.save()
    assert auth_close_code(worker, token) == 4401


def test_token_after_password_change_is_refused(worker):
    """A password change invalidates the session's auth hash, hence its tokens."""
    alice = make_user("alice")
    token = get_token(logged_in(alice))
    alice.set_password("new-password-123")
    alice.save()
    assert auth_close_code(worker, token) == 4401


def test_verify_consumes_the_ticket_and_reports_identity():
    """verify() returns who the token proves, with groups and permissions, and uses the ticket up."""
    alice = make_user("alice", perms=("auth.view_user",))
    token = get_token(logged_in(alice))
    identity = tokens.verify(token)
    assert identity is not None
    assert (identity.user_id, identity.username) == (alice.pk, "alice")
    assert identity.permissions == {"auth.view_user"}
    assert not Ticket.objects.exists()
    assert tokens.verify(token) is None
