"""``ChangeActorMiddleware``: your own views' changes to tracked models say who made them.

Add ``"realtime.middleware.ChangeActorMiddleware"`` to ``MIDDLEWARE`` after
``AuthenticationMiddleware``. Each request then runs in
``realtime.acting_as(request.user)``; the user is read only if the request
changes a tracked model. The admin needs no middleware: it sets the actor itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse

from realtime.changes import acting_as

__all__ = ["ChangeActorMiddleware"]


class ChangeActorMiddleware:
    """Run each request as ``realtime.acting_as(request.user)`` (sync views)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> Any:
        with acting_as(lambda: getattr(request, "user", None)):
            return self.get_response(request)
