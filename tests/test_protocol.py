"""The wire protocol's parser and serialisers, without a socket."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.core import protocol
from realtime.core.protocol import CloseCode, ProtocolError


def test_auth_message_and_bare_token():
    """The first message is an auth object or a bare token string."""
    assert protocol.parse_auth('{"type": "auth", "token": "t", "last_id": 7}') == protocol.Auth("t", 7)
    assert protocol.parse_auth('{"type": "auth", "token": "t"}') == protocol.Auth("t", None)
    assert protocol.parse_auth("  abc:def  ") == protocol.Auth("abc:def", None)
    parsed = protocol.parse_auth('{"type": "auth", "token": "t", "last_id": null, "topics": ["a", "b", "a"]}')
    assert parsed.topics == ("a", "b")


@pytest.mark.parametrize(
    ("message", "code", "close"),
    [
        (b"binary", "bad_message", CloseCode.POLICY_VIOLATION),
        ("{oops", "bad_json", CloseCode.POLICY_VIOLATION),
        ("[1, 2]", "bad_message", CloseCode.POLICY_VIOLATION),
        ('{"type": "ping"}', "auth_required", CloseCode.POLICY_VIOLATION),
        ('{"type": "auth"}', "bad_token", CloseCode.AUTH_FAILED),
        ('{"type": "auth", "token": 5}', "bad_token", CloseCode.AUTH_FAILED),
        ('{"type": "auth", "token": "t", "last_id": -1}', "bad_last_id", CloseCode.POLICY_VIOLATION),
        ('{"type": "auth", "token": "t", "last_id": true}', "bad_last_id", CloseCode.POLICY_VIOLATION),
        ('{"type": "auth", "token": "t", "last_id": "3"}', "bad_last_id", CloseCode.POLICY_VIOLATION),
        ('{"type": "auth", "token": "t", "topics": "a"}', "bad_topics", CloseCode.POLICY_VIOLATION),
        ("", "bad_token", CloseCode.AUTH_FAILED),
        ("two words", "bad_token", CloseCode.AUTH_FAILED),
    ],
)
def test_bad_first_messages_close(message, code, close):
    """Every malformed first message has a defined error code and close code."""
    with pytest.raises(ProtocolError) as info:
        protocol.parse_auth(message)
    assert (info.value.code, info.value.close_code) == (code, close)
    if message == "[1, 2]":
        assert info.value.message == "The message must be a JSON object."


def test_messages_after_auth():
    """subscribe, unsubscribe and ping parse; mistakes are errors that keep the connection open."""
    assert protocol.parse_message('{"type": "ping"}') == protocol.Ping()
    assert protocol.parse_message('{"type": "subscribe", "topic": "x"}') == protocol.Subscribe("x")
    assert protocol.parse_message('{"type": "unsubscribe", "topic": "x"}') == protocol.Unsubscribe("x")
    for message, code in [
        ("nope", "bad_json"),
        ('"str"', "bad_message"),
        ('{"type": "subscribe"}', "bad_topic"),
        ('{"type": "subscribe", "topic": ""}', "bad_topic"),
        ('{"type": "subscribe", "topic": "' + "x" * 201 + '"}', "bad_topic"),
        ('{"type": "auth", "token": "t"}', "already_authenticated"),
        ('{"type": "fly"}', "unknown_type"),
        ("{}", "unknown_type"),
    ]:
        with pytest.raises(ProtocolError) as info:
            protocol.parse_message(message)
        assert info.value.code == code, message
        assert info.value.close_code is None
    with pytest.raises(ProtocolError) as info:
        protocol.parse_message(b"\x00")
    assert info.value.close_code == CloseCode.POLICY_VIOLATION


def test_serialisers_produce_the_contract():
    """Server messages are the JSON objects the wire contract names."""
    event = json.loads(protocol.encode_event(5, "a.b", None, '{"k": [1, "é"]}', "2026-01-01T00:00:00+00:00"))
    assert event == {
        "type": "event",
        "id": 5,
        "event": "a.b",
        "topic": None,
        "data": {"k": [1, "é"]},
        "at": "2026-01-01T00:00:00+00:00",
    }
    assert json.loads(protocol.encode_welcome(1, 'a"b', 9)) == {
        "type": "welcome",
        "user": {"id": 1, "username": 'a"b'},
        "last_id": 9,
    }
    assert json.loads(protocol.encode_error("c", "m")) == {"type": "error", "code": "c", "message": "m"}
    assert json.loads(protocol.encode_pong()) == {"type": "pong"}
    assert json.loads(protocol.encode_reset(3)) == {"type": "reset", "last_id": 3}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)
client_objects = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["auth", "subscribe", "unsubscribe", "ping", "pong", ""]) | st.text(max_size=10),
        "token": json_values,
        "last_id": json_values,
        "topic": json_values,
        "topics": json_values,
    },
)
any_message = (
    st.text(max_size=300) | st.binary(max_size=50) | client_objects.map(json.dumps) | json_values.map(json.dumps)
)


@settings(max_examples=400, deadline=None)
@given(any_message)
def test_any_input_parses_or_raises_a_protocol_error(message):
    """Whatever a client sends, the parser returns a message or a ProtocolError with a defined code, never crashes."""
    for parse in (protocol.parse_auth, protocol.parse_message):
        try:
            parsed = parse(message)
        except ProtocolError as error:
            assert error.code in {
                "bad_message",
                "bad_json",
                "auth_required",
                "bad_token",
                "bad_last_id",
                "bad_topics",
                "bad_topic",
                "already_authenticated",
                "unknown_type",
            }
            assert error.close_code is None or isinstance(error.close_code, CloseCode)
            assert parse is protocol.parse_message or error.close_code is not None  # first message: always closes
        else:
            if isinstance(parsed, protocol.Auth):
                assert isinstance(parsed.token, str) and parsed.token
                assert parsed.last_id is None or (isinstance(parsed.last_id, int) and parsed.last_id >= 0)
                assert all(isinstance(t, str) and 0 < len(t) <= 200 for t in parsed.topics)
            elif isinstance(parsed, protocol.Subscribe | protocol.Unsubscribe):
                assert 0 < len(parsed.topic) <= 200
