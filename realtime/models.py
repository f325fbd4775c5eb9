"""Database tables: the event outbox and the connection tickets.

``Event.position`` is the commit-ordered cursor that clients see as the event
``id``. It is NULL while the publishing transaction is open; a deferred
constraint trigger (see migration 0001) assigns it at commit time under a
transaction-scoped advisory lock, so positions increase in commit order and a
reader that sees position P also sees every position below P.
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
        indexes = [models.Index(fields=["created_at"], name="realtime_event_created_idx")]

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
