"""Database tables: the event outbox, the connection tickets and presence.

``Event.position`` is the commit-ordered cursor that clients see as the event
``id``. It is NULL while the publishing transaction is open; a deferred
constraint trigger (see migration 0001) assigns it at commit time under a
transaction-scoped advisory lock, so positions increase in commit order and a
reader that sees position P also sees every position below P.

The presence tables (see realtime.presence) say who is connected to which
worker: a worker's rows are live while its lease (``expires_at``) lasts.
"""

from django.contrib.postgres.fields import ArrayField
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.utils import timezone


class Event(models.Model):
    """One published event and the audience allowed to receive it."""

    position = models.BigIntegerField(null=True, unique=True, editable=False)
    name = models.CharField(max_length=200)
    topic = models.CharField(max_length=200, null=True, blank=True)
    data = models.JSONField(encoder=DjangoJSONEncoder, default=dict)
    created_at = models.DateTimeField(default=timezone.now)
    # Audience: a user receives the event if any of these include them.
    users = ArrayField(models.BigIntegerField(), default=list, blank=True)
    groups = ArrayField(models.CharField(max_length=150), default=list, blank=True)
    permissions = ArrayField(models.CharField(max_length=255), default=list, blank=True)
    staff = models.BooleanField(default=False)
    everyone = models.BooleanField(default=False)
    # Restriction applied after the union above (admin events: staff only).
    staff_only = models.BooleanField(default=False)
    # Control events steer the workers (logout, user changes); never sent.
    control = models.BooleanField(default=False)

    class Meta:
        db_table = "realtime_event"
        indexes = [
            models.Index(fields=["created_at"], name="realtime_event_created_idx"),
            # realtime.changes.changed_since() on a change form's save: one object's newest change,
            # without reading every event since the page was opened. Only model.change events pay for it.
            models.Index(
                fields=["topic", "position"],
                name="realtime_event_change_idx",
                condition=models.Q(name="model.change"),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} #{self.position or 'uncommitted'}"


class Ticket(models.Model):
    """A single-use connection ticket behind a token (see realtime.tokens)."""

    nonce_hash = models.CharField(max_length=64, unique=True)
    session_key = models.CharField(max_length=40)
    user_id = models.BigIntegerField()
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        db_table = "realtime_ticket"


class RetentionHorizon(models.Model):
    """The highest position pruned so far (one row): older cursors get ``reset``."""

    position = models.BigIntegerField(default=0)

    class Meta:
        db_table = "realtime_retention_horizon"


class PresenceWorker(models.Model):
    """A websocket worker process and its lease on its presence rows."""

    # Random, generated per worker process (see realtime.presence).
    id = models.CharField(primary_key=True, max_length=64)
    hostname = models.CharField(max_length=255)
    pid = models.IntegerField()
    started_at = models.DateTimeField()
    heartbeat_at = models.DateTimeField()
    # Database time after which the worker counts as dead and its rows expire.
    expires_at = models.DateTimeField(db_index=True)
    # The listener's cursor at the last heartbeat: how far this worker has routed.
    cursor = models.BigIntegerField(default=0)

    class Meta:
        db_table = "realtime_presence_worker"
        default_permissions = ()

    def __str__(self) -> str:
        return f"{self.hostname}/{self.pid}"


class PresenceConnection(models.Model):
    """One authenticated websocket connection, on one worker."""

    # "<worker id>.<n>": unique across workers.
    id = models.CharField(primary_key=True, max_length=100)
    worker = models.ForeignKey(PresenceWorker, on_delete=models.CASCADE, related_name="connections")
    user_id = models.BigIntegerField(db_index=True)
    username = models.CharField(max_length=255)
    client_ip = models.CharField("client IP", max_length=64)
    connected_at = models.DateTimeField()

    class Meta:
        db_table = "realtime_presence_connection"
        default_permissions = ()
        permissions = [("view_presence", "Can see who is online")]
        verbose_name = "online connection"
        verbose_name_plural = "online now"

    def __str__(self) -> str:
        return f"{self.username} on {self.worker_id}"


class PresenceSubscription(models.Model):
    """A topic that one connection is subscribed to (``user_id`` copied for per-topic queries)."""

    connection = models.ForeignKey(PresenceConnection, on_delete=models.CASCADE, related_name="subscriptions")
    user_id = models.BigIntegerField()
    topic = models.CharField(max_length=200)

    class Meta:
        db_table = "realtime_presence_subscription"
        default_permissions = ()
        constraints = [models.UniqueConstraint(fields=["connection", "topic"], name="realtime_presence_sub_unique")]
        indexes = [models.Index(fields=["topic", "user_id"], name="realtime_presence_topic_idx")]
