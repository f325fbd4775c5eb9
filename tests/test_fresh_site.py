"""The wheel, installed into a new startproject site by the documented steps alone, works end to end.

The site has a custom user model with the email as username and ``cached_db``
sessions, like many real projects; it runs from a virtualenv of its own into
which only the wheel (and its declared dependencies) was installed.
"""

from __future__ import annotations

import contextlib
import http.cookiejar
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.helpers import BASE_DIR, WAIT, database_url_for_tests, free_port

pytestmark = pytest.mark.django_db(transaction=True)

USER_MODEL = """
from django.contrib.auth.models import AbstractBaseUser, BaseUserManager, PermissionsMixin
from django.db import models


class UserManager(BaseUserManager):
    def create_user(self, email, password=None, **extra):
        user = self.model(email=self.normalize_email(email), **extra)
        user.set_password(password)
        user.save(using=self._db)
        return user

    def create_superuser(self, email, password=None, **extra):
        return self.create_user(email, password, is_staff=True, is_superuser=True, **extra)


class User(AbstractBaseUser, PermissionsMixin):
    email = models.EmailField(unique=True)
    is_active = models.BooleanField(default=True)
    is_staff = models.BooleanField(default=False)

    objects = UserManager()
    USERNAME_FIELD = "email"
"""

# The documented steps (docs/package.md, docs/quickstart.md "In your own project"), and the site's own choices.
SETTINGS_TAIL = """
INSTALLED_APPS = ["realtime", *INSTALLED_APPS, "django.contrib.postgres", "accounts"]
AUTH_USER_MODEL = "accounts.User"
SESSION_ENGINE = "django.contrib.sessions.backends.cached_db"
DATABASES = {{"default": {{"ENGINE": "django.db.backends.postgresql", **{database}}}}}
REALTIME = {{"WS_PORT": {ws_port}}}
"""

SETUP_USERS = """
from django.contrib.auth.models import Group, Permission
from accounts.models import User
ada = User.objects.create_superuser("ada@example.com", "pw-ada")
bob = User.objects.create_user("bob@example.com", "pw-bob", is_staff=True)
team = Group.objects.create(name="team")
bob.groups.add(team)
bob.user_permissions.add(Permission.objects.get(codename="view_user", content_type__app_label="accounts"))
"""

PUBLISH = """
from realtime import publish
from accounts.models import User
ada, bob = User.objects.get(email="ada@example.com"), User.objects.get(email="bob@example.com")
publish("to-ada", {}, users=[ada])
publish("to-user", {"kind": "users"}, users=[bob])
publish("to-group", {"kind": "groups"}, groups=["team"])
publish("to-permission", {"kind": "permission"}, permission="accounts.view_user")
publish("to-staff", {"kind": "staff"}, staff=True)
publish("to-topic", {"kind": "topic"}, topic="news")
publish("to-everyone", {"kind": "everyone"}, everyone=True)
"""


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


@contextlib.contextmanager
def process(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):
            return
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered:\n{log.read_text()}")


class Browser:
    """Cookies and CSRF, as a browser would handle them, over urllib."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, path: str) -> tuple[int, str]:
        try:
            with self.opener.open(self.base + path, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def post_form(self, path: str, fields: dict[str, str], form_page: str | None = None) -> int:
        """Post ``fields`` to ``path`` with the CSRF token of the form on ``form_page`` (default: ``path``)."""
        _, page = self.get(form_page or path)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
        assert token, page[:2000]
        data = urllib.parse.urlencode({"csrfmiddlewaretoken": token[1], **fields}).encode()
        request = urllib.request.Request(self.base + path, data=data, headers={"Referer": self.base + path})
        with self.opener.open(request, timeout=10) as response:
            return response.status


def test_wheel_in_a_new_startproject_site(tmp_path):
    """pip install the wheel, follow the documented steps: tokens, every audience, pages, admin client, logout."""
    dist, env_dir, site = tmp_path / "dist", tmp_path / "env", tmp_path / "site"
    clean_env = {
        k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH", "VIRTUAL_ENV")
    }
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(BASE_DIR)], tmp_path, clean_env)
    (wheel,) = dist.glob("django_realtime_outbox-*.whl")
    run([sys.executable, "-m", "venv", str(env_dir)], tmp_path, clean_env)
    python = str(env_dir / "bin" / "python")
    run([python, "-m", "pip", "install", "-q", str(wheel), "psycopg[binary]"], tmp_path, clean_env)
    located = run([python, "-c", "import realtime; print(realtime.__file__)"], tmp_path, clean_env)
    assert str(env_dir) in located, "realtime must come from the wheel, not the checkout"

    site.mkdir()
    run([str(env_dir / "bin" / "django-admin"), "startproject", "freshsite", str(site)], tmp_path, clean_env)
    (site / "accounts").mkdir()
    (site / "accounts" / "__init__.py").write_text("")
    (site / "accounts" / "models.py").write_text(USER_MODEL)
    params = conninfo_to_dict(database_url_for_tests())
    dbname = f"fresh_site_{os.getpid()}"
    admin_conninfo = make_conninfo(**{**params, "application_name": "fresh-site-test"})
    with psycopg.connect(admin_conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{dbname}"')
        conn.execute(f'CREATE DATABASE "{dbname}"')
    database = {
        "NAME": dbname,
        "HOST": params.get("host", ""),
        "PORT": params.get("port", ""),
        "USER": params.get("user", ""),
    }
    ws_port, web_port = free_port(), free_port()
    settings_py = site / "freshsite" / "settings.py"
    settings_py.write_text(settings_py.read_text() + SETTINGS_TAIL.format(database=repr(database), ws_port=ws_port))
    urls_py = site / "freshsite" / "urls.py"
    urls = urls_py.read_text().replace("from django.urls import path", "from django.urls import include, path")
    for quote in "'\"":
        admin = f"path({quote}admin/{quote}"
        urls = urls.replace(admin, f"path({quote}realtime/{quote}, include({quote}realtime.urls{quote})),\n    {admin}")
    assert "realtime.urls" in urls
    urls_py.write_text(urls)
    manage = [python, "manage.py"]
    try:
        check = run([*manage, "check"], site, clean_env)
        assert "no issues" in check, check
        run([*manage, "makemigrations", "accounts", "-v0"], site, clean_env)
        run([*manage, "migrate", "-v0"], site, clean_env)
        run([*manage, "shell", "-c", SETUP_USERS], site, clean_env)
        web_log, ws_log = tmp_path / "web.log", tmp_path / "ws.log"
        with (
            process([*manage, "runserver", f"127.0.0.1:{web_port}", "--noreload"], site, clean_env, web_log) as web,
            process([*manage, "runwebsockets", f"127.0.0.1:{ws_port}"], site, clean_env, ws_log) as worker,
        ):
            base = f"http://127.0.0.1:{web_port}"
            wait_http(base + "/admin/login/", web, web_log)
            wait_http(f"http://127.0.0.1:{ws_port}/readyz", worker, ws_log)
            bob = Browser(base)
            assert bob.get("/realtime/token/")[0] == 401  # anonymous
            assert bob.post_form("/admin/login/?next=/admin/", {"username": "bob@example.com", "password": "pw-bob"})
            status, body = bob.get("/realtime/token/")
            assert status == 200, body
            answer = json.loads(body)
            assert answer["url"] == f"ws://127.0.0.1:{ws_port}/"
            status, demo = bob.get("/realtime/")
            assert status == 200 and "realtime.js" in demo
            assert bob.get("/static/realtime/realtime.js")[0] == 200
            status, admin = bob.get("/admin/")
            assert status == 200 and "realtime-toasts" in admin and "realtime.js" in admin, "admin toasts"

            with connect(answer["url"], origin=base, open_timeout=WAIT) as ws:
                ws.send(json.dumps({"type": "auth", "token": answer["token"], "last_id": None, "topics": ["news"]}))
                welcome = json.loads(ws.recv(WAIT))
                assert welcome["type"] == "welcome" and welcome["user"]["username"] == "bob@example.com"
                assert json.loads(ws.recv(WAIT)) == {"type": "subscribed", "topic": "news"}
                run([*manage, "shell", "-c", PUBLISH], site, clean_env)
                kinds = [json.loads(ws.recv(WAIT))["data"]["kind"] for _ in range(6)]
                assert kinds == ["users", "groups", "permission", "staff", "topic", "everyone"]  # not "to-ada"
                assert bob.post_form("/admin/logout/", {}, form_page="/admin/")  # the header's form
                with pytest.raises(ConnectionClosed) as closed:
                    ws.recv(WAIT)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
            assert "Traceback" not in ws_log.read_text()
    finally:
        with psycopg.connect(admin_conninfo, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                [dbname],
            )
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}"')
