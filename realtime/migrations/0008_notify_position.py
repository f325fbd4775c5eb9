from importlib import import_module

from django.db import migrations

# What reverting restores: version 0006 of the function.
PREVIOUS_SQL = import_module("realtime.migrations.0006_notify_payload").POSITION_SQL

# A NOTIFY that cannot carry its transaction's events (more than 16, a control
# event, 8,000 bytes or more) now says where they end: its payload is the
# transaction's last position, in decimal (one line; an event payload always
# has two lines per event). A worker reading the outbox from a streaming
# replica, which may lag, reads until the replica has shown that position. The
# events payload is unchanged (outbox.payload_events() reads both forms).
# Version 0006's workers read the new wake-up as an unreadable payload and
# fall back to reading the table: correct, with a logged error per wake-up
# until they are replaced.
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
    END IF;
    IF coalesce(payload, '') = '' OR octet_length(payload) >= 8000 THEN
        payload := (base + pending - 1)::text;
    END IF;
    PERFORM pg_notify('realtime', payload);
    RETURN NULL;
END
$$;
"""


class Migration(migrations.Migration):
    dependencies = [("realtime", "0007_model_change_index")]

    operations = [migrations.RunSQL(POSITION_SQL, reverse_sql=PREVIOUS_SQL)]
