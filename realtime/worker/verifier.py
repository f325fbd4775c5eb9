"""Token and session checks for the worker, in one SQL statement on the event loop.

:class:`Verifier` gives the worker the same answers as
:func:`realtime.tokens.check` and :func:`realtime.tokens.identity_for_session`,
at a fraction of the cost. With Django's usual set-up (the ``db`` or
``cached_db`` session engine, only ``ModelBackend``, a user model with
``PermissionsMixin``, no database routers) one statement on a small pool of
psycopg async connections consumes the ticket and reads the session, the user,
their group names and their permissions; Python then runs the same checks as
the ORM path (:func:`~realtime.tokens.check_session_data`,
:func:`~realtime.tokens.check_user`). Any other set-up goes through the ORM
in the worker's thread pool, unchanged.

Database failures raise :class:`django.db.DatabaseError` on both paths.
"""

from __future__ import annotations

import logging
from functools import cached_property
from importlib import import_module
from typing import Any, cast

import psycopg
from django.conf import settings as django_settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, Group, Permission, PermissionsMixin
from django.contrib.contenttypes.models import ContentType
from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections
from django.db.models import Model
from psycopg_pool import AsyncConnectionPool

from realtime import tokens
from realtime.conf import settings
from realtime.core.audience import Identity, digest
from realtime.models import Ticket
from realtime.worker.db import listener_conninfo, prepare_threshold, run_sync

__all__ = ["POOL_IDLE_SECONDS", "POOL_SIZE", "Verifier", "sql_path_unsupported"]

logger = logging.getLogger("realtime.auth")

MODEL_BACKEND = "django.contrib.auth.backends.ModelBackend"
SQL_SESSION_ENGINES = ("django.contrib.sessions.backends.db", "django.contrib.sessions.backends.cached_db")
# A login is one short statement: a few connections keep up with thousands per second
# (docs/scaling.md: what a burst used, and what a smaller pool costs).
POOL_SIZE = 4
# psycopg_pool closes one connection idle this long per this many seconds, down to one.
POOL_IDLE_SECONDS = 5.0


def sql_path_unsupported() -> str | None:
    """Return why logins cannot use the one-statement path here, or None when they can."""
    if django_settings.SESSION_ENGINE not in SQL_SESSION_ENGINES:
        return f"SESSION_ENGINE is {django_settings.SESSION_ENGINE!r}"
    if any(backend != MODEL_BACKEND for backend in django_settings.AUTHENTICATION_BACKENDS):
        return "AUTHENTICATION_BACKENDS has a backend other than ModelBackend"
    user_model = get_user_model()
    if not (issubclass(user_model, AbstractBaseUser) and issubclass(user_model, PermissionsMixin)):
        return f"{user_model._meta.label} does not use PermissionsMixin"
    if django_settings.DATABASE_ROUTERS:
        return "DATABASE_ROUTERS is set"
    return None


class Verifier:
    """Check tokens and re-check sessions for one worker (open it in the worker's event loop)."""

    def __init__(self, conninfo: str | None = None) -> None:
        self.unsupported = sql_path_unsupported()
        self.pool: AsyncConnectionPool | None = None
        if self.unsupported is None:
            self.pool = AsyncConnectionPool(
                conninfo or listener_conninfo(application_name="realtime-auth"),
                min_size=1,
                max_size=POOL_SIZE,
                max_idle=POOL_IDLE_SECONDS,
                kwargs={"autocommit": True, "prepare_threshold": prepare_threshold()},
                open=False,
                name="realtime-auth",
            )

    async def open(self) -> None:
        """Start connecting (without waiting: a login waits for a connection, not the worker)."""
        if self.pool is not None:
            await self.pool.open(wait=False)
            logger.info("logins: one SQL statement each on %d connection(s)", POOL_SIZE)
        else:
            logger.info("logins: through the ORM in threads (%s)", self.unsupported)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()

    async def check(self, token: str) -> tuple[Identity | None, str]:
        """Consume ``token``; return ``(identity, "")`` or ``(None, reason)`` like :func:`realtime.tokens.check`."""
        try:
            # The signature first, on the event loop: a forged token costs no database work on either path.
            user_id, nonce = tokens.open_token(token)
        except tokens.Refused as refusal:
            return None, tokens.refused(refusal)
        if self.pool is None:
            return await run_sync(tokens.check, token)
        try:
            row = await self._fetch(self._login_sql, {"nonce_hash": digest(nonce), "user_id": user_id})
            if row is None:
                raise tokens.Refused(tokens.TOKEN_UNKNOWN)
            return self._identity(row, user_id), ""
        except tokens.Refused as refusal:
            return None, tokens.refused(refusal)

    async def identity_for_session(self, session_key: str, user_id: int) -> Identity | None:
        """Like :func:`realtime.tokens.identity_for_session`: the live identity, or None."""
        if self.pool is None:
            return await run_sync(tokens.identity_for_session, session_key, user_id)
        row = await self._fetch(self._recheck_sql, {"session_key": session_key, "user_id": user_id})
        try:
            if row is None:  # the statement always returns a row; be safe anyway
                raise tokens.Refused(tokens.SESSION_ENDED)
            return self._identity(row, user_id)
        except tokens.Refused as refusal:
            tokens.refused(refusal, user_id=user_id)
            return None

    async def _fetch(self, sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
        assert self.pool is not None
        try:
            async with self.pool.connection(timeout=settings.AUTH_TIMEOUT) as conn:
                cursor = await conn.execute(sql, params)
                return await cursor.fetchone()
        except psycopg.Error as exc:
            raise DatabaseError(str(exc).strip() or type(exc).__name__) from exc

    def _identity(self, row: tuple[Any, ...], user_id: int) -> Identity:
        fresh, session_key, session_data, groups, permissions, *user_values = row
        if not fresh:
            raise tokens.Refused(tokens.TOKEN_EXPIRED)
        if session_data is None:
            raise tokens.Refused(tokens.SESSION_ENDED)
        data = self._session_store().decode(session_data)
        tokens.check_session_data(data, user_id)
        user = None
        if user_values[self._pk_index] is not None:
            values = [convert(value) for convert, value in zip(self._converters, user_values, strict=True)]
            user = self._user_model.from_db(DEFAULT_DB_ALIAS, self._user_attnames, values)
        tokens.check_user(user, data)
        return tokens.make_identity(user, session_key, groups=groups, permissions=permissions)

    # The statement, built once from the models' tables and columns.

    @cached_property
    def _user_model(self) -> type[Any]:
        return get_user_model()

    @cached_property
    def _user_fields(self) -> list[Any]:
        return list(self._user_model._meta.concrete_fields)

    @cached_property
    def _user_attnames(self) -> list[str]:
        return [f.attname for f in self._user_fields]

    @cached_property
    def _pk_index(self) -> int:
        return self._user_fields.index(self._user_model._meta.pk)

    @cached_property
    def _converters(self) -> list[Any]:
        connection = connections[DEFAULT_DB_ALIAS]

        def converter(field: Any) -> Any:
            from_db_value = getattr(field, "from_db_value", None)
            if from_db_value is None:
                return lambda value: value
            return lambda value: from_db_value(value, None, connection)

        return [converter(f) for f in self._user_fields]

    def _session_store(self) -> Any:
        return import_module(django_settings.SESSION_ENGINE).SessionStore()

    @cached_property
    def _login_sql(self) -> str:
        q = connections[DEFAULT_DB_ALIAS].ops.quote_name
        source = (
            f"DELETE FROM {q(Ticket._meta.db_table)}"
            f" WHERE {q('nonce_hash')} = %(nonce_hash)s AND {q('user_id')} = %(user_id)s"
            f" RETURNING {q('session_key')} AS session_key, {q('expires_at')} > now() AS fresh"
        )
        return self._statement(source)

    @cached_property
    def _recheck_sql(self) -> str:
        return self._statement("SELECT %(session_key)s::text AS session_key, true AS fresh")

    def _statement(self, source: str) -> str:
        """``source`` yields ``(session_key, fresh)``; the statement adds the session, user, groups, permissions."""
        q = connections[DEFAULT_DB_ALIAS].ops.quote_name
        user = self._user_model._meta
        session = cast(type[Model], self._session_store().get_model_class())._meta
        groups_field = user.get_field("groups")
        user_perms_field = user.get_field("user_permissions")
        group_perms_field = Group._meta.get_field("permissions")
        user_groups, user_perms, group_perms = (
            cast(type[Model], field.remote_field.through)._meta.db_table
            for field in (groups_field, user_perms_field, group_perms_field)
        )
        user_pk = f"u.{q(user.pk.column)}"
        ug_user, ug_group = q(groups_field.m2m_column_name()), q(groups_field.m2m_reverse_name())
        up_user, up_perm = q(user_perms_field.m2m_column_name()), q(user_perms_field.m2m_reverse_name())
        gp_group, gp_perm = q(group_perms_field.m2m_column_name()), q(group_perms_field.m2m_reverse_name())
        # Exactly ModelBackend.get_all_permissions(): every permission for a superuser,
        # else the user's own and their groups' ("app_label.codename").
        permissions = (
            f"SELECT ct.{q('app_label')} || '.' || p.{q('codename')}"
            f" FROM {q(Permission._meta.db_table)} p"
            f" JOIN {q(ContentType._meta.db_table)} ct ON ct.{q('id')} = p.{q('content_type_id')}"
            f" WHERE u.{q('is_superuser')} OR p.{q('id')} IN ("
            f"SELECT up.{up_perm} FROM {q(user_perms)} up WHERE up.{up_user} = {user_pk}"
            f" UNION SELECT gp.{gp_perm} FROM {q(group_perms)} gp"
            f" JOIN {q(user_groups)} ug ON ug.{ug_group} = gp.{gp_group} WHERE ug.{ug_user} = {user_pk})"
        )
        groups = (
            f"SELECT g.{q('name')} FROM {q(user_groups)} ug"
            f" JOIN {q(Group._meta.db_table)} g ON g.{q('id')} = ug.{ug_group} WHERE ug.{ug_user} = {user_pk}"
        )
        user_columns = ", ".join(f"u.{q(f.column)}" for f in self._user_fields)
        return (
            f"WITH source AS ({source})"
            f" SELECT source.fresh, source.session_key, s.{q('session_data')},"
            f" ARRAY({groups}), ARRAY({permissions}), {user_columns}"
            f" FROM source"
            f" LEFT JOIN {q(session.db_table)} s"
            f" ON s.{q('session_key')} = source.session_key AND s.{q('expire_date')} > now()"
            f" LEFT JOIN {q(user.db_table)} u ON {user_pk} = %(user_id)s"
        )
