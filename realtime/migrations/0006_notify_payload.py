from importlib import import_module

from django.db import migrations

# What reverting restores: version 0004 of the function.
PREVIOUS_SQL = import_module("realtime.migrations.0004_batch_positions").POSITION_SQL

# The NOTIFY carries the transaction's events when they are few, not control
# events, and fit in PostgreSQL's 8,000-byte payload: one line of header
# (position, publish time, audience columns) and one line of wire message per
# event, the message built by the same expression as outbox.EVENT_MESSAGE (a
# frozen copy; tests/test_notify_payload.py holds the two equal). A worker
# whose cursor is just below the first position delivers them without reading
# the table; otherwise, or with an empty payload, it reads the table as before.
# Neither JSON text has a raw newline, so lines split them.
POSITION_SQL = r"""
CREATE OR REPLACE FUNCTION realtime_event_assign_position() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    current_position bigint;
    pending bigint;
    base bigint;
    payload text := '';
BEGIN
    SELECT position INTO current_position FROM realtime_event WHERE id = NEW.id;
    IF current_position IS NOT NULL THEN
        RETURN NULL;
    END IF;
    PERFORM pg_advisory_xact_lock(7247287601);
    -- Only this transaction's rows are both visible to it and unpositioned.
    SELECT count(*) INTO pending FROM realtime_event WHERE position IS NULL;
    -- The sequence is drawn from only here, under the lock: reserve a block.
    base := nextval('realtime_event_position_seq');
    IF pending > 1 THEN
        PERFORM setval('realtime_event_position_seq', base + pending - 1);
    END IF;
    UPDATE realtime_event e SET position = base + numbered.rank - 1
    FROM (
        SELECT id, row_number() OVER (ORDER BY id) AS rank FROM realtime_event WHERE position IS NULL
    ) AS numbered
    WHERE e.id = numbered.id;
    IF pending <= 16 THEN
        SELECT CASE WHEN bool_or(control) THEN '' ELSE string_agg(
            json_build_array(
                position, extract(epoch FROM created_at)::float8,
                users, groups, permissions, staff, everyone, topic, staff_only
            )::text
            || E'\n' || '{"type":"event","id":' || position
            || ',"event":' || to_json(name)::text
            || ',"topic":' || coalesce(to_json(topic)::text, 'null')
            || ',"data":' || data::text
            || ',"at":"' || to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '+00:00"}',
            E'\n' ORDER BY position
        ) END
        INTO payload
        FROM realtime_event WHERE position BETWEEN base AND base + pending - 1;
        IF octet_length(payload) >= 8000 THEN
            payload := '';
        END IF;
    END IF;
    PERFORM pg_notify('realtime', payload);
    RETURN NULL;
END
$$;
"""


class Migration(migrations.Migration):
    dependencies = [("realtime", "0005_worker_cursor")]

    operations = [migrations.RunSQL(POSITION_SQL, reverse_sql=PREVIOUS_SQL)]
