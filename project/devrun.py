"""``make run``: migrate, create demo users, run Django and the websocket worker.

Both servers run as children in this process group. Ctrl-C in a terminal
reaches all of them at once, so SIGINT is not forwarded again (a second one
would cut their shutdown short); SIGTERM is forwarded. When either child
exits, the other is stopped: no orphans.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
DEMO_USERS = (("admin", "admin"), ("editor", "editor"))
DJANGO_ADDR = "127.0.0.1:8000"
WS_ADDR = "127.0.0.1:8765"


def manage(*args: str) -> list[str]:
    return [sys.executable, str(BASE_DIR / "manage.py"), *args]


def create_demo_users() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    import django

    django.setup()
    from django.contrib.auth import get_user_model

    User = get_user_model()
    for username, password in DEMO_USERS:
        if not User.objects.filter(username=username).exists():
            User.objects.create_superuser(username, f"{username}@example.com", password)
    print("Demo superusers (embedded database only):", ", ".join(f"{u} / {p}" for u, p in DEMO_USERS))


def stop_database() -> None:
    from project.database import embedded_uri, is_embedded

    if not is_embedded():
        print("DATABASE_URL is set: nothing to stop.")
        return
    embedded_uri(BASE_DIR)  # make sure pgserver has set up its user and paths
    import pgserver._commands as commands

    pgdata = Path(os.environ.get("REALTIME_PGDATA") or BASE_DIR / ".pgdata")
    user = "pgserver" if os.geteuid() == 0 else None
    commands.pg_ctl(["-w", "stop"], pgdata=pgdata, user=user)
    print("Embedded PostgreSQL stopped.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stop-database", action="store_true", help="stop the embedded PostgreSQL and exit")
    options = parser.parse_args()
    if options.stop_database:
        stop_database()
        return 0

    from project.database import is_embedded

    subprocess.run(manage("migrate", "--no-input"), check=True)
    if is_embedded():
        create_demo_users()
    children = [
        subprocess.Popen(manage("runwebsockets", WS_ADDR)),
        subprocess.Popen(manage("runserver", DJANGO_ADDR)),
    ]
    print(f"Django on http://{DJANGO_ADDR}/ , websockets on ws://{WS_ADDR}/ ; open http://{DJANGO_ADDR}/realtime/")

    def forward(signum: int, frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    interrupted_at: list[float] = []
    signal.signal(signal.SIGTERM, forward)
    # A terminal's Ctrl-C already reached the children; give them time to stop
    # before stopping them ourselves (for a SIGINT sent to this process alone).
    signal.signal(signal.SIGINT, lambda signum, frame: interrupted_at.append(time.monotonic()))
    try:
        while all(child.poll() is None for child in children):
            if interrupted_at and time.monotonic() - interrupted_at[0] > 3:
                break
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + 10
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
