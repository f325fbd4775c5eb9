"""Log lines of ``runwebsockets`` reach stderr unless the site configures them, as ``runserver``'s do."""

from __future__ import annotations

import logging
import sys

__all__ = ["log_to_stderr_unless_configured"]

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def log_to_stderr_unless_configured() -> None:
    """Give the ``realtime`` logger a stderr handler at INFO if no handler would receive its records.

    A site whose ``LOGGING`` sends ``realtime`` (or the root logger) anywhere
    keeps its own configuration untouched.
    """
    logger = logging.getLogger("realtime")
    if logger.hasHandlers():
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
