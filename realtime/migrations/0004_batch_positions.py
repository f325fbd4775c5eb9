from django.db import migrations

# Position a whole batch at once. The first trigger firing of a committing
# transaction takes the advisory lock, reserves one block of the sequence for
# all of the transaction's unpositioned rows and numbers them in id order with
# a single UPDATE; the other firings find their row positioned and return.
# (Version 0001 updated row by row, and its "position IS NULL" lookup could
# scan every pending row: quadratic in the batch size.)
POSITION_SQL = """
CREATE OR REPLACE FUNCTION realtime_event_assign_position() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    current_position bigint;
    pending bigint;
    base bigint;
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
    PERFORM pg_notify('realtime', '');
    RETURN NULL;
END
$$;
"""

PREVIOUS_SQL = """
CREATE OR REPLACE FUNCTION realtime_event_assign_position() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7247287601);
    UPDATE realtime_event SET position = nextval('realtime_event_position_seq')
        WHERE id = NEW.id AND position IS NULL;
    PERFORM pg_notify('realtime', '');
    RETURN NULL;
END
$$;
"""


class Migration(migrations.Migration):
    dependencies = [("realtime", "0003_presence")]

    operations = [
        migrations.RunSQL(POSITION_SQL, reverse_sql=PREVIOUS_SQL),
        # An outbox churns (insert, position update, prune): vacuum it early so the
        # dead index entries of unpositioned versions stay few.
        migrations.RunSQL(
            "ALTER TABLE realtime_event SET "
            "(autovacuum_vacuum_scale_factor = 0.02, autovacuum_vacuum_threshold = 1000)",
            reverse_sql="ALTER TABLE realtime_event RESET "
            "(autovacuum_vacuum_scale_factor, autovacuum_vacuum_threshold)",
        ),
    ]
