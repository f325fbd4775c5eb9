"""The Channels equivalent of this project's connection handler, written as the Channels docs teach.

A connection is accepted only for an authenticated user (session cookie,
``AuthMiddlewareStack``), then joins two groups: ``user.<id>`` (events for that
user) and ``everyone``. It sends ``{"type": "welcome", ...}`` like our server,
then forwards every ``realtime.event`` message it receives from the channel
layer: the publisher encodes the frame once, as our server does.
"""

from __future__ import annotations

import json
from typing import Any

from channels.generic.websocket import AsyncWebsocketConsumer


class EventsConsumer(AsyncWebsocketConsumer):
    """One websocket: the user's group and the group of everyone."""

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.joined = [f"user.{user.pk}", "everyone"]
        for group in self.joined:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        welcome = {"type": "welcome", "user": {"id": user.pk, "username": user.get_username()}}
        await self.send(text_data=json.dumps(welcome, separators=(",", ":")))

    async def disconnect(self, code: int) -> None:
        for group in getattr(self, "joined", ()):
            await self.channel_layer.group_discard(group, self.channel_name)

    async def realtime_event(self, message: dict[str, Any]) -> None:
        """Forward an event published with ``group_send(group, {"type": "realtime.event", "text": frame})``."""
        await self.send(text_data=message["text"])
