"""Short-lived, single-use connection tokens bound to a Django session.

A token is ``signing.dumps({"u": user_id, "n": nonce})`` under its own salt.
The nonce is random (two tokens minted in the same second differ) and its
SHA-256 is stored in a :class:`~realtime.models.Ticket` row together with the
session key, which never leaves the server. Verification consumes the ticket
(single use), then checks, without side effects on the session, that:

- the signature is valid and younger than ``REALTIME["TOKEN_MAX_AGE"]``;
- the session still exists and still belongs to that user;
- the session's auth hash still matches the user's password (a password
  change logs out), with ``SECRET_KEY_FALLBACKS`` honoured;
- the user's authentication backend still accepts the user (active users only).

``verify()`` returns None on any failure and logs the reason at INFO, never
the token. It does database work: call it from a thread in async code.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import import_module
from typing import Any

from django.conf import settings as django_settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, load_backend
from django.core import signing
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from realtime.conf import settings
from realtime.models import Ticket

__all__ = ["Identity", "mint", "verify"]

SALT = "realtime.tokens"
logger = logging.getLogger("realtime.auth")


@dataclass(frozen=True)
class Identity:
    """Who a connection belongs to, and what they may receive."""

    user_id: int
    username: str
    session_hash: str
    is_staff: bool
    is_superuser: bool
    groups: frozenset[str]
    permissions: frozenset[str]
    # Kept in the worker's memory to re-check the session; never logged.
    session_key: str = field(repr=False, default="")

    def has_perm(self, permission: str) -> bool:
        return self.is_superuser or permission in self.permissions


def mint(user: Any, session_key: str) -> str:
    """Return a new token for ``user`` logged in with session ``session_key``."""
    nonce = secrets.token_urlsafe(18)
    now = timezone.now()
    # Expired tickets are useless: drop them while we are here (indexed).
    Ticket.objects.filter(expires_at__lt=now).delete()
    Ticket.objects.create(
        nonce_hash=_hash(nonce),
        session_key=session_key,
        user_id=user.pk,
        expires_at=now + timedelta(seconds=settings.TOKEN_MAX_AGE),
    )
    return signing.dumps({"u": user.pk, "n": nonce}, salt=SALT)


def verify(token: str) -> Identity | None:
    """Consume ``token`` and return the identity it proves, or None."""
    try:
        payload = signing.loads(token, salt=SALT, max_age=settings.TOKEN_MAX_AGE)
        user_id, nonce = payload["u"], payload["n"]
        if not isinstance(nonce, str):
            raise TypeError
    except signing.SignatureExpired:
        return _refuse("token expired")
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        return _refuse("bad token signature or format")
    ticket = Ticket.objects.filter(nonce_hash=_hash(nonce), user_id=user_id).first()
    if ticket is None:
        return _refuse("token unknown or already used")
    # Single use: whoever deletes the row wins; a replay finds nothing.
    if Ticket.objects.filter(pk=ticket.pk).delete()[0] != 1:
        return _refuse("token already used")
    if ticket.expires_at < timezone.now():
        return _refuse("token expired")
    return identity_for_session(ticket.session_key, user_id)


def identity_for_session(session_key: str, user_id: int) -> Identity | None:
    """Return the identity of ``user_id`` if ``session_key`` is still their live session."""
    engine = import_module(django_settings.SESSION_ENGINE)
    session = engine.SessionStore(session_key)
    if not session.exists(session_key):
        return _refuse("session ended")
    data = session.load()
    if str(data.get(SESSION_KEY)) != str(user_id):
        return _refuse("session belongs to another user")
    backend_path = data.get(BACKEND_SESSION_KEY)
    if backend_path not in django_settings.AUTHENTICATION_BACKENDS:
        return _refuse("session backend no longer enabled")
    user = load_backend(backend_path).get_user(user_id)
    if user is None or not user.is_active:
        return _refuse("user unknown or inactive")
    # Same check as django.contrib.auth.get_user(), without its side effects
    # (it flushes or cycles the session, which would log the browser out).
    session_auth_hash = data.get(HASH_SESSION_KEY) or ""
    if hasattr(user, "get_session_auth_hash"):
        candidates = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]
        if not session_auth_hash or not any(constant_time_compare(session_auth_hash, c) for c in candidates):
            return _refuse("session auth hash changed (password changed)")
    from realtime.signals import session_hash

    return Identity(
        user_id=user.pk,
        username=user.get_username(),
        session_hash=session_hash(session_key),
        is_staff=user.is_staff,
        is_superuser=user.is_superuser,
        groups=frozenset(user.groups.values_list("name", flat=True)),
        permissions=frozenset(user.get_all_permissions()),
        session_key=session_key,
    )


def _hash(nonce: str) -> str:
    return hashlib.sha256(nonce.encode()).hexdigest()


def _refuse(reason: str) -> None:
    logger.info("authentication refused: %s", reason)
    return None
