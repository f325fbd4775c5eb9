"""The ASGI application daphne serves: Django over HTTP, the events consumer over websockets.

Websockets get the same checks as this project's server: the Origin must be
one of ALLOWED_HOSTS (``AllowedHostsOriginValidator``) and the user comes
from the Django session cookie (``AuthMiddlewareStack``).
"""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bench.channels_site.settings")

from django.core.asgi import get_asgi_application

django_application = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from bench.channels_site.consumers import EventsConsumer  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_application,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(EventsConsumer.as_asgi())),
    }
)
