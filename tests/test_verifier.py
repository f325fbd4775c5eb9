"""The worker's one-statement login path gives exactly the ORM path's answers, in every case."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth import BACKEND_SESSION_KEY
from django.contrib.auth.models import Group, Permission
from django.contrib.sessions.backends.db import SessionStore
from django.contrib.sessions.models import Session
from django.core import signing
from django.test import override_settings
from django.utils import timezone

from realtime import tokens
from realtime.models import Ticket
from realtime.worker.verifier import Verifier, sql_path_unsupported
from tests.helpers import get_token, logged_in, make_user

pytestmark = pytest.mark.django_db(transaction=True)


def run_verifier(work: Callable[[Verifier], Any]) -> Any:
    """Open a Verifier in a fresh event loop, await ``work(verifier)``, close it."""

    async def main() -> Any:
        verifier = Verifier()
        await verifier.open()
        try:
            return await work(verifier)
        finally:
            await verifier.close()

    return asyncio.run(main())


def editor() -> Any:
    """A user with a permission of their own, a group, and the group's permission."""
    user = make_user("alice", perms=("auth.view_user",))
    group = Group.objects.create(name="editors")
    group.permissions.add(Permission.objects.get(content_type__app_label="auth", codename="change_group"))
    user.groups.add(group)
    return user


def logout(user: Any, client: Any) -> None:
    client.logout()


def deactivate(user: Any, client: Any) -> None:
    user.is_active = False
    user.save()


def change_password(user: Any, client: Any) -> None:
    user.set_password("another-password-456")
    user.save()


def delete_user(user: Any, client: Any) -> None:
    user.delete()


def expire_tickets(user: Any, client: Any) -> None:
    Ticket.objects.update(expires_at=timezone.now() - timedelta(seconds=1))


def expire_session(user: Any, client: Any) -> None:
    Session.objects.update(expire_date=timezone.now() - timedelta(seconds=1))


def disable_backend(user: Any, client: Any) -> None:
    session = SessionStore(client.session.session_key)
    session[BACKEND_SESSION_KEY] = "somewhere.else.Backend"
    session.save()


def nothing(user: Any, client: Any) -> None:
    pass


CASES = [
    ("valid", nothing, ""),
    ("logged out", logout, "session ended"),
    ("deactivated", deactivate, "user unknown or inactive"),
    ("password changed", change_password, "session auth hash changed (password changed)"),
    ("user deleted", delete_user, "user unknown or inactive"),
    ("ticket expired", expire_tickets, "token expired"),
    ("session expired", expire_session, "session ended"),
    ("backend disabled", disable_backend, "session backend no longer enabled"),
]


@pytest.mark.parametrize(("change", "reason"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_sql_path_agrees_with_the_orm_path(change: Callable[[Any, Any], None], reason: str):
    """Same identity (groups, permissions) or same refusal; each token works once on either path."""
    assert sql_path_unsupported() is None
    user = editor()
    client = logged_in(user)
    session_key = client.session.session_key
    orm_token, sql_token = get_token(client), get_token(client)
    change(user, client)

    orm = tokens.check(orm_token)
    sql = run_verifier(lambda v: v.check(sql_token))
    assert sql == orm
    assert sql[1] == reason
    if not reason:
        identity = sql[0]
        assert identity.username == "alice"
        assert identity.groups == {"editors"}
        assert identity.permissions == {"auth.view_user", "auth.change_group"}
        assert run_verifier(lambda v: v.check(sql_token)) == (None, "token unknown or already used")
    recheck = run_verifier(lambda v: v.identity_for_session(session_key, user.pk))
    if reason in ("", "token expired"):  # a ticket's expiry does not end the session
        assert recheck is not None
        assert recheck == tokens.identity_for_session(session_key, user.pk)
        assert recheck.permissions == {"auth.view_user", "auth.change_group"}
    else:
        assert recheck is None
        assert tokens.identity_for_session(session_key, user.pk) is None


def test_superuser_gets_every_permission_like_model_backend():
    """ModelBackend gives a superuser every permission; so does the statement."""
    root = make_user("root", superuser=True)
    token = get_token(logged_in(root))
    identity, reason = run_verifier(lambda v: v.check(token))
    assert reason == ""
    assert identity.is_superuser
    assert identity.permissions == root.get_all_permissions()
    assert len(identity.permissions) == Permission.objects.count()


def test_forged_and_foreign_tokens_are_refused():
    """A token re-signed for another user finds their ticket but not their session; junk is refused."""
    alice, bob = make_user("alice"), make_user("bob")
    token = get_token(logged_in(alice))
    nonce = signing.loads(token, salt=tokens.SALT)["n"]
    Ticket.objects.update(user_id=bob.pk)  # as if the row named bob: the session is still alice's
    for_bob = signing.dumps({"u": bob.pk, "n": nonce}, salt=tokens.SALT)
    assert run_verifier(lambda v: v.check(for_bob)) == (None, "session belongs to another user")
    assert run_verifier(lambda v: v.check("not-a-token")) == (None, "bad token signature or format")
    unsigned = signing.dumps({"u": alice.pk, "n": nonce}, salt="another-salt")
    assert run_verifier(lambda v: v.check(unsigned)) == (None, "bad token signature or format")


@override_settings(
    AUTHENTICATION_BACKENDS=[
        "django.contrib.auth.backends.ModelBackend",
        "django.contrib.auth.backends.AllowAllUsersModelBackend",
    ]
)
def test_other_set_ups_fall_back_to_the_orm_path():
    """With a backend the statement cannot stand for, logins still work, through the ORM."""
    assert "AUTHENTICATION_BACKENDS" in (sql_path_unsupported() or "")
    user = editor()
    token = get_token(logged_in(user))

    async def check_twice(verifier: Verifier) -> tuple[Any, Any]:
        assert verifier.pool is None
        return await verifier.check(token), await verifier.check(token)

    (identity, reason), replay = run_verifier(check_twice)
    assert reason == "" and identity.permissions == {"auth.view_user", "auth.change_group"}
    assert replay == (None, "token unknown or already used")
