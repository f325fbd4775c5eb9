"""``manage.py realtime_send``: publish one event from the command line."""

from __future__ import annotations

import json
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group, Permission
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, transaction

from realtime.outbox import publish

NO_AUDIENCE = "No audience: give --user, --group, --permission, --staff, --everyone or --topic."


class Command(BaseCommand):
    help = "Publish one realtime event (default: 'notification' with {\"message\": ...}) to an audience."

    def add_arguments(self, parser: CommandParser) -> None:
        audience = parser.add_argument_group("audience (a union; at least one)")
        audience.add_argument("--user", action="append", default=[], metavar="USERNAME", help="Repeatable.")
        audience.add_argument("--group", action="append", default=[], metavar="NAME", help="Repeatable.")
        audience.add_argument("--permission", metavar="APP_LABEL.CODENAME", help="Holders and superusers.")
        audience.add_argument("--staff", action="store_true", help="Every staff user.")
        audience.add_argument("--everyone", action="store_true", help="Every authenticated connection.")
        audience.add_argument("--topic", help="Subscribers of this topic.")
        event = parser.add_argument_group("event")
        event.add_argument("--event", default="notification", help="Event name (default: notification).")
        event.add_argument("--message", help='Text: the data is {"message": TEXT}.')
        event.add_argument("--data", help="The data as JSON.")

    def handle(self, *args: Any, **options: Any) -> None:
        data = _data(options["message"], options["data"])
        users = _user_ids(options["user"])
        groups = _group_names(options["group"])
        permission = options["permission"]
        if permission is not None:
            _check_permission(permission)
        if not (users or groups or permission or options["staff"] or options["everyone"] or options["topic"]):
            raise CommandError(NO_AUDIENCE)
        try:
            with transaction.atomic():
                event = publish(
                    options["event"],
                    data,
                    users=users,
                    groups=groups,
                    permission=permission,
                    staff=options["staff"],
                    everyone=options["everyone"],
                    topic=options["topic"],
                )
            event.refresh_from_db(fields=["position"])
        except (TypeError, ValueError) as exc:
            raise CommandError(str(exc)) from None
        except DatabaseError as exc:
            raise CommandError(f"Cannot publish: {exc}") from None
        self.stdout.write(f"Published {event.name!r} (id {event.position}).")


def _data(message: str | None, data: str | None) -> Any:
    if message is not None and data is not None:
        raise CommandError("Give --message or --data, not both.")
    if message is not None:
        if not message.strip():
            raise CommandError("--message is empty.")
        return {"message": message}
    if data is None:
        raise CommandError("Give --message TEXT or --data JSON.")
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise CommandError(f"--data is not valid JSON: {exc}.") from None


def _user_ids(usernames: list[str]) -> list[int]:
    if not usernames:
        return []
    User = get_user_model()
    found = dict(
        User._default_manager.filter(**{f"{User.USERNAME_FIELD}__in": usernames}).values_list(User.USERNAME_FIELD, "pk")
    )
    missing = [name for name in dict.fromkeys(usernames) if name not in found]
    if missing:
        raise CommandError(f"Unknown user(s): {', '.join(missing)}.")
    return sorted(set(found.values()))


def _group_names(names: list[str]) -> list[str]:
    if not names:
        return []
    found = set(Group.objects.filter(name__in=names).values_list("name", flat=True))
    missing = [name for name in dict.fromkeys(names) if name not in found]
    if missing:
        raise CommandError(f"Unknown group(s): {', '.join(missing)}.")
    return sorted(found)


def _check_permission(permission: str) -> None:
    app_label, _, codename = permission.partition(".")
    if not app_label or not codename or "." in codename:
        raise CommandError(f"--permission must look like app_label.codename, not {permission!r}.")
    if not Permission.objects.filter(content_type__app_label=app_label, codename=codename).exists():
        raise CommandError(f"Unknown permission {permission!r}.")
