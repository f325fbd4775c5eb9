"""The audience rule is stated three ways (index, predicate, SQL); all three give the same answers."""

from __future__ import annotations

import pytest
from django.db import connection
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realtime.core.audience import AUDIENCE_SQL, Audience, Identity, audience_sql_params, matches
from realtime.worker.registry import Client, Registry

GROUPS = ["red", "green", "blue"]
PERMISSIONS = ["auth.view_user", "auth.change_group"]
TOPICS = ["t1", "t2", "t3"]

identities = st.builds(
    Identity,
    user_id=st.integers(1, 4),
    username=st.just("u"),
    session_hash=st.sampled_from(["s1", "s2"]),
    is_staff=st.booleans(),
    is_superuser=st.booleans(),
    groups=st.frozensets(st.sampled_from(GROUPS)),
    permissions=st.frozensets(st.sampled_from(PERMISSIONS)),
)
topic_sets = st.frozensets(st.sampled_from(TOPICS))
audiences = st.builds(
    Audience,
    users=st.lists(st.integers(1, 4), max_size=3),
    groups=st.lists(st.sampled_from(GROUPS), max_size=2),
    permissions=st.lists(st.sampled_from(PERMISSIONS), max_size=2),
    staff=st.booleans(),
    everyone=st.booleans(),
    topic=st.none() | st.sampled_from(TOPICS),
    staff_only=st.booleans(),
)


@given(st.lists(st.tuples(identities, topic_sets), min_size=1, max_size=8), audiences)
def test_index_equals_predicate(clients, audience):
    """registry.recipients() returns exactly the clients matches() accepts, each once."""
    registry = Registry()
    made = []
    for identity, topics in clients:
        client = Client(object(), identity)
        registry.add(client)
        for topic in topics:
            registry.subscribe(client, topic)
        made.append(client)
    recipients = list(registry.recipients(audience))
    assert len(recipients) == len(set(recipients))
    assert set(recipients) == {c for c in made if matches(c.identity, c.topics, audience)}


@pytest.mark.django_db
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=200)
@given(identities, topic_sets, audiences)
def test_sql_equals_predicate(identity, topics, audience):
    """AUDIENCE_SQL, evaluated by PostgreSQL on an outbox-shaped row, agrees with matches()."""
    row = (
        "SELECT %(a_users)s::bigint[] AS users, %(a_groups)s::varchar[] AS groups,"
        " %(a_permissions)s::varchar[] AS permissions, %(a_staff)s AS staff, %(a_everyone)s AS everyone,"
        " %(a_topic)s::varchar AS topic, %(a_staff_only)s AS staff_only"
    )
    params = {f"a_{key}": value for key, value in audience._asdict().items()}
    params.update(audience_sql_params(identity, topics))
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {AUDIENCE_SQL} FROM ({row}) AS realtime_event", params)
        (answer,) = cursor.fetchone()
    assert answer is matches(identity, topics, audience)
