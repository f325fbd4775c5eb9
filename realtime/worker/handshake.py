"""What the websocket handshake decides: allowed origins, the client's IP address.

- ``allowed_origins()`` returns the ``origins`` argument for websockets' ``serve()``:
  ``REALTIME["ALLOWED_ORIGINS"]`` when set, else derived from ``ALLOWED_HOSTS``
  (``http(s)://host[:port]``) and ``CSRF_TRUSTED_ORIGINS``. A browser page from any
  other origin gets HTTP 403 (cross-site websocket hijacking). A missing ``Origin``
  (a non-browser client) is refused too unless ``None`` is in the list.
- ``client_ip()`` returns the peer address, or the address named by
  ``X-Forwarded-For`` when the peer is one of ``REALTIME["TRUSTED_PROXIES"]``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from django.conf import settings as django_settings

from realtime.conf import settings

__all__ = ["allowed_origins", "client_ip", "format_address", "format_host", "throttle_key"]

_HOST = r"(?::\d+)?"  # any port


def _host_pattern(host: str) -> str | None:
    if host == "*":
        return None
    if host.startswith("."):
        # ".example.com": the domain and its subdomains, as in ALLOWED_HOSTS.
        return rf"(?:[^/:]+\.)?{re.escape(host[1:])}"
    return re.escape(host)


def allowed_origins() -> list[str | re.Pattern[str] | None] | None:
    """Return the Origin allow-list for ``serve(origins=...)`` (None: any origin)."""
    configured = settings.ALLOWED_ORIGINS
    if configured is not None:
        return [re.compile(o) if isinstance(o, str) and o.startswith("^") else o for o in configured]
    patterns: list[str | re.Pattern[str] | None] = []
    for host in django_settings.ALLOWED_HOSTS:
        pattern = _host_pattern(host)
        if pattern is None:
            return None  # ALLOWED_HOSTS = ["*"]: nothing to derive (deploy check realtime.W002 says so)
        patterns.append(re.compile(rf"^https?://{pattern}{_HOST}$", re.IGNORECASE))
    for origin in getattr(django_settings, "CSRF_TRUSTED_ORIGINS", []):
        if "*" in origin:
            scheme, _, rest = origin.partition("://")
            patterns.append(re.compile(rf"^{re.escape(scheme)}://(?:[^/:]+\.)?{re.escape(rest.lstrip('*.'))}{_HOST}$"))
        else:
            patterns.append(origin)
    if django_settings.DEBUG:
        # runserver's own origin, whatever ALLOWED_HOSTS says (Django allows it in DEBUG too).
        patterns.append(re.compile(rf"^https?://(?:localhost|127\.0\.0\.1|\[::1\]){_HOST}$"))
    return patterns


def _networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(proxy, strict=False) for proxy in settings.TRUSTED_PROXIES]


def _trusted(address: str, networks: list[Any]) -> bool:
    if address in ("", "unix"):
        return True  # a Unix socket: only a local reverse proxy can connect
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_ip(peer: str, forwarded_for: str | None) -> str:
    """Return the client's IP: ``peer``, or the nearest untrusted hop of ``X-Forwarded-For``."""
    networks = _networks()
    if not forwarded_for or not (networks or peer in ("", "unix")) or not _trusted(peer, networks):
        return peer or "unix"
    # Walk from the nearest hop: the first address that is not a trusted proxy is the client.
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, networks):
            return hop
    return hops[0] if hops else (peer or "unix")


def throttle_key(address: str) -> str | None:
    """Return what failed logins are counted against for a client at ``address``, or None (not counted).

    An IPv6 client holds a whole /64 (it may rotate through it): the /64 is the
    key. A Unix-socket peer with no ``X-Forwarded-For`` is every client of a
    local proxy at once: not counted.
    """
    if address in ("", "unix"):
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def format_host(host: str) -> str:
    """Return ``host`` as it appears before ``:port`` (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def format_address(address: Any) -> str:
    """Return a socket address as ``host:port`` (``[::1]:8765``), or the path of a Unix socket."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{format_host(str(address[0]))}:{address[1]}"
    return str(address or "unix")
