"""``{% realtime_client %}``: wire the JS client into any page.

    {% load realtime %}
    {% realtime_client topics="room:1,news" %}

renders a ``<script type="module">`` that creates ``window.realtime``, a started
:js:class:`RealtimeClient` using this site's token URL, and dispatches each
message as a ``realtime:<type>`` DOM event on ``document`` (``realtime:event``,
``realtime:state``, ``realtime:reset``...), so pages can listen without
importing anything. Nothing is rendered for anonymous users.
"""

from __future__ import annotations

import json
from typing import Any

from django import template
from django.templatetags.static import static
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

register = template.Library()


@register.simple_tag(takes_context=True)
def realtime_client(context: dict[str, Any], topics: str = "", variable: str = "realtime") -> SafeString | str:
    """Render the client's ``<script>``; ``topics`` is a comma-separated list."""
    request = context.get("request")
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return ""
    if not variable.isidentifier():
        raise template.TemplateSyntaxError(
            f"realtime_client variable must be a JavaScript identifier, not {variable!r}."
        )
    options = {
        "tokenUrl": reverse("realtime:token"),
        "topics": [topic.strip() for topic in topics.split(",") if topic.strip()],
    }
    # json.dumps output is safe inside a script once "<" is escaped.
    options_json = json.dumps(options).replace("<", "\\u003c")
    return format_html(
        '<script type="module">\n'
        'import {{ RealtimeClient }} from "{}";\n'
        "const client = new RealtimeClient({});\n"
        'for (const type of ["event", "state", "welcome", "reset", "error"]) {{\n'
        '  client.on(type, (detail) => document.dispatchEvent(new CustomEvent("realtime:" + type, {{ detail }})));\n'
        "}}\n"
        "window.{} = client;\n"
        "client.start();\n"
        "</script>",
        static("realtime/realtime.js"),
        SafeString(options_json),
        variable,
    )
