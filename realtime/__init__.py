"""Live, commit-safe events from Django to browsers over websockets.

Import ``publish`` from here: ``from realtime import publish``.
"""

from typing import Any

__all__ = ["publish", "publish_many"]


def publish(*args: Any, **kwargs: Any) -> Any:
    """Publish an event in the current transaction; see ``realtime.outbox.publish``."""
    from realtime.outbox import publish as _publish

    return _publish(*args, **kwargs)


def publish_many(*args: Any, **kwargs: Any) -> Any:
    """Publish many events in one COPY; see ``realtime.outbox.publish_many``."""
    from realtime.outbox import publish_many as _publish_many

    return _publish_many(*args, **kwargs)
