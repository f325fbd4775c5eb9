"""The test matrix: Python 3.11 with Django 5.2 LTS, and Python 3.12 with the newest Django 6.

``make test`` runs the first in ``.venv``; ``.ci/run`` runs ``make test`` and then
``nox -s tests-django6.1``. Each session installs the app from this checkout
(``requirements.txt`` has ``-e .``) and uses a test database of its own, so sessions can
share the embedded PostgreSQL with each other and with ``make run``.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True


@nox.session(python="3.11", name="tests-django5.2")
def tests_lts(session: nox.Session) -> None:
    """The suite on the oldest supported Python with the Django LTS (what ``make test`` runs)."""
    _tests(session, "5.2")


@nox.session(python="3.12", name="tests-django6.1")
def tests_newest(session: nox.Session) -> None:
    """The suite on the newest Django, with the oldest Python it supports."""
    _tests(session, "6.1")


def _tests(session: nox.Session, django: str) -> None:
    session.install("-r", "requirements.txt", f"Django=={django}.*")
    session.run("python", "-c", "import django, sys; print('Django', django.get_version(), 'on', sys.version)")
    database = "test_realtime_django" + django.replace(".", "")
    session.run("pytest", *session.posargs, env={"DJANGO_TEST_DB_NAME": database})
