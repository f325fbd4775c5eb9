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
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

register = template.Library()


@register.simple_tag(takes_context=True)
def realtime_client(
    context: dict[str, Any], topics: Any = "", variable: str = "realtime", last_id: Any = None
) -> SafeString | str:
    """Render the client's ``<script>``.

    ``topics`` is a comma-separated string or a list of topics. ``last_id``
    (an event id, e.g. ``realtime.changes.newest_position()`` read when the
    page was rendered) makes the client replay what was committed between
    the render and its connection; ``None`` starts from the connection.
    """
    request = context.get("request")
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return ""
    if not variable.isidentifier():
        raise template.TemplateSyntaxError(
            f"realtime_client variable must be a JavaScript identifier, not {variable!r}."
        )
    if last_id is not None and (isinstance(last_id, bool) or not isinstance(last_id, int) or last_id < 0):
        raise template.TemplateSyntaxError(f"realtime_client last_id must be None or an event id, not {last_id!r}.")
    names = topics.split(",") if isinstance(topics, str) else [str(topic) for topic in topics or ()]
    options: dict[str, Any] = {
        "tokenUrl": reverse("realtime:token"),
        "topics": [topic.strip() for topic in names if topic.strip()],
    }
    if last_id is not None:
        options["lastId"] = last_id
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


@register.simple_tag(takes_context=True)
def realtime_admin_page(context: Any) -> dict[str, Any] | None:
    """What realtime's admin templates need on a live change form, or None (see ``realtime.live_admin.page_state``)."""
    from realtime.live_admin import page_state

    state = page_state(context)
    if state is not None:
        state["time_zone"] = timezone.get_current_timezone_name()
    return state
