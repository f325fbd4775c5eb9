"""The wire protocol: parse client messages, serialise server messages.

No I/O here, so every rule of the contract is testable without a socket.
Client messages (JSON text frames):

- first: ``{"type": "auth", "token": "...", "last_id": int | null}`` (and
  optionally ``"topics": [...]`` to subscribe before the replay) or the bare
  token string;
- then: ``{"type": "subscribe" | "unsubscribe", "topic": "..."}`` and
  ``{"type": "ping"}``.

A message that breaks these rules raises :class:`ProtocolError`, which says
whether the connection must close (and with which code) or only gets an
``error`` message back.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any, TypeGuard

__all__ = [
    "Auth",
    "CloseCode",
    "Ping",
    "ProtocolError",
    "Subscribe",
    "Unsubscribe",
    "encode_error",
    "encode_event",
    "encode_pong",
    "encode_reset",
    "encode_subscribed",
    "encode_welcome",
    "parse_auth",
    "parse_message",
]

MAX_TOPIC_LENGTH = 200
# Topics one connection may hold (each is an index entry and a presence row).
MAX_TOPICS = 100
MAX_AUTH_TOPICS = MAX_TOPICS


class CloseCode(enum.IntEnum):
    """Close codes of the wire contract."""

    GOING_AWAY = 1001  # server shutting down
    POLICY_VIOLATION = 1008  # protocol violation
    MESSAGE_TOO_BIG = 1009
    TRY_AGAIN_LATER = 1013  # overloaded or too slow
    AUTH_FAILED = 4401  # authentication failed or revoked
    AUTH_TIMEOUT = 4408  # no authentication in time


class ProtocolError(Exception):
    """A client message broke the protocol.

    ``close_code`` is set when the connection must be closed; otherwise the
    client gets ``{"type": "error", "code": code, "message": message}``.
    """

    def __init__(self, code: str, message: str, close_code: CloseCode | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.close_code = close_code


@dataclass(frozen=True)
class Auth:
    token: str
    last_id: int | None
    # Topics to subscribe before the replay, so a resume includes them.
    topics: tuple[str, ...] = ()


@dataclass(frozen=True)
class Subscribe:
    topic: str


@dataclass(frozen=True)
class Unsubscribe:
    topic: str


@dataclass(frozen=True)
class Ping:
    pass


ClientMessage = Subscribe | Unsubscribe | Ping


def parse_auth(message: str | bytes) -> Auth:
    """Parse the first message of a connection.

    Raises:
        ProtocolError: always with close code 1008 (or 4401 for an empty token).
    """
    if not isinstance(message, str):
        raise ProtocolError("bad_message", "The first message must be text.", CloseCode.POLICY_VIOLATION)
    text = message.strip()
    if not text.startswith(("{", "[", '"')):
        # A bare token string, as in the websockets documentation.
        if not text or any(c.isspace() for c in text):
            raise ProtocolError("bad_token", "The token is empty or malformed.", CloseCode.AUTH_FAILED)
        return Auth(token=text, last_id=None)
    obj = _load_object(message, CloseCode.POLICY_VIOLATION)
    if obj.get("type") != "auth":
        raise ProtocolError(
            "auth_required", 'The first message must be {"type": "auth", ...}.', CloseCode.POLICY_VIOLATION
        )
    token = obj.get("token")
    if not isinstance(token, str) or not token:
        raise ProtocolError("bad_token", "auth.token must be a non-empty string.", CloseCode.AUTH_FAILED)
    last_id = obj.get("last_id")
    if last_id is not None and (isinstance(last_id, bool) or not isinstance(last_id, int) or last_id < 0):
        raise ProtocolError(
            "bad_last_id", "auth.last_id must be a non-negative integer or null.", CloseCode.POLICY_VIOLATION
        )
    topics = obj.get("topics") or []
    if not isinstance(topics, list) or not all(_valid_topic(t) for t in topics) or len(topics) > MAX_AUTH_TOPICS:
        raise ProtocolError(
            "bad_topics",
            f"auth.topics must be a list of at most {MAX_AUTH_TOPICS} topic strings.",
            CloseCode.POLICY_VIOLATION,
        )
    return Auth(token=token, last_id=last_id, topics=tuple(dict.fromkeys(topics)))


def _valid_topic(topic: object) -> TypeGuard[str]:
    """A topic is 1 to MAX_TOPIC_LENGTH printable characters.

    ``isprintable()`` refuses control characters (NUL, which PostgreSQL text
    cannot hold) and lone surrogates (which UTF-8 cannot encode).
    """
    return isinstance(topic, str) and 0 < len(topic) <= MAX_TOPIC_LENGTH and topic.isprintable()


def parse_message(message: str | bytes) -> ClientMessage:
    """Parse a message received after authentication.

    Raises:
        ProtocolError: 1008 for binary frames; an error reply otherwise.
    """
    if not isinstance(message, str):
        raise ProtocolError("bad_message", "Binary frames are not supported.", CloseCode.POLICY_VIOLATION)
    obj = _load_object(message, None)
    kind = obj.get("type")
    if kind == "ping":
        return Ping()
    if kind in ("subscribe", "unsubscribe"):
        topic = obj.get("topic")
        if not _valid_topic(topic):
            raise ProtocolError("bad_topic", f"topic must be a string of 1 to {MAX_TOPIC_LENGTH} printable characters.")
        return Subscribe(topic) if kind == "subscribe" else Unsubscribe(topic)
    if kind == "auth":
        raise ProtocolError("already_authenticated", "This connection is already authenticated.")
    raise ProtocolError("unknown_type", f"Unknown message type: {str(kind)[:50]!r}.")


def _load_object(message: str, close_code: CloseCode | None) -> dict[str, Any]:
    try:
        obj = json.loads(message)
    except (ValueError, RecursionError):
        # RecursionError: nesting deeper than the interpreter's stack ("[" * 1100).
        raise ProtocolError("bad_json", "The message is not valid JSON.", close_code) from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", "The message must be a JSON object.", close_code)
    return obj


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def encode_welcome(user_id: int, username: str, last_id: int) -> str:
    return _dumps({"type": "welcome", "user": {"id": user_id, "username": username}, "last_id": last_id})


def encode_event(position: int, name: str, topic: str | None, data_json: str, at: str) -> str:
    """Serialise an event; ``data_json`` is already-encoded JSON (from jsonb).

    The reference for the format: the worker sends ``realtime.outbox.EVENT_MESSAGE``,
    built by PostgreSQL in the same shape (tests/test_outbox.py keeps them equal).
    """
    return (
        f'{{"type":"event","id":{position},"event":{_dumps(name)},"topic":{_dumps(topic)},'
        f'"data":{data_json},"at":{_dumps(at)}}}'
    )


def encode_reset(last_id: int) -> str:
    return _dumps({"type": "reset", "last_id": last_id})


def encode_pong() -> str:
    return '{"type":"pong"}'


def encode_subscribed(topic: str, subscribed: bool) -> str:
    return _dumps({"type": "subscribed" if subscribed else "unsubscribed", "topic": topic})


def encode_error(code: str, message: str, topic: str | None = None) -> str:
    """An error that keeps the connection open; ``topic`` names a refused subscription."""
    error = {"type": "error", "code": code, "message": message}
    if topic is not None:
        error["topic"] = topic
    return _dumps(error)
