"""A small synchronous Python client that keeps its cursor across reconnects.

For scripts and tests::

    from realtime.client import RealtimeClient, session_token_provider

    tokens = session_token_provider("http://127.0.0.1:8000", sessionid="...")
    with RealtimeClient("ws://127.0.0.1:8765/", tokens) as client:
        for message in client:              # events and resets, forever
            print(message["event"], message["data"])

After any disconnect other than 4401 it reconnects with exponential backoff and
jitter, fetches a fresh token, and resumes from the last event id it saw, so it
receives every event exactly once and in order. An event at or below that id
is dropped (and counted in ``duplicates``) as a defence; the server never
sends one. A ``reset`` message (cursor older than retention) is returned to
the caller, who should reload its state.
"""

from __future__ import annotations

import http.cookiejar
import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin

__all__ = ["AuthenticationFailed", "RealtimeClient", "session_token_provider"]

AUTH_FAILED = 4401


class AuthenticationFailed(Exception):
    """The server refused the token or revoked the session (close code 4401)."""


class RealtimeClient:
    """Receive events from a realtime worker, resuming after disconnects.

    Args:
        url: the websocket URL, e.g. ``ws://127.0.0.1:8765/``.
        get_token: returns a fresh token for each connection attempt.
        last_id: resume after this event id (None: only new events).
        topics: topics to subscribe to with each authentication.
        min_delay, max_delay: bounds of the reconnection backoff, in seconds.
        origin: the ``Origin`` header to send. The worker refuses a missing
            Origin unless ``None`` is in ``REALTIME["ALLOWED_ORIGINS"]``; send
            your site's origin, e.g. ``https://example.com``.
    """

    def __init__(
        self,
        url: str,
        get_token: Callable[[], str],
        *,
        last_id: int | None = None,
        topics: Iterable[str] = (),
        min_delay: float = 0.05,
        max_delay: float = 5.0,
        origin: str | None = None,
    ) -> None:
        self.url = url
        self.origin = origin
        self.get_token = get_token
        self.last_id = last_id
        self.topics = list(topics)
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.connections = 0  # successful authentications
        self.duplicates = 0  # events dropped because their id was not above last_id
        self.resets = 0
        self._ws: ClientConnection | None = None
        self._attempt = 0

    def __enter__(self) -> RealtimeClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self.recv()

    def connect(self, timeout: float | None = 30.0) -> None:
        """Connect and authenticate now (``recv()`` does it on demand).

        Raises:
            TimeoutError: if no connection succeeds within ``timeout`` seconds.
            AuthenticationFailed: if the server refuses the token.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._ws is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"cannot connect to {self.url}")
            self._connect(deadline)

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def recv(self, timeout: float | None = None) -> dict[str, Any]:
        """Return the next event (or reset) message, reconnecting as needed.

        Raises:
            TimeoutError: if nothing arrives within ``timeout`` seconds.
            AuthenticationFailed: if the server closes with 4401.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError("no event in time")
            if self._ws is None:
                self._connect(deadline)
                continue
            try:
                message: dict[str, Any] = json.loads(self._ws.recv(remaining))
            except ConnectionClosed as exc:
                self._ws = None
                if exc.rcvd is not None and exc.rcvd.code == AUTH_FAILED:
                    raise AuthenticationFailed(exc.rcvd.reason) from None
                continue
            kind = message.get("type")
            if kind == "event":
                if self.last_id is not None and message["id"] <= self.last_id:
                    self.duplicates += 1
                    continue
                self.last_id = message["id"]
                return message
            if kind == "reset":
                self.resets += 1
                self.last_id = message["last_id"]
                return message

    def _connect(self, deadline: float | None) -> None:
        if self._attempt:
            # Exponential backoff with jitter, never past the caller's deadline.
            ceiling = min(self.max_delay, self.min_delay * 2 ** (self._attempt - 1))
            delay = random.uniform(ceiling / 2, ceiling)
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - time.monotonic()))
            time.sleep(delay)
        self._attempt += 1
        try:
            token = self.get_token()
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise AuthenticationFailed(f"the token endpoint answered {exc.code}: log in again") from None
            return
        except OSError:
            return
        try:
            origin = Origin(self.origin) if self.origin is not None else None
            ws = connect(self.url, open_timeout=5, max_size=None, legacy=True, origin=origin)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            if isinstance(exc, InvalidURI):
                raise
            return
        try:
            ws.send(json.dumps({"type": "auth", "token": token, "last_id": self.last_id, "topics": self.topics}))
            welcome = json.loads(ws.recv(10))
        except ConnectionClosed as exc:
            ws.close()
            if exc.rcvd is not None and exc.rcvd.code == AUTH_FAILED:
                raise AuthenticationFailed(exc.rcvd.reason) from None
            return
        except (OSError, TimeoutError):
            ws.close()
            return
        if welcome.get("type") != "welcome":
            ws.close()
            return
        if self.last_id is None:
            self.last_id = welcome["last_id"]
        self._ws = ws
        self._attempt = 0
        self.connections += 1


def session_token_provider(base_url: str, **cookies: str) -> Callable[[], str]:
    """Return a ``get_token`` that calls ``/realtime/token/`` with the given session cookies."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    cookie_header = "; ".join(f"{name}={value}" for name, value in cookies.items())

    def get_token() -> str:
        request = urllib.request.Request(f"{base_url.rstrip('/')}/realtime/token/", headers={"Cookie": cookie_header})
        with opener.open(request, timeout=10) as response:
            return str(json.load(response)["token"])

    return get_token
