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

``check()`` returns the identity or the reason it was refused; ``verify()``
returns None on any failure. Reasons are logged at INFO, never the token.
Both do database work: call them from a thread in async code.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable
from datetime import timedelta
from importlib import import_module
from typing import Any

from django.conf import settings as django_settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, load_backend
from django.core import signing
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from realtime.conf import settings
from realtime.core.audience import Identity, digest
from realtime.models import Ticket

__all__ = [
    "Identity",
    "Refused",
    "check",
    "check_session_data",
    "check_user",
    "identity_for_session",
    "make_identity",
    "mint",
    "open_token",
    "refused",
    "verify",
]

SALT = "realtime.tokens"
logger = logging.getLogger("realtime.auth")

# Why a token or a session is refused: the same words from both login paths
# (here through the ORM, and realtime.worker.verifier in one SQL statement).
BAD_TOKEN = "bad token signature or format"
SIGNATURE_EXPIRED = "token signature expired"
TOKEN_UNKNOWN = "token unknown or already used"
TOKEN_EXPIRED = "token expired"
SESSION_ENDED = "session ended"
OTHER_USER = "session belongs to another user"
BACKEND_DISABLED = "session backend no longer enabled"
USER_INACTIVE = "user unknown or inactive"
PASSWORD_CHANGED = "session auth hash changed (password changed)"
# Refusals decided from the token alone, before any database work.
FREE_REFUSALS = frozenset({BAD_TOKEN, SIGNATURE_EXPIRED})


def mint(user: Any, session_key: str) -> str:
    """Return a new token for ``user`` logged in with session ``session_key``."""
    nonce = secrets.token_urlsafe(18)
    now = timezone.now()
    # Expired tickets are useless: drop them while we are here (indexed).
    Ticket.objects.filter(expires_at__lt=now).delete()
    Ticket.objects.create(
        nonce_hash=digest(nonce),
        session_key=session_key,
        user_id=user.pk,
        expires_at=now + timedelta(seconds=settings.TOKEN_MAX_AGE),
    )
    return signing.dumps({"u": user.pk, "n": nonce}, salt=SALT)


def verify(token: str) -> Identity | None:
    """Consume ``token`` and return the identity it proves, or None (reason logged)."""
    identity, _ = check(token)
    return identity


def check(token: str) -> tuple[Identity | None, str]:
    """Consume ``token``; return ``(identity, "")`` or ``(None, reason)``.

    The reason is for logs ("token expired", "session ended", ...); never
    show it to the client, which only learns 4401.
    """
    try:
        return _identity_for_token(token), ""
    except Refused as refusal:
        return None, refused(refusal)


def _identity_for_token(token: str) -> Identity:
    user_id, nonce = open_token(token)
    ticket = Ticket.objects.filter(nonce_hash=digest(nonce), user_id=user_id).first()
    if ticket is None:
        raise Refused(TOKEN_UNKNOWN)
    # Single use: whoever deletes the row wins; a replay finds nothing.
    if Ticket.objects.filter(pk=ticket.pk).delete()[0] != 1:
        raise Refused(TOKEN_UNKNOWN)
    if ticket.expires_at < timezone.now():
        raise Refused(TOKEN_EXPIRED)
    return _identity_for_session(ticket.session_key, user_id)


def open_token(token: str) -> tuple[int, str]:
    """Return the ``(user_id, nonce)`` a token carries; raise :class:`Refused` if forged, malformed or too old."""
    try:
        payload = signing.loads(token, salt=SALT, max_age=settings.TOKEN_MAX_AGE)
        user_id, nonce = payload["u"], payload["n"]
        if not isinstance(nonce, str) or not isinstance(user_id, int):
            raise TypeError
    except signing.SignatureExpired:
        raise Refused(SIGNATURE_EXPIRED) from None
    except (signing.BadSignature, KeyError, TypeError, ValueError):
        raise Refused(BAD_TOKEN) from None
    return user_id, nonce


def identity_for_session(session_key: str, user_id: int) -> Identity | None:
    """Return the identity of ``user_id`` if ``session_key`` is still their live session, else None."""
    try:
        return _identity_for_session(session_key, user_id)
    except Refused as refusal:
        refused(refusal, user_id=user_id)
        return None


def _identity_for_session(session_key: str, user_id: int) -> Identity:
    engine = import_module(django_settings.SESSION_ENGINE)
    # load() gives {} for a session that is gone or expired, and changes nothing.
    data = engine.SessionStore(session_key).load()
    if not data:
        raise Refused(SESSION_ENDED)
    backend_path = check_session_data(data, user_id)
    user = check_user(load_backend(backend_path).get_user(user_id), data)
    return make_identity(
        user,
        session_key,
        groups=user.groups.values_list("name", flat=True),
        permissions=user.get_all_permissions(),
    )


def check_session_data(data: dict[str, Any], user_id: int) -> str:
    """Check a loaded session is ``user_id``'s under an enabled backend; return the backend's path."""
    if str(data.get(SESSION_KEY)) != str(user_id):
        raise Refused(OTHER_USER)
    backend_path = data.get(BACKEND_SESSION_KEY)
    if backend_path not in django_settings.AUTHENTICATION_BACKENDS:
        raise Refused(BACKEND_DISABLED)
    return str(backend_path)


def check_user(user: Any, data: dict[str, Any]) -> Any:
    """Check ``user`` (None if unknown) may still use the session whose data is ``data``; return it.

    The same checks as ``django.contrib.auth.get_user()``, without its side
    effects (it flushes or cycles the session, which would log the browser out).
    """
    if user is None or not user.is_active:
        raise Refused(USER_INACTIVE)
    session_auth_hash = data.get(HASH_SESSION_KEY) or ""
    if hasattr(user, "get_session_auth_hash"):
        candidates = [user.get_session_auth_hash(), *user.get_session_auth_fallback_hash()]
        if not session_auth_hash or not any(constant_time_compare(session_auth_hash, c) for c in candidates):
            raise Refused(PASSWORD_CHANGED)
    return user


def make_identity(user: Any, session_key: str, *, groups: Iterable[str], permissions: Iterable[str]) -> Identity:
    """Return the :class:`Identity` of a checked ``user`` on session ``session_key``."""
    return Identity(
        user_id=user.pk,
        username=user.get_username(),
        session_hash=digest(session_key),
        is_staff=bool(getattr(user, "is_staff", False)),
        is_superuser=bool(getattr(user, "is_superuser", False)),
        groups=_shared(groups),
        permissions=_shared(permissions),
        session_key=session_key,
    )


# Users mostly share a few sets of groups and permissions (often none): one
# copy of each set serves every connection that holds it.
_SHARED_SETS: dict[frozenset[str], frozenset[str]] = {}
_SHARED_SETS_MAX = 10_000


def _shared(names: Iterable[str]) -> frozenset[str]:
    names = frozenset(names)
    if len(_SHARED_SETS) >= _SHARED_SETS_MAX:
        _SHARED_SETS.clear()  # unusual: that many distinct sets; start again
    return _SHARED_SETS.setdefault(names, names)


def refused(refusal: Refused, *, user_id: int | None = None) -> str:
    """Log a refusal (a login's, or a session re-check's for ``user_id``) and return its reason.

    The one logging point of both login paths; reasons are for logs only (the client learns 4401).
    """
    if user_id is None:
        logger.info("authentication refused: %s", refusal.reason)
    else:
        logger.info("session re-check refused user %s: %s", user_id, refusal.reason)
    return refusal.reason


class Refused(Exception):
    """Why a token or session does not authenticate (for logs only)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
