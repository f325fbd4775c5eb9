"""Publisher processes: they publish the benchmark's events, the way each system's users would.

- ``ours``: ``realtime.publish()`` inside ``transaction.atomic()`` (one event,
  one commit), or ``realtime.publish_many()`` (a batch, one commit). The time
  recorded for an event is taken right after its ``COMMIT`` returned.
- ``channels``: ``channel_layer.group_send()`` to the group ``user.<id>`` or
  ``everyone``, as a Channels app calls it from ``transaction.on_commit()``;
  the time recorded is taken right before the call (so the commit itself, if
  any, is not counted for Channels). Channels has no batch API: "batched"
  means ``batch`` concurrent ``group_send()`` calls (``asyncio.gather``).
- ``floor``: ``SELECT pg_notify(channel, payload)`` in autocommit on a plain
  psycopg connection, the payload ``{"u": <user id or null>, "m": <frame>}``
  (see :mod:`bench.floor`); the time recorded is taken right after the
  statement returned (its implicit commit queued the NOTIFY), as ``ours`` is
  timed from COMMIT. Only ``fanout`` and ``latency``: the floor has no (d).

Every event carries ``{"k": <int>}`` in its data; the load client counts
events by ``k``. Each agent is a process of its own (``spawn``), configured
with a Django settings module, controlled by the coordinator over a pipe, and
exits when the pipe closes. Nothing at module level imports Django (the
floor's agents never set it up).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from bench.loadclient import read_answer, stop_children

__all__ = ["AgentPool"]


def _user_of(users: Sequence[int], index: int) -> int:
    return users[index % len(users)]


def _ks(k_base: int, stride: int, offset: int, count: int) -> range:
    return range(k_base + offset, k_base + offset + stride * count, stride)


class _Pacer:
    """Open-loop schedule: how many events are due at ``rate`` per second since ``start`` (None: unpaced)."""

    def __init__(self, rate: float | None, start: float) -> None:
        self.rate, self.start = rate, start

    def due(self, done: int) -> int:
        if self.rate is None:
            return 1 << 30
        return int((time.time() - self.start) * self.rate) + 1 - done

    def wait(self, done: int) -> None:
        if self.rate is not None:
            delay = self.start + done / self.rate - time.time()
            if delay > 0:
                time.sleep(delay)


def _sleep_until(moment: float) -> None:
    delay = moment - time.time()
    if delay > 0:
        time.sleep(delay)


class OursPublisher:
    """Publishes through this project's outbox (Django ORM, one transaction per call)."""

    def __init__(self) -> None:
        from django.db import transaction

        from realtime import publish, publish_many

        self.atomic = transaction.atomic
        self.publish = publish
        self.publish_many = publish_many

    def fanout(self, k: int) -> float:
        with self.atomic():
            self.publish("bench.fanout", {"k": k}, everyone=True)
        return time.time()

    def latency(self, rate: float, seconds: float, users: Sequence[int], k_base: int, start_at: float) -> list[float]:
        """Publish ``rate * seconds`` events, event ``i`` (``k_base + i``) to one user, paced; return commit times."""

        def send(i: int) -> None:
            with self.atomic():
                self.publish("bench.latency", {"k": k_base + i}, users=[_user_of(users, i)])

        return _paced(rate, seconds, start_at, send)

    def throughput(
        self,
        seconds: float,
        users: Sequence[int],
        k_base: int,
        stride: int,
        offset: int,
        batch: int,
        rate: float | None,
        start_at: float,
    ) -> dict[str, float]:
        """Publish for ``seconds`` (at ``rate`` per second, or as fast as possible); return the count and times.

        The ``i``-th event of this agent has ``k = k_base + offset + i * stride``
        and goes to ``users[(k - k_base) % len(users)]``. ``batch`` > 1
        publishes ``batch`` events per transaction with ``publish_many()``.
        """
        _sleep_until(start_at)
        start = time.time()
        end = start + seconds
        pacer = _Pacer(rate, start)
        done = 0
        while time.time() < end:
            due = pacer.due(done)
            if due <= 0:
                pacer.wait(done)
                continue
            size = min(batch, due)
            ks = _ks(k_base, stride, offset + done * stride, size)
            if batch > 1:
                with self.atomic():
                    self.publish_many(
                        [{"event": "bench.rate", "data": {"k": k}, "users": [_user_of(users, k - k_base)]} for k in ks]
                    )
            else:
                with self.atomic():
                    self.publish("bench.rate", {"k": ks[0]}, users=[_user_of(users, ks[0] - k_base)])
            done += size
        return {"count": done, "start": start, "end": time.time()}

    def paced_batches(
        self, rate: float, seconds: float, users: Sequence[int], k_base: int, batch: int, start_at: float
    ) -> dict[str, Any]:
        """Publish ``rate * seconds`` events, ``batch`` per transaction, paced; return each commit's time.

        Event ``i`` has ``k = k_base + i`` and goes to ``users[i % len(users)]``.
        ``batch`` 1 commits each event alone with ``publish()``; more uses
        ``publish_many()``. Each transaction commits once its last event is due;
        a publisher that falls behind commits back to back. Returns
        ``{"commits": [[first i, count, commit time], ...], "start", "end"}``.
        """
        total = int(rate * seconds)
        commits: list[list[float]] = []
        _sleep_until(start_at)
        start = time.time()
        pacer = _Pacer(rate, start)
        done = 0
        while done < total:
            size = min(batch, total - done)
            pacer.wait(done + size - 1)  # until the batch's last event is due: whole batches, not what is due
            with self.atomic():
                if batch == 1:
                    self.publish("bench.scaling", {"k": k_base + done}, users=[_user_of(users, done)])
                else:
                    self.publish_many(
                        [
                            {"event": "bench.scaling", "data": {"k": k_base + i}, "users": [_user_of(users, i)]}
                            for i in range(done, done + size)
                        ]
                    )
            commits.append([done, size, time.time()])
            done += size
        return {"commits": commits, "start": start, "end": time.time()}

    def wake_all(self, user: int, count: int) -> float:
        """Commit ``count`` events to ``user`` in one ``publish_many()`` (past a NOTIFY's 16: every worker reads)."""
        with self.atomic():
            self.publish_many([{"event": "bench.wake", "data": {"k": 0}, "users": [user]} for _ in range(count)])
        return time.time()


def _frame(k: int) -> str:
    """The event frame the Channels and floor publishers send (encoded once): the same shape as this project's."""
    at = datetime.now(UTC).isoformat()
    return f'{{"type":"event","id":{k},"event":"bench","topic":null,"data":{{"k":{k}}},"at":"{at}"}}'


class ChannelsPublisher:
    """Publishes through the configured Channels layer (``group_send``)."""

    def __init__(self) -> None:
        from channels.layers import get_channel_layer

        self.loop = asyncio.new_event_loop()
        self.layer = get_channel_layer()

    def _send(self, group: str, k: int) -> Any:
        return self.layer.group_send(group, {"type": "realtime.event", "text": _frame(k)})

    def fanout(self, k: int) -> float:
        started = time.time()
        self.loop.run_until_complete(self._send("everyone", k))
        return started

    def latency(self, rate: float, seconds: float, users: Sequence[int], k_base: int, start_at: float) -> list[float]:
        async def run() -> list[float]:
            count = int(rate * seconds)
            times: list[float] = []
            _sleep_until(start_at)
            start = time.time()
            for i in range(count):
                delay = start + i / rate - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                times.append(time.time())
                await self._send(f"user.{_user_of(users, i)}", k_base + i)
            return times

        return self.loop.run_until_complete(run())

    def throughput(
        self,
        seconds: float,
        users: Sequence[int],
        k_base: int,
        stride: int,
        offset: int,
        batch: int,
        rate: float | None,
        start_at: float,
    ) -> dict[str, float]:
        async def run() -> dict[str, float]:
            _sleep_until(start_at)
            start = time.time()
            end = start + seconds
            pacer = _Pacer(rate, start)
            done = 0
            while time.time() < end:
                due = pacer.due(done)
                if due <= 0:
                    delay = start + done / rate - time.time() if rate else 0
                    await asyncio.sleep(max(delay, 0))
                    continue
                size = min(batch, due)
                ks = _ks(k_base, stride, offset + done * stride, size)
                await asyncio.gather(*(self._send(f"user.{_user_of(users, k - k_base)}", k) for k in ks))
                done += size
            return {"count": done, "start": start, "end": time.time()}

        return self.loop.run_until_complete(run())


class FloorPublisher:
    """Publishes to the floor: one ``SELECT pg_notify()`` per event, in autocommit (no Django).

    Args:
        database_url: libpq connection string of the database the floor LISTENs on.
        channel: the floor's NOTIFY channel.
    """

    def __init__(self, database_url: str, channel: str) -> None:
        import psycopg

        self.connection = psycopg.connect(database_url, autocommit=True)
        self.channel = channel

    def _notify(self, user: int | None, k: int) -> None:
        payload = json.dumps({"u": user, "m": _frame(k)}, separators=(",", ":"))
        self.connection.execute("SELECT pg_notify(%s, %s)", (self.channel, payload))

    def fanout(self, k: int) -> float:
        self._notify(None, k)
        return time.time()

    def latency(self, rate: float, seconds: float, users: Sequence[int], k_base: int, start_at: float) -> list[float]:
        """Like :meth:`OursPublisher.latency`; each time is taken when ``pg_notify`` returned."""
        return _paced(rate, seconds, start_at, lambda i: self._notify(_user_of(users, i), k_base + i))


def _paced(rate: float, seconds: float, start_at: float, send: Callable[[int], None]) -> list[float]:
    """From ``start_at``, call ``send(i)`` for ``rate * seconds`` events, paced; return the time each returned."""
    times: list[float] = []
    _sleep_until(start_at)
    pacer = _Pacer(rate, time.time())
    for i in range(int(rate * seconds)):
        pacer.wait(i)
        send(i)
        times.append(time.time())
    return times


def _agent_main(pipe: Any, kind: str, settings_module: str, database_url: str, env: dict[str, str]) -> None:
    """Entry point of a publisher process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(env)
    os.environ["DJANGO_SETTINGS_MODULE"] = settings_module
    os.environ["DATABASE_URL"] = database_url
    try:
        publisher: Any
        if kind == "floor":
            publisher = FloorPublisher(database_url, env["BENCH_FLOOR_CHANNEL"])
        else:
            import django

            django.setup()
            publisher = OursPublisher() if kind == "ours" else ChannelsPublisher()
    except Exception:
        pipe.send(("error", traceback.format_exc()))
        return
    pipe.send(("ok", "ready"))
    while True:
        try:
            name, args = pipe.recv()
        except (EOFError, OSError):
            break
        if name == "exit":
            break
        try:
            pipe.send(("ok", getattr(publisher, name)(**args)))
        except Exception:
            pipe.send(("error", traceback.format_exc()))


class AgentPool:
    """``count`` publisher processes of one kind ("ours", "channels" or "floor"); a context manager.

    Args:
        kind: "ours", "channels" or "floor".
        count: how many processes.
        settings_module: their DJANGO_SETTINGS_MODULE.
        database_url: their DATABASE_URL.
        env: more environment variables for them (e.g. which channel layer; the floor's
            ``BENCH_FLOOR_CHANNEL``).
    """

    def __init__(
        self, kind: str, count: int, settings_module: str, database_url: str, env: dict[str, str] | None = None
    ) -> None:
        self.kind, self.count = kind, count
        self.settings_module, self.database_url, self.env = settings_module, database_url, env or {}
        self.pipes: list[Any] = []
        self.processes: list[Any] = []

    def __enter__(self) -> AgentPool:
        context = multiprocessing.get_context("spawn")
        try:
            for index in range(self.count):
                parent, child = context.Pipe()
                process = context.Process(
                    target=_agent_main,
                    args=(child, self.kind, self.settings_module, self.database_url, self.env),
                    name=f"bench-publisher-{index}",
                    daemon=True,
                )
                process.start()
                child.close()
                self.pipes.append(parent)
                self.processes.append(process)
            self.wait_all(timeout=60)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every agent (idempotent)."""
        stop_children(self.pipes, self.processes)
        self.pipes, self.processes = [], []

    def send(self, index: int, name: str, **args: Any) -> None:
        """Start command ``name`` on agent ``index`` (collect the answer with ``wait``/``wait_all``)."""
        self.pipes[index].send((name, args))

    def wait_all(
        self,
        indexes: Sequence[int] | None = None,
        timeout: float = 120.0,
        tick: Callable[[], None] | None = None,
    ) -> list[Any]:
        """Return the answers of agents ``indexes`` (default all), calling ``tick`` about once a second."""
        indexes = list(range(len(self.pipes))) if indexes is None else list(indexes)
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < len(indexes):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"publisher agents: no answer in {timeout:.0f}s")
            waiting = [self.pipes[i] for i in indexes if i not in answers]
            for pipe in multiprocessing.connection.wait(waiting, min(remaining, 1.0)):
                index = self.pipes.index(pipe)
                answers[index] = read_answer(pipe, f"publisher agent {index}")
            if tick is not None:
                tick()
        return [answers[i] for i in indexes]

    def call(self, index: int, name: str, timeout: float = 120.0, **args: Any) -> Any:
        """Run command ``name`` on agent ``index`` and return its answer."""
        self.send(index, name, **args)
        return self.wait_all([index], timeout)[0]
