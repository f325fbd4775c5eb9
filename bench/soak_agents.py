"""The soak's load processes (``bench/soak.py`` starts and drives them over pipes).

- :func:`client_main`: one process, one asyncio loop, holding

  - *tabs*: long-lived logical clients. Each keeps one connection open, records
    every event id it receives (across reconnections) and, when disconnected
    (by a fault, or by its own rotation: a clean close now and then, as a page
    navigation does), reconnects with ``last_id`` = the last id it received and
    a fresh token from ``/realtime/token/``. Tabs of *stable* users use a fixed
    session; tabs of *mutable* users belong to a *browser* that logs in through
    the admin login form, logs out, changes its password (all through the real
    web server) and subscribes its tabs to dynamic topics and back;
  - *churn*: short connections, opened at a steady rate and ended cleanly, by
    a TCP reset, in the middle of the handshake or in the middle of a replay.

  The websocket client is written on ``asyncio.Protocol`` (as
  :mod:`bench.loadclient`'s): a few hundred connections and thousands of
  frames a second must leave CPU for the servers on a 2-core machine.

- :func:`publisher_main`: a Django process publishing events at a steady rate
  across every audience kind, one ``realtime.publish()`` per transaction, plus a
  ``realtime.publish_many()`` burst at a fixed interval, from a second thread.

Neither checks anything: they record, and the coordinator compares what they
recorded with the outbox. Every wait is bounded. Nothing at module level imports
Django.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.cookiejar
import json
import os
import random
import re
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from array import array
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bench.loadclient import IP_BIND_ADDRESS_NO_PORT, ORIGIN, CommandLoop, _client_frame, raise_nofile_limit

__all__ = [
    "AgentConfig",
    "BrowserSpec",
    "ChurnUser",
    "PublisherConfig",
    "TabSpec",
    "client_main",
    "publisher_main",
]

_EVENT_PREFIX = b'{"type":"event","id":'
_CSRF_FIELD = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
CHURN_MODES = ("clean", "abort", "handshake", "replay")
CHURN_WEIGHTS = (3, 3, 2, 2)
HANDSHAKE_STAGES = ("tcp", "partial-request", "upgraded", "auth-sent")
MAX_VIOLATIONS = 20  # kept per client: enough to show what went wrong


@dataclass(frozen=True)
class TabSpec:
    """A long-lived logical client: ``user_id`` with ``topics`` in every auth message.

    ``session`` is the ``sessionid`` of a stable user; ``browser`` the index of
    the mutable browser whose session the tab uses.
    """

    key: str
    user_id: int
    topics: tuple[str, ...]
    source: str
    session: str | None = None
    browser: int | None = None


@dataclass(frozen=True)
class BrowserSpec:
    """A browser of a mutable (staff) user: it logs in with ``username`` through the admin."""

    index: int
    user_id: int
    username: str


@dataclass(frozen=True)
class ChurnUser:
    """A stable user churn connections authenticate as."""

    user_id: int
    session: str
    topics: tuple[str, ...]


@dataclass
class AgentConfig:
    """What one client agent runs (see the module docstring)."""

    name: str
    ws_port: int
    web_port: int
    log_path: str
    tabs: list[TabSpec]
    browsers: list[BrowserSpec] = field(default_factory=list)
    passwords: dict[str, str] = field(default_factory=dict)  # username -> password, shared by its browsers
    churn_users: list[ChurnUser] = field(default_factory=list)
    churn_rate: float = 0.0  # connections per second
    churn_sources: tuple[str, ...] = ("127.0.0.2",)
    account_rate: float = 0.0  # logouts + password changes per second (logins follow)
    topic_rate: float = 0.0  # subscribe / unsubscribe messages per second
    dynamic_topics: tuple[str, ...] = ()
    rotate_mean: float = 0.0  # mean seconds between a tab's clean reconnections (0: never)
    seed: int = 0


class ConnectFailed(Exception):
    """A connection did not get where it was going; ``args[0]`` says why."""


# The websocket client.


class _Ws(asyncio.Protocol):
    """One client websocket connection; text messages go to ``sink``."""

    def __init__(self, request: bytes, sink: Callable[[bytes], None]) -> None:
        loop = asyncio.get_running_loop()
        self.request = request
        self.sink = sink
        self.upgraded: asyncio.Future[None] = loop.create_future()
        # A connection dropped on purpose before its 101 has nobody waiting for this.
        self.upgraded.add_done_callback(lambda future: future.cancelled() or future.exception())
        self.closed: asyncio.Future[int] = loop.create_future()
        self.transport: Any = None
        self.buf = b""
        self.open = False
        self.code = 0
        self.frags: list[bytes] | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.request:
            transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectFailed(f"lost before 101: {type(exc).__name__ if exc else 'eof'}"))
        if not self.closed.done():
            self.closed.set_result(self.code or 1006)

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data, self.buf = self.buf + data, b""
        if not self.open:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            status = data[:end].split(b" ", 2)
            if len(status) < 2 or status[1] != b"101":
                if not self.upgraded.done():
                    self.upgraded.set_exception(ConnectFailed(f"HTTP {status[1].decode(errors='replace')}"))
                self.transport.abort()
                return
            self.open = True
            self.upgraded.set_result(None)
            data = data[end + 4 :]
        pos, n = 0, len(data)
        while n - pos >= 2:
            b0, length = data[pos], data[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length, start = int.from_bytes(data[pos + 2 : pos + 4], "big"), pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, start = int.from_bytes(data[pos + 2 : pos + 10], "big"), pos + 10
            if start + length > n:
                break
            payload = data[start : start + length]
            pos = start + length
            opcode = b0 & 0x0F
            if opcode in (1, 2):
                if b0 & 0x80:
                    self.sink(payload)
                else:
                    self.frags = [payload]
            elif opcode == 0 and self.frags is not None:
                self.frags.append(payload)
                if b0 & 0x80:
                    whole, self.frags = b"".join(self.frags), None
                    self.sink(whole)
            elif opcode == 9:
                self.transport.write(_client_frame(0xA, payload))
            elif opcode == 8:
                self.code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                # Answer the closing handshake, then let the server close TCP first.
                self.transport.write(_client_frame(0x8, payload[:2]))
                return
        if pos < n:
            self.buf = data[pos:]

    def send_text(self, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_client_frame(0x1, text.encode()))

    def close_clean(self) -> None:
        """Start the closing handshake (1000); ``closed`` completes when the server has closed TCP."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_client_frame(0x8, (1000).to_bytes(2, "big")))

    def abort(self) -> None:
        """Drop the connection with a TCP reset (no close frame, no FIN)."""
        if self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


def _request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        "GET / HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        f"Origin: {ORIGIN}",
        "User-Agent: realtime-soak",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _tcp(port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _open(port: int, source: str, sink: Callable[[bytes], None], request: bytes | None = None) -> _Ws:
    """Connect and send the handshake request (``request``: another one, e.g. a partial one)."""
    sock = await _tcp(port, source)
    protocol = _Ws(_request(port) if request is None else request, sink)
    try:
        await asyncio.get_running_loop().create_connection(lambda: protocol, sock=sock)
    except BaseException:
        sock.close()
        raise
    return protocol


def _auth(token: str, last_id: int | None, topics: tuple[str, ...]) -> str:
    return json.dumps({"type": "auth", "token": token, "last_id": last_id, "topics": list(topics)})


async def _open_authenticated(
    port: int, source: str, receiver: _Receiver, token: str, last_id: int | None, topics: tuple[str, ...]
) -> tuple[_Ws, int]:
    """Connect, authenticate and return the socket and its welcome's ``last_id``, within 15 s.

    Raises OSError, ConnectFailed or TimeoutError, after aborting the socket if it was open.
    """
    ws: _Ws | None = None
    try:
        async with asyncio.timeout(15):
            ws = await _open(port, source, receiver)
            await ws.upgraded
            ws.send_text(_auth(token, last_id, topics))
            return ws, await asyncio.shield(receiver.welcome)
    except BaseException:
        if ws is not None:
            ws.abort()
        raise


class _Receiver:
    """What one connection received: event ids (checked in order), and the other messages."""

    def __init__(self, owner: _Recorder) -> None:
        self.owner = owner
        self.welcome: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.events = 0

    def __call__(self, payload: bytes) -> None:
        if payload.startswith(_EVENT_PREFIX):
            end = payload.index(b",", len(_EVENT_PREFIX))
            self.events += 1
            self.owner.event(int(payload[len(_EVENT_PREFIX) : end]))
            return
        message = json.loads(payload)
        kind = message.get("type")
        if kind == "welcome":
            if not self.welcome.done():
                self.welcome.set_result(int(message["last_id"]))
        elif kind in ("subscribed", "unsubscribed"):
            self.owner.subscription(str(message["topic"]), kind == "subscribed")
        elif kind == "reset":
            self.owner.violation(f"reset to {message.get('last_id')}")
        elif kind == "error":
            self.owner.violation(f"error {message.get('code')}: {message.get('message')}")


class _Recorder:
    """Event ids received by one logical client, strictly increasing; anything else is a violation."""

    def __init__(self, agent: _Agent) -> None:
        self.agent = agent
        self.ids = array("q")
        self.last: int | None = None
        self.violations: list[str] = []
        self.violation_count = 0

    def event(self, position: int) -> None:
        if self.last is not None and position <= self.last:
            self.violation(f"event {position} after {self.last} (duplicate or out of order)")
            return
        self.ids.append(position)
        self.last = position
        self.agent.frames += 1
        if position > self.agent.newest:
            self.agent.newest = position

    def subscription(self, topic: str, subscribed: bool) -> None:
        pass

    def violation(self, what: str) -> None:
        self.violation_count += 1
        if len(self.violations) < MAX_VIOLATIONS:
            self.violations.append(what)


class _Tab(_Recorder):
    """A long-lived logical client (see :class:`TabSpec`)."""

    def __init__(self, agent: _Agent, spec: TabSpec) -> None:
        super().__init__(agent)
        self.spec = spec
        self.start: int | None = None  # the first welcome's last_id: where its record starts
        self.connections = 0
        self.closes: Counter[int] = Counter()
        self.ws: _Ws | None = None
        self.dynamic: set[str] = set()
        # (topic, subscribed, index in ids when the answer came): dynamic topics only.
        self.subscriptions: list[tuple[str, bool, int]] = []

    def subscription(self, topic: str, subscribed: bool) -> None:
        if topic in self.spec.topics:
            return
        self.subscriptions.append((topic, subscribed, len(self.ids)))
        (self.dynamic.add if subscribed else self.dynamic.discard)(topic)
        self.agent.counts["subscribed" if subscribed else "unsubscribed"] += 1

    def _end_subscriptions(self) -> None:
        # A new connection starts with the auth topics only.
        for topic in sorted(self.dynamic):
            self.subscriptions.append((topic, False, len(self.ids)))
        self.dynamic.clear()

    async def run(self) -> None:
        agent = self.agent
        attempt = 0
        while not agent.stopping:
            if attempt:
                await asyncio.sleep(min(3.0, 0.1 * 2 ** min(attempt, 5)) * random.uniform(0.5, 1.0))
            attempt += 1
            token = await agent.token_for(self.spec)
            if token is None:
                continue
            receiver = _Receiver(self)
            try:
                ws, welcome = await _open_authenticated(
                    agent.config.ws_port, self.spec.source, receiver, token, self.last, self.spec.topics
                )
            except (OSError, ConnectFailed, TimeoutError) as exc:
                agent.counts[f"tab connect failed: {type(exc).__name__}"] += 1
                continue
            if self.start is None:
                self.start = welcome
            if self.last is None:
                self.last = welcome
            self.connections += 1
            attempt = 0
            self.ws = ws
            agent.open_tabs += 1
            rotate = None
            if agent.config.rotate_mean > 0:
                rotate = asyncio.ensure_future(asyncio.sleep(random.expovariate(1 / agent.config.rotate_mean)))
            waiting: set[asyncio.Future[Any]] = {ws.closed} if rotate is None else {ws.closed, rotate}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if not ws.closed.done() and (agent.stopping or not agent.quiesced):
                ws.close_clean()
                agent.counts["tab rotated"] += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(ws.closed), 10)
                ws.abort()
            elif not ws.closed.done():
                # Quiesced: no more rotation; stay until the end.
                await ws.closed
            if rotate is not None:
                rotate.cancel()
            agent.open_tabs -= 1
            self.ws = None
            self._end_subscriptions()
            code = ws.closed.result()
            self.closes[code] += 1
            if code == 4401:
                if self.spec.browser is None:
                    self.violation("closed 4401 (a stable user's session)")
                else:
                    agent.browsers[self.spec.browser].session_lost()

    def result(self) -> dict[str, Any]:
        return {
            "key": self.spec.key,
            "user_id": self.spec.user_id,
            "topics": list(self.spec.topics),
            "mutable": self.spec.browser is not None,
            "start": self.start,
            "last": self.last,
            "ids": self.ids.tobytes(),
            "violations": self.violations,
            "violation_count": self.violation_count,
            "connections": self.connections,
            "closes": dict(self.closes),
            "subscriptions": self.subscriptions,
        }


class _Browser:
    """A mutable user's browser: a cookie jar on the real web server, through the admin's forms."""

    def __init__(self, agent: _Agent, spec: BrowserSpec) -> None:
        self.agent = agent
        self.spec = spec
        self.base = f"http://127.0.0.1:{agent.config.web_port}"
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar), _NoRedirect())
        self.lock = asyncio.Lock()

    # Blocking HTTP, run in the agent's threads.

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with self.opener.open(self.base + path, timeout=15) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()

    def _post(self, path: str, fields: dict[str, str]) -> tuple[int, bytes]:
        body = urllib.parse.urlencode(fields).encode()
        request = urllib.request.Request(self.base + path, data=body, headers={"Referer": self.base + path})
        try:
            with self.opener.open(request, timeout=15) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()

    def _form_token(self, path: str) -> str | None:
        status, body = self._get(path)
        match = _CSRF_FIELD.search(body.decode(errors="replace")) if status == 200 else None
        return match.group(1) if match else None

    def _login(self) -> bool:
        """Log in through the admin's form; with the newest password that works (see _change_password)."""
        for password in reversed(self.agent.passwords[self.spec.username]):
            token = self._form_token("/admin/login/")
            if token is None:
                return False
            fields = {"csrfmiddlewaretoken": token, "username": self.spec.username, "password": password}
            if self._post("/admin/login/", {**fields, "next": "/admin/"})[0] == 302:
                return True
        return False

    def _logout(self) -> bool:
        token = self._form_token("/admin/")
        return token is not None and self._post("/admin/logout/", {"csrfmiddlewaretoken": token})[0] == 200

    def _change_password(self) -> bool:
        """Change the password through the admin's form (the caller holds the user's lock).

        Every password tried is kept: a change whose answer was lost (a timeout
        while PostgreSQL restarts) may have been applied, and logins try the
        newest first.
        """
        token = self._form_token("/admin/password_change/")
        if token is None:
            return False
        passwords = self.agent.passwords[self.spec.username]
        new = f"pw-{self.spec.username}-{random.getrandbits(40):x}"
        passwords.append(new)
        fields = {
            "csrfmiddlewaretoken": token,
            "old_password": passwords[-2],
            "new_password1": new,
            "new_password2": new,
        }
        if self._post("/admin/password_change/", fields)[0] == 302:
            return True
        passwords.remove(new)  # refused: the form said why (not applied)
        return False

    def _token(self) -> str | None:
        status, body = self._get("/realtime/token/")
        if status == 200:
            return str(json.loads(body)["token"])
        if status in (401, 403):
            return None
        raise ConnectFailed(f"token: HTTP {status}")

    # In the loop.

    def session_lost(self) -> None:
        self.agent.counts["mutable tab closed 4401"] += 1

    async def token(self) -> str | None:
        """Return a token for this browser's session, logging in again first if the session is gone."""
        async with self.lock:
            for _ in range(5):
                try:
                    token: str | None = await self.agent.blocking(self._token)
                except (OSError, ConnectFailed):
                    self.agent.counts["token failed"] += 1
                    return None
                if token is not None:
                    return token
                if await self.agent.blocking(self._login):
                    self.agent.counts["logins"] += 1
                else:
                    # The password may have just changed in another browser of this user.
                    self.agent.counts["logins refused (retried)"] += 1
                    await asyncio.sleep(0.2)
            return None

    async def account_action(self) -> None:
        """Log out (the tabs are closed 4401 and log in again) or change the password."""
        async with self.lock:
            try:
                if random.random() < 0.6:
                    ok = await self.agent.blocking(self._logout)
                    self.agent.counts["logouts" if ok else "logouts failed"] += 1
                else:
                    # One change at a time per user: Django reads and writes the password without a
                    # lock, so two concurrent changes could both pass and leave us the wrong one.
                    async with self.agent.user_locks[self.spec.username]:
                        ok = await self.agent.blocking(self._change_password)
                    self.agent.counts["password changes" if ok else "password changes failed"] += 1
            except OSError:
                self.agent.counts["account action failed"] += 1


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Show redirects as they are: a login or a password change answers 302."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None

    def http_error_302(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        return fp


class _Agent(CommandLoop):
    """The state and command loop of one client agent process."""

    def __init__(self, pipe: Any, config: AgentConfig) -> None:
        super().__init__(pipe)
        self.config = config
        self.stopping = False
        self.quiesced = False
        self.open_tabs = 0
        self.frames = 0
        self.newest = 0
        self.counts: Counter[str] = Counter()
        self.churn: list[dict[str, Any]] = []
        # username -> every password set (the current one last), shared by the user's browsers.
        self.passwords = {name: [password] for name, password in config.passwords.items()}
        self.user_locks = {name: asyncio.Lock() for name in config.passwords}
        self.browsers = [_Browser(self, spec) for spec in config.browsers]
        self.tabs = [_Tab(self, spec) for spec in config.tabs]
        self.tasks: set[asyncio.Task[Any]] = set()
        self.tab_tasks: set[asyncio.Task[Any]] = set()
        self.threads = ThreadPoolExecutor(8, thread_name_prefix="soak-http")

    def describe_error(self, exc: Exception) -> str:
        return traceback.format_exc()  # the soak's log keeps the whole story

    def spawn(self, coroutine: Any, *, tab: bool = False) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        if tab:
            self.tab_tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        self.tab_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.counts[f"task failed: {type(exc).__name__}"] += 1
            traceback.print_exception(exc)

    async def blocking(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.threads, fn)

    async def token_for(self, spec: TabSpec | ChurnUser) -> str | None:
        if isinstance(spec, TabSpec) and spec.browser is not None:
            return await self.browsers[spec.browser].token()
        assert spec.session is not None
        try:
            return await self._session_token(spec.session)
        except (OSError, ConnectFailed, TimeoutError, ValueError) as exc:
            self.counts[f"token failed: {exc}"[:60]] += 1
            return None

    async def _session_token(self, session: str) -> str:
        """GET /realtime/token/ with a session cookie, over a fresh HTTP/1.1 connection."""
        port = self.config.web_port
        async with asyncio.timeout(15):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(
                    f"GET /realtime/token/ HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nCookie: sessionid={session}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                response = await reader.read()
            finally:
                writer.close()
        head, _, body = response.partition(b"\r\n\r\n")
        status = head.split(b" ", 2)[1] if head else b"?"
        if status != b"200":
            raise ConnectFailed(f"HTTP {status.decode(errors='replace')}")
        if b"chunked" in head.lower():
            body = body.split(b"\r\n", 1)[1]
        return str(json.loads(body[: body.rindex(b"}") + 1])["token"])

    # Churn.

    async def churn_forever(self) -> None:
        rate = self.config.churn_rate
        if rate <= 0 or not self.config.churn_users:
            return
        loop = asyncio.get_running_loop()
        due = loop.time()
        n = 0
        while not self.quiesced:
            due += 1 / rate
            n += 1
            mode = random.choices(CHURN_MODES, CHURN_WEIGHTS)[0]
            user = random.choice(self.config.churn_users)
            source = self.config.churn_sources[n % len(self.config.churn_sources)]
            self.spawn(self.churn_one(mode, user, source))
            await asyncio.sleep(max(0.0, due - loop.time()))

    async def churn_one(self, mode: str, user: ChurnUser, source: str) -> None:
        port = self.config.ws_port
        if mode == "handshake":
            await self.half_open(random.choice(HANDSHAKE_STAGES), user, source)
            return
        token = await self.token_for(user)
        if token is None:
            self.counts[f"churn {mode}: no token"] += 1
            return
        record = _Recorder(self)
        receiver = _Receiver(record)
        last_id = max(0, self.newest - random.randint(200, 3000)) if mode == "replay" else None
        try:
            ws, welcome = await _open_authenticated(port, source, receiver, token, last_id, user.topics)
        except (OSError, ConnectFailed, TimeoutError) as exc:
            self.counts[f"churn {mode} failed: {type(exc).__name__}"] += 1
            return
        record.last = welcome if last_id is None else last_id
        start = record.last
        if mode == "replay":
            # Abort in the middle of the replay: after a few events, or soon.
            wanted = random.randint(1, 50)
            deadline = asyncio.get_running_loop().time() + 1.0
            while receiver.events < wanted and asyncio.get_running_loop().time() < deadline and not ws.closed.done():
                await asyncio.sleep(0.01)
            ws.abort()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ws.closed), random.uniform(0.2, 2.0))
            if mode == "clean":
                ws.close_clean()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(ws.closed), 10)
            ws.abort()
        await asyncio.sleep(0)
        self.counts[f"churn {mode}"] += 1
        self.churn.append(
            {
                "mode": mode,
                "user_id": user.user_id,
                "topics": list(user.topics),
                "start": start,
                "ids": record.ids.tobytes(),
                "violations": record.violations,
                "violation_count": record.violation_count,
            }
        )

    async def half_open(self, stage: str, user: ChurnUser, source: str) -> None:
        """Start a connection and drop it (TCP reset) at ``stage`` of the handshake."""
        port = self.config.ws_port
        try:
            async with asyncio.timeout(15):
                if stage == "tcp":
                    sock = await _tcp(port, source)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
                elif stage == "partial-request":
                    request = _request(port)
                    ws = await _open(port, source, lambda payload: None, request[: len(request) // 2])
                    await asyncio.sleep(random.uniform(0, 0.2))
                    ws.abort()
                else:
                    token = await self.token_for(user) if stage == "auth-sent" else None
                    ws = await _open(port, source, lambda payload: None)
                    await ws.upgraded
                    if token is not None:
                        ws.send_text(_auth(token, None, user.topics))
                    else:
                        await asyncio.sleep(random.uniform(0, 0.2))
                    ws.abort()
        except (OSError, ConnectFailed, TimeoutError) as exc:
            self.counts[f"churn handshake failed: {type(exc).__name__}"] += 1
            return
        self.counts[f"churn handshake ({stage})"] += 1

    # Accounts and topics of mutable users.

    async def accounts_forever(self) -> None:
        rate = self.config.account_rate
        if rate <= 0 or not self.browsers:
            return
        while not self.quiesced:
            await asyncio.sleep(random.expovariate(rate))
            if not self.quiesced:
                self.spawn(random.choice(self.browsers).account_action())

    async def topics_forever(self) -> None:
        rate = self.config.topic_rate
        mutable = [tab for tab in self.tabs if tab.spec.browser is not None]
        if rate <= 0 or not mutable or not self.config.dynamic_topics:
            return
        while not self.quiesced:
            await asyncio.sleep(random.expovariate(rate))
            tab = random.choice(mutable)
            if tab.ws is None or self.quiesced:
                continue
            topic = random.choice(self.config.dynamic_topics)
            kind = "unsubscribe" if topic in tab.dynamic else "subscribe"
            tab.ws.send_text(json.dumps({"type": kind, "topic": topic}))

    # Commands from the coordinator.

    def status(self) -> dict[str, Any]:
        return {
            "open_tabs": self.open_tabs,
            "frames": self.frames,
            "newest": self.newest,
            "churned": len(self.churn),
            "counts": dict(self.counts),
            "violations": sum(tab.violation_count for tab in self.tabs),
        }

    async def cmd_start(self) -> dict[str, Any]:
        """Open every tab (spread over about 2 s), wait until they are all open (60 s at most)."""
        for tab in self.tabs:
            self.spawn(tab.run(), tab=True)
            await asyncio.sleep(2.0 / max(1, len(self.tabs)))
        deadline = time.monotonic() + 60
        while self.open_tabs < len(self.tabs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.status()

    async def cmd_load(self) -> dict[str, Any]:
        """Start churn, account actions and topic changes."""
        self.spawn(self.churn_forever())
        self.spawn(self.accounts_forever())
        self.spawn(self.topics_forever())
        return self.status()

    async def cmd_status(self) -> dict[str, Any]:
        return self.status()

    async def cmd_quiesce(self) -> dict[str, Any]:
        """Stop churn, account actions, topic changes and rotation; let churn connections finish."""
        self.quiesced = True
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(not task.done() for task in self.tasks - self.tab_tasks):
            await asyncio.sleep(0.1)
        return self.status()

    async def cmd_wait_for(self, position: int, within: float) -> dict[str, Any]:
        """Wait until every tab has received ``position`` (for ``within`` seconds at most); return the stragglers."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            behind = [tab for tab in self.tabs if (tab.last or 0) < position]
            if not behind:
                break
            await asyncio.sleep(0.1)
        behind = [tab for tab in self.tabs if (tab.last or 0) < position]
        return {"behind": [(tab.spec.key, tab.last, tab.ws is not None) for tab in behind], **self.status()}

    async def cmd_results(self) -> dict[str, Any]:
        return {"tabs": [tab.result() for tab in self.tabs], "churn": self.churn, **self.status()}

    async def run(self) -> None:
        await self.serve_commands()
        self.stopping = True
        for tab in self.tabs:
            if tab.ws is not None:
                tab.ws.abort()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.threads.shutdown(wait=False, cancel_futures=True)


def _to_log(path: str) -> None:
    """Send this process's stdout and stderr to ``path`` (the coordinator scans it for tracebacks)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def client_main(pipe: Any, config: AgentConfig) -> None:
    """Entry point of a client agent process (``spawn``); exits when its pipe closes."""
    _to_log(config.log_path)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile_limit()
    random.seed(config.seed)
    asyncio.run(_Agent(pipe, config).run())


# The publisher.


@dataclass
class PublisherConfig:
    """Where events go: one audience kind per event, picked with ``weights`` (see :data:`AUDIENCE_KINDS`)."""

    database_url: str
    settings_module: str
    log_path: str
    rate: float
    burst_size: int
    burst_interval: float
    burst_first: float
    users: list[int]
    groups: list[str]
    permissions: list[str]
    topics: list[str]
    weights: dict[str, float]
    seed: int = 0


AUDIENCE_KINDS = ("users", "groups", "permission", "staff", "everyone", "topic", "mixed")


class _Publisher:
    def __init__(self, config: PublisherConfig) -> None:
        from django.db import transaction

        from realtime import publish, publish_many

        self.config = config
        self.atomic = transaction.atomic
        self.publish = publish
        self.publish_many = publish_many
        self.stop = threading.Event()
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.sequence = 0

    def audience(self, rng: random.Random, kinds: tuple[str, ...], weights: list[float]) -> dict[str, Any]:
        c = self.config
        kind = rng.choices(kinds, weights)[0]
        if kind == "users":
            return {"users": rng.sample(c.users, rng.randint(1, 3))}
        if kind == "groups":
            return {"groups": [rng.choice(c.groups)]}
        if kind == "permission":
            return {"permission": rng.choice(c.permissions)}
        if kind == "staff":
            return {"staff": True}
        if kind == "everyone":
            return {"everyone": True}
        if kind == "topic":
            return {"topic": rng.choice(c.topics)}
        return {"users": [rng.choice(c.users)], "groups": [rng.choice(c.groups)], "topic": rng.choice(c.topics)}

    def _count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def _failed(self, what: str, exc: Exception) -> None:
        from django.db import connection

        self._count(f"{what} failed: {type(exc).__name__}")
        with contextlib.suppress(Exception):
            connection.close()
        time.sleep(0.2)

    def steady(self) -> None:
        """``rate`` events a second, one per transaction, until stopped (a slot missed by more than 1 s is skipped)."""
        from django.db import DatabaseError

        rng = random.Random(self.config.seed)
        kinds = tuple(k for k in AUDIENCE_KINDS if self.config.weights.get(k))
        weights = [self.config.weights[k] for k in kinds]
        interval = 1 / self.config.rate
        due = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            elif now - due > 1.0:
                due = now
            due += interval
            audience = self.audience(rng, kinds, weights)
            self.sequence += 1
            try:
                with self.atomic():
                    self.publish("soak.event", {"n": self.sequence}, **audience)
            except DatabaseError as exc:
                self._failed("publish", exc)
                continue
            self._count("published")
            self._count(f"published: {next(iter(audience))}" if len(audience) == 1 else "published: mixed")

    def bursts(self) -> None:
        """A ``publish_many()`` of ``burst_size`` events every ``burst_interval`` seconds (users, groups, topics)."""
        from django.db import DatabaseError

        rng = random.Random(self.config.seed + 1)
        kinds = ("users", "groups", "permission", "topic")
        weights = [70.0, 10.0, 5.0, 15.0]
        due = time.monotonic() + self.config.burst_first
        while not self.stop.wait(max(0.0, due - time.monotonic())):
            due += self.config.burst_interval
            events = [
                {"event": "soak.burst", "data": {"i": i}, **self.audience(rng, kinds, weights)}
                for i in range(self.config.burst_size)
            ]
            try:
                with self.atomic():
                    self.publish_many(events)
            except DatabaseError as exc:
                self._failed("burst", exc)
                continue
            self._count("bursts")
            self._count("published in bursts", len(events))


def publisher_main(pipe: Any, config: PublisherConfig) -> None:
    """Entry point of the publisher process (``spawn``): ``start``, then ``stop`` returns its counts."""
    _to_log(config.log_path)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["DATABASE_URL"] = config.database_url
    os.environ["DJANGO_SETTINGS_MODULE"] = config.settings_module
    import django

    django.setup()
    publisher = _Publisher(config)
    threads = [threading.Thread(target=publisher.steady, daemon=True), threading.Thread(target=publisher.bursts)]
    pipe.send(("ok", "ready"))
    while True:
        try:
            name, _args = pipe.recv()
        except (EOFError, OSError):
            name = "exit"
        if name == "start":
            for thread in threads:
                thread.start()
            pipe.send(("ok", None))
        elif name == "status":
            with publisher.lock:
                pipe.send(("ok", dict(publisher.counts)))
        elif name in ("stop", "exit"):
            publisher.stop.set()
            for thread in threads:
                if thread.is_alive():
                    thread.join(30)
            with publisher.lock, contextlib.suppress(OSError):
                pipe.send(("ok", dict(publisher.counts)))
            if name == "exit":
                break
