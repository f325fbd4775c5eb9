"""The {% realtime_client %} tag."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import AnonymousUser
from django.template import Context, Template, TemplateSyntaxError
from django.test import RequestFactory

from tests.helpers import make_user


def render(user, source: str) -> str:
    request = RequestFactory().get("/")
    request.user = user
    return Template("{% load realtime %}" + source).render(Context({"request": request}))


@pytest.mark.django_db
def test_renders_a_started_client_with_the_token_url_and_topics():
    """For a logged-in user the tag imports the client, passes the token URL and topics, and starts it."""
    html = render(make_user("alice"), '{% realtime_client topics="room:1, news" %}')
    assert '<script type="module">' in html
    assert 'import { RealtimeClient } from "/static/realtime/realtime.js";' in html
    assert '{"tokenUrl": "/realtime/token/", "topics": ["room:1", "news"]}' in html
    assert "window.realtime = client;" in html
    assert "client.start();" in html


def test_renders_nothing_for_anonymous_users():
    """Anonymous visitors cannot get a token: no script at all."""
    assert render(AnonymousUser(), "{% realtime_client %}") == ""


@pytest.mark.django_db
def test_topics_cannot_break_out_of_the_script():
    """A topic containing </script> is escaped, and a bad variable name is a template error."""
    html = render(make_user("alice"), '{% realtime_client topics="</script><b>" %}')
    assert "</script><b>" not in html
    with pytest.raises(TemplateSyntaxError, match="JavaScript identifier"):
        render(make_user("bob"), '{% realtime_client variable="x;alert(1)" %}')
