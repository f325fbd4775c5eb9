"""The load client: processes that hold many lean websocket connections and count what they receive.

It is the same for every server under test. Each client process runs one
asyncio loop with a minimal RFC 6455 client written on ``asyncio.Protocol``
(no per-message task, future or queue): it sends a browser-like handshake
(``Origin``, an offer of ``permessage-deflate`` as browsers make, and a
``Cookie`` header when one is given), optionally sends a first text message
(our ``auth`` message), and counts the connection as authenticated when the
server's first text message is ``{"type":"welcome",...}``. It answers pings,
inflates compressed frames, and records each ``{"type":"event",...}`` frame by
the integer ``"k"`` in its ``data`` and the wall-clock time (``time.time()``,
shared by all processes of this machine) at which its bytes were read.

The coordinator side, :class:`LoadClient`, spreads connections over the
processes (round robin: connection ``i`` goes to process ``i % processes``)
and talks to them over pipes. Nothing here imports Django.

Contracts:

- every wait is bounded by a timeout or a deadline;
- sockets are bound to the given loopback source address with
  ``IP_BIND_ADDRESS_NO_PORT`` (the port is chosen at ``connect()``, per
  4-tuple) and closed with ``SO_LINGER`` 0 (a reset, no ``TIME_WAIT``);
- each process lifts its ``RLIMIT_NOFILE`` soft limit to the hard limit,
  ignores SIGINT (the coordinator stops it) and exits when its pipe closes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import socket
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ORIGIN", "ConnSpec", "ConnectResult", "LoadClient", "raise_nofile_limit", "source_address"]

# The demo site's origin, allowed by both servers (derived from ALLOWED_HOSTS).
ORIGIN = "http://127.0.0.1:8000"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
# Connections per loopback source address; the ephemeral range here is about 28,000 ports.
PER_SOURCE_ADDRESS = 20_000

# (port, source address, extra header line or "", first message or None)
ConnSpec = tuple[int, str, str, str | None]

_K = re.compile(rb'"k":\s*(\d+)')
_WELCOME = b'{"type":"welcome"'
_EVENT = b'{"type":"event"'
_HANDSHAKE, _AUTHENTICATING, _OPEN, _CLOSED = range(4)


def source_address(index: int) -> str:
    """Return the loopback source address of the ``index``-th connection of a phase (127.0.0.1, .2, ...)."""
    return f"127.0.0.{1 + index // PER_SOURCE_ADDRESS}"


def raise_nofile_limit() -> int:
    """Lift this process's RLIMIT_NOFILE soft limit to its hard limit; return the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """Return one masked, final client frame."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    if not n:
        return head + mask
    key = (mask * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + masked


class ConnectFailed(Exception):
    """A connection did not reach ``welcome``; ``args[0]`` is a short reason."""


class _Conn(asyncio.Protocol):
    """One websocket connection, parsed by hand for the lowest client cost."""

    __slots__ = (
        "buf",
        "close_code",
        "done",
        "first",
        "frags",
        "frags_compressed",
        "inflater",
        "last_k",
        "proc",
        "request",
        "state",
        "transport",
    )

    def __init__(self, proc: _ClientProcess, request: bytes, first: bytes | None, done: asyncio.Future[None]) -> None:
        self.proc = proc
        self.request = request
        self.first = first
        self.done = done
        self.buf = b""
        self.state = _HANDSHAKE
        self.transport: Any = None
        self.inflater: Any = None  # (wbits, no_context_takeover, decompressobj) once negotiated
        self.frags: list[bytes] | None = None
        self.frags_compressed = False
        self.close_code = 0
        self.last_k = -1

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.proc.conns.add(self)
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        proc = self.proc
        proc.conns.discard(self)
        if self.state == _OPEN:
            proc.open -= 1
            if not proc.closing:
                proc.server_closed[self.close_code or (1006 if exc else 1000)] += 1
        elif not self.done.done():
            reason = f"close {self.close_code}" if self.close_code else f"lost: {type(exc).__name__ if exc else 'eof'}"
            self.done.set_exception(ConnectFailed(reason))
        self.state = _CLOSED

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if self.state == _HANDSHAKE:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            head = data[:end].decode("latin-1")
            data = data[end + 4 :]
            lines = head.split("\r\n")
            status = lines[0].split(" ", 2)
            if len(status) < 2 or status[1] != "101":
                self._fail(f"HTTP {status[1] if len(status) > 1 else '?'}")
                return
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "sec-websocket-extensions" and "permessage-deflate" in value:
                    wbits = 15
                    match = re.search(r"server_max_window_bits=(\d+)", value)
                    if match:
                        wbits = int(match.group(1))
                    self.inflater = (wbits, "server_no_context_takeover" in value, zlib.decompressobj(-wbits))
                    self.proc.deflate += 1
            self.state = _AUTHENTICATING
            if self.first is not None:
                self.transport.write(self.first)
            if not data:
                return
        self._frames(data, now)

    def _frames(self, data: bytes, now: float) -> None:
        pos, n = 0, len(data)
        while n - pos >= 2:
            b0, length = data[pos], data[pos + 1] & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length, start = (data[pos + 2] << 8) | data[pos + 3], pos + 4
            else:
                if n - pos < 10:
                    break
                length, start = int.from_bytes(data[pos + 2 : pos + 10], "big"), pos + 10
            end = start + length
            if end > n:
                break
            payload = data[start:end]
            pos = end
            opcode = b0 & 0x0F
            if opcode == 1 or opcode == 2:
                if b0 & 0x80:
                    self._message(self._inflate(payload) if b0 & 0x40 else payload, now)
                else:
                    self.frags = [payload]
                    self.frags_compressed = bool(b0 & 0x40)
            elif opcode == 0 and self.frags is not None:
                self.frags.append(payload)
                if b0 & 0x80:
                    whole = b"".join(self.frags)
                    self.frags = None
                    self._message(self._inflate(whole) if self.frags_compressed else whole, now)
            elif opcode == 9:
                self.transport.write(_client_frame(0xA, payload))
            elif opcode == 8:
                self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.transport.abort()
                return
        if pos < n:
            self.buf = data[pos:]

    def _inflate(self, payload: bytes) -> bytes:
        if self.inflater is None:
            return payload
        wbits, reset, inflater = self.inflater
        data = inflater.decompress(payload + b"\x00\x00\xff\xff")
        if reset:
            self.inflater = (wbits, reset, zlib.decompressobj(-wbits))
        return data

    def _message(self, payload: bytes, now: float) -> None:
        if self.state == _OPEN:
            if payload.startswith(_EVENT):
                match = _K.search(payload, 15)
                if match is not None:
                    self.proc.record(int(match.group(1)), now, self)
            return
        if self.state == _AUTHENTICATING and payload.startswith(_WELCOME):
            self.state = _OPEN
            self.proc.open += 1
            if not self.done.done():
                self.done.set_result(None)

    def _fail(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectFailed(reason))
        self.transport.abort()


class CommandLoop:
    """Serves a coordinator's commands in an agent process: ``(name, args)`` over ``pipe`` runs
    ``await self.cmd_<name>(**args)`` and answers ``("ok", result)`` or ``("error", text)``;
    ``("exit", {})`` or a closed pipe ends :meth:`serve_commands`."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.commands: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def describe_error(self, exc: Exception) -> str:
        """The text the coordinator gets for a command that raised ``exc`` (it raises it)."""
        return f"{type(exc).__name__}: {exc}"

    async def serve_commands(self) -> None:
        """Run commands one at a time, in order, until "exit"."""
        loop = asyncio.get_running_loop()
        loop.add_reader(self.pipe.fileno(), self._readable)
        while True:
            name, args = await self.commands.get()
            if name == "exit":
                return
            try:
                result = await getattr(self, "cmd_" + name)(**args)
            except Exception as exc:
                self.pipe.send(("error", self.describe_error(exc)))
            else:
                self.pipe.send(("ok", result))

    def _readable(self) -> None:
        try:
            message = self.pipe.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self.pipe.fileno())
            message = ("exit", {})
        self.commands.put_nowait(message)


class _ClientProcess(CommandLoop):
    """The state and commands of one client process (runs in that process)."""

    def __init__(self, pipe: Any, host: str, origin: str, offer_deflate: bool) -> None:
        super().__init__(pipe)
        self.host = host
        self.origin = origin
        self.offer_deflate = offer_deflate
        self.conns: set[_Conn] = set()
        self.open = 0
        self.deflate = 0
        self.closing = False
        self.server_closed: Counter[int] = Counter()
        self.set_mode("idle")

    # Recording modes: "fanout" (per k: connections that got it, first and last time; a second
    # copy on one connection counts as a duplicate), "latency" ((k, t) pairs),
    # "count" (a bitmap over k in [base, base + size): received, duplicates, first and last time).

    def set_mode(self, mode: str, base: int = 0, size: int = 0) -> None:
        self.mode = mode
        self.base, self.size = base, size
        self.fan: dict[int, list[float]] = {}
        self.pairs: list[tuple[int, float]] = []
        self.bitmap = bytearray(size if mode == "count" else 0)
        self.received = self.duplicates = self.out_of_range = 0
        self.first_time = self.last_time = 0.0
        self.record: Callable[[int, float, _Conn], None] = {
            "idle": self._record_idle,
            "fanout": self._record_fanout,
            "latency": self._record_latency,
            "count": self._record_count,
        }[mode]

    def _record_idle(self, k: int, now: float, conn: _Conn) -> None:
        self.received += 1

    def _record_fanout(self, k: int, now: float, conn: _Conn) -> None:
        self.received += 1
        if conn.last_k == k:
            self.duplicates += 1
            return
        conn.last_k = k
        entry = self.fan.get(k)
        if entry is None:
            self.fan[k] = [1, now, now]
        else:
            entry[0] += 1
            entry[2] = now

    def _record_latency(self, k: int, now: float, conn: _Conn) -> None:
        self.received += 1
        self.pairs.append((k, now))

    def _record_count(self, k: int, now: float, conn: _Conn) -> None:
        index = k - self.base
        if not 0 <= index < self.size:
            self.out_of_range += 1
            return
        if self.bitmap[index]:
            self.duplicates += 1
        else:
            self.bitmap[index] = 1
            self.received += 1
        if not self.first_time:
            self.first_time = now
        self.last_time = now

    # The command loop.

    async def run(self) -> None:
        await self.serve_commands()
        self.closing = True
        for conn in list(self.conns):
            conn.transport.abort()

    def _snapshot(self) -> dict[str, Any]:
        return {
            "open": self.open,
            "received": self.received,
            "cpu": time.process_time(),
            "wall": time.time(),
            "server_closed": dict(self.server_closed),
        }

    async def cmd_connect(
        self, specs: Sequence[ConnSpec], concurrency: int, timeout: float, deadline: float
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        pending = iter(enumerate(specs))
        failures: Counter[str] = Counter()
        failed: list[int] = []
        times = {"start": time.time(), "last": 0.0, "ok": 0}

        async def one(spec: ConnSpec) -> None:
            port, source, header, first = spec
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.bind((source, 0))
                sock.setblocking(False)
                await loop.sock_connect(sock, (self.host, port))
            except BaseException:
                sock.close()
                raise
            key = base64.b64encode(os.urandom(16)).decode()
            lines = [
                "GET / HTTP/1.1",
                f"Host: {self.host}:{port}",
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key}",
                "Sec-WebSocket-Version: 13",
                f"Origin: {self.origin}",
                "User-Agent: realtime-bench",
            ]
            if self.offer_deflate:
                lines.append("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
            if header:
                lines.append(header)
            request = ("\r\n".join(lines) + "\r\n\r\n").encode()
            done: asyncio.Future[None] = loop.create_future()
            frame = _client_frame(0x1, first.encode()) if first is not None else None
            conn = _Conn(self, request, frame, done)
            await loop.create_connection(lambda: conn, sock=sock)
            try:
                await done
            except BaseException:
                if conn.transport is not None:
                    conn.transport.abort()
                raise

        async def worker() -> None:
            while time.time() < deadline:
                item = next(pending, None)
                if item is None:
                    return
                index, spec = item
                try:
                    await asyncio.wait_for(one(spec), timeout)
                except ConnectFailed as exc:
                    failures[str(exc)] += 1
                    failed.append(index)
                except TimeoutError:
                    failures["timeout"] += 1
                    failed.append(index)
                except OSError as exc:
                    failures[f"{type(exc).__name__} {exc.errno}"] += 1
                    failed.append(index)
                else:
                    times["ok"] += 1
                    times["last"] = time.time()

        async def progress() -> None:
            while True:
                await asyncio.sleep(0.5)
                self.pipe.send(("progress", {"ok": times["ok"], "failed": sum(failures.values())}))

        reporter = asyncio.create_task(progress())
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            reporter.cancel()
        skipped = [index for index, _ in pending]
        if skipped:
            failures["not attempted (time budget)"] += len(skipped)
        return {
            **self._snapshot(),
            **times,
            "failures": dict(failures),
            "failed": failed + skipped,
            "deflate": self.deflate,
        }

    async def cmd_mode(self, mode: str, base: int = 0, size: int = 0) -> dict[str, Any]:
        self.set_mode(mode, base, size)
        return self._snapshot()

    async def cmd_poll(self) -> dict[str, Any]:
        return self._snapshot()

    async def cmd_fanout(self, k: int) -> dict[str, Any]:
        count, first, last = self.fan.get(k, (0, 0.0, 0.0))
        return {**self._snapshot(), "count": count, "first": first, "last": last, "duplicates": self.duplicates}

    async def cmd_stats(self) -> dict[str, Any]:
        return {
            **self._snapshot(),
            "pairs": self.pairs,
            "duplicates": self.duplicates,
            "out_of_range": self.out_of_range,
            "first": self.first_time,
            "last": self.last_time,
        }

    async def cmd_close(self, per_second: float) -> dict[str, Any]:
        self.closing = True
        conns = list(self.conns)
        step = max(1, int(per_second / 20))
        for start in range(0, len(conns), step):
            for conn in conns[start : start + step]:
                conn.transport.abort()
            await asyncio.sleep(0.05)
        for _ in range(100):
            if not self.conns:
                break
            await asyncio.sleep(0.01)
        self.closing = False
        self.open = 0
        self.deflate = 0
        self.server_closed.clear()
        return self._snapshot()


def _client_main(pipe: Any, host: str, origin: str, offer_deflate: bool) -> None:
    """Entry point of a client process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile_limit()
    with contextlib.suppress(Exception):
        import gc

        gc.freeze()  # many long-lived small objects: keep the collector off them
    process = _ClientProcess(pipe, host, origin, offer_deflate)
    asyncio.run(process.run())


@dataclass
class ConnectResult:
    """What one connect wave achieved."""

    requested: int
    ok: int
    failures: Counter[str] = field(default_factory=Counter)
    started: float = 0.0
    finished: float = 0.0
    deflate: int = 0
    open: int = 0
    # Indexes (into the specs given to connect()) of the connections that did not authenticate.
    failed: list[int] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Authenticated connections per second over the wave (first attempt to last welcome)."""
        elapsed = self.finished - self.started
        return self.ok / elapsed if elapsed > 0 and self.ok else 0.0


class LoadClient:
    """Coordinator of the client processes (use as a context manager; ``stop()`` is idempotent).

    Args:
        processes: how many client processes.
        host: the server's address (loopback).
        origin: the ``Origin`` header sent by every connection.
        offer_deflate: offer ``permessage-deflate`` as browsers do.
    """

    def __init__(
        self, processes: int, host: str = "127.0.0.1", origin: str = ORIGIN, offer_deflate: bool = True
    ) -> None:
        self.host = host
        self.origin = origin
        self.offer_deflate = offer_deflate
        self.count = processes
        self.pipes: list[Any] = []
        self.processes: list[Any] = []
        # Where each connection of the current set lives: spec index -> process.
        self.placed = 0

    def __enter__(self) -> LoadClient:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        for index in range(self.count):
            parent, child = context.Pipe()
            process = context.Process(
                target=_client_main,
                args=(child, self.host, self.origin, self.offer_deflate),
                name=f"bench-client-{index}",
                daemon=True,
            )
            process.start()
            child.close()
            self.pipes.append(parent)
            self.processes.append(process)

    def stop(self) -> None:
        stop_children(self.pipes, self.processes)
        self.pipes, self.processes = [], []

    def process_of(self, index: int) -> int:
        """Return which process holds the ``index``-th connection of the current set."""
        return index % self.count

    def _call_all(
        self,
        name: str,
        args: Sequence[dict[str, Any]] | dict[str, Any] | None = None,
        timeout: float = 60.0,
        on_progress: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> list[dict[str, Any]]:
        per_process = args if isinstance(args, list | tuple) else [args or {}] * self.count
        for pipe, process_args in zip(self.pipes, per_process, strict=True):
            pipe.send((name, process_args))
        results: list[dict[str, Any] | None] = [None] * self.count
        progress: list[dict[str, Any]] = [{} for _ in range(self.count)]
        deadline = time.monotonic() + timeout
        while any(result is None for result in results):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"load client: no answer to {name!r} in {timeout:.0f}s")
            ready = multiprocessing.connection.wait(
                [pipe for pipe, result in zip(self.pipes, results, strict=True) if result is None], min(remaining, 1.0)
            )
            for pipe in ready:
                index = self.pipes.index(pipe)
                try:
                    kind, payload = pipe.recv()
                except EOFError:
                    raise RuntimeError(f"load client process {index} died") from None
                if kind == "progress":
                    progress[index] = payload
                    if on_progress is not None:
                        on_progress(progress)
                elif kind == "error":
                    raise RuntimeError(f"load client process {index}: {payload}")
                else:
                    results[index] = payload
        return [result for result in results if result is not None]

    def connect(
        self,
        specs: Sequence[ConnSpec],
        *,
        concurrency: int = 50,
        timeout: float = 30.0,
        budget: float = 600.0,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> ConnectResult:
        """Open ``specs`` (added to the connections already open); return when all are done or failed.

        ``concurrency`` handshakes are in flight per process; each connection
        has ``timeout`` seconds to reach ``welcome``; none is started after
        ``budget`` seconds.
        """
        shares: list[list[ConnSpec]] = [[] for _ in range(self.count)]
        origins: list[list[int]] = [[] for _ in range(self.count)]
        for offset, spec in enumerate(specs):
            process = self.process_of(self.placed + offset)
            shares[process].append(spec)
            origins[process].append(offset)
        self.placed += len(specs)
        deadline = time.time() + budget

        def progress(states: list[dict[str, Any]]) -> None:
            if on_progress is not None:
                on_progress(sum(s.get("ok", 0) for s in states), sum(s.get("failed", 0) for s in states))

        results = self._call_all(
            "connect",
            [
                {"specs": share, "concurrency": concurrency, "timeout": timeout, "deadline": deadline}
                for share in shares
            ],
            timeout=budget + timeout + 30,
            on_progress=progress,
        )
        result = ConnectResult(requested=len(specs), ok=sum(r["ok"] for r in results))
        for process, r in enumerate(results):
            result.failures.update(r["failures"])
            result.failed += [origins[process][local] for local in r["failed"]]
        result.started = min(r["start"] for r in results)
        result.finished = max((r["last"] for r in results if r["last"]), default=result.started)
        result.deflate = sum(r["deflate"] for r in results)
        result.open = sum(r["open"] for r in results)
        return result

    def set_mode(self, mode: str, *, base: int = 0, size: int = 0) -> None:
        """Reset every process's records and record in ``mode`` ("idle", "fanout", "latency", "count")."""
        self._call_all("mode", {"mode": mode, "base": base, "size": size})

    def poll(self) -> list[dict[str, Any]]:
        """Return each process's open connections, received count, CPU time and server closures."""
        return self._call_all("poll")

    def open_count(self) -> int:
        """Return the number of authenticated connections open now."""
        return sum(p["open"] for p in self.poll())

    def fanout(self, k: int) -> list[dict[str, Any]]:
        """Return each process's receipt count and first/last receipt time of fan-out event ``k``."""
        return self._call_all("fanout", {"k": k})

    def stats(self) -> list[dict[str, Any]]:
        """Return each process's records (pairs, counts, first/last time, duplicates)."""
        return self._call_all("stats", timeout=120)

    def close_all(self, per_second: float = 5_000.0) -> None:
        """Reset every connection (RST), about ``per_second`` in all, and forget them.

        Not all at once: a server should not have to absorb tens of thousands
        of disconnections in one instant between two workloads.
        """
        rate = per_second / self.count
        self._call_all("close", {"per_second": rate}, timeout=300)
        self.placed = 0


def read_answer(pipe: Any, name: str) -> Any:
    """Receive an agent's answer to a command (a :class:`CommandLoop`'s ``("ok", payload)``); return the payload.

    Raises RuntimeError naming agent ``name`` if it died or its command failed.
    """
    try:
        status, payload = pipe.recv()
    except EOFError:
        raise RuntimeError(f"{name} died") from None
    if status == "error":
        raise RuntimeError(f"{name} failed:\n{payload}")
    return payload


def stop_children(pipes: list[Any], processes: list[Any]) -> None:
    """Ask child processes to exit through their pipes, then terminate, then kill the stragglers."""
    for pipe in pipes:
        with contextlib.suppress(Exception):
            pipe.send(("exit", {}))
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.terminate()
            process.join(2)
        if process.is_alive():
            process.kill()
            process.join()
    for pipe in pipes:
        with contextlib.suppress(Exception):
            pipe.close()
