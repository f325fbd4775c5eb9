from django.db import migrations

# The commit trigger looks up its own rows (by id, and by "position IS NULL") in
# statements planned from the table's statistics. Statistics taken while the
# outbox was empty (a prune that emptied it, then an ANALYZE) made every one of
# them a sequential scan until autovacuum analyzed the table again, up to a
# minute later: a commit of 100 events read the whole table 101 times (117 ms
# per commit at 40,000 rows, against 1.5 ms). The indexes are always right for
# these statements, so the function plans without sequential scans.
SQL = "ALTER FUNCTION realtime_event_assign_position() SET enable_seqscan = off"
REVERSE_SQL = "ALTER FUNCTION realtime_event_assign_position() RESET enable_seqscan"


class Migration(migrations.Migration):
    dependencies = [("realtime", "0008_notify_position")]

    operations = [migrations.RunSQL(SQL, reverse_sql=REVERSE_SQL)]
