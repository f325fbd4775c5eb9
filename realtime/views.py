"""HTTP views: the token endpoint and the demo page."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from realtime import tokens
from realtime.conf import settings

__all__ = ["demo", "token", "websocket_url"]


def websocket_url(request: HttpRequest) -> str:
    """Return the websocket URL for clients of ``request``.

    ``REALTIME["URL"]`` when set; otherwise the request's host name on
    ``REALTIME["WS_PORT"]``, with ``wss://`` behind HTTPS.
    """
    if settings.URL:
        return str(settings.URL)
    host = request.get_host()
    # Drop the port, keeping IPv6 brackets: "[::1]:8000" -> "[::1]".
    hostname = host[: host.index("]") + 1] if host.startswith("[") else host.split(":", 1)[0]
    scheme = "wss" if request.is_secure() else "ws"
    return f"{scheme}://{hostname}:{settings.WS_PORT}/"


@require_GET
@never_cache
def token(request: HttpRequest) -> HttpResponse:
    """Return a short-lived websocket token for the logged-in user (401 if anonymous)."""
    if not request.user.is_authenticated:
        return JsonResponse({"error": "Authentication required: log in first."}, status=401)
    session_key = request.session.session_key
    if session_key is None:
        # Authenticated without a stored session (e.g. a custom middleware).
        return JsonResponse({"error": "A server-side session is required."}, status=401)
    return JsonResponse(
        {
            "token": tokens.mint(request.user, session_key),
            "url": websocket_url(request),
            "expires_in": settings.TOKEN_MAX_AGE,
        }
    )


@login_required
def demo(request: HttpRequest) -> HttpResponse:
    """A page that shows events as they arrive and the connection state."""
    return render(request, "realtime/demo.html")
