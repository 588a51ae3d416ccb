"""Logging through the standard ``logging`` module, in the manner of ``scanpy.logging``.

Every function returns the current time, so a call can report the time since an
earlier one: ``start = logg.info("resolving genes")`` then
``logg.info("    finished", time=start)``.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timedelta

_logger = logging.getLogger("sclcm")
if not _logger.handlers:
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(message)s"))
    _logger.addHandler(_handler)
    _logger.propagate = False

HINT = 15
logging.addLevelName(HINT, "HINT")


def _log(level: int, msg: str, *, time: datetime | None = None) -> datetime:
    now = datetime.now()
    if time is not None:
        elapsed = timedelta(seconds=round((now - time).total_seconds()))
        msg = f"{msg} ({elapsed})"
    _logger.log(level, msg)
    return now


def error(msg: str, *, time: datetime | None = None) -> datetime:
    return _log(logging.ERROR, msg, time=time)


def warning(msg: str, *, time: datetime | None = None) -> datetime:
    return _log(logging.WARNING, f"WARNING: {msg}", time=time)


def info(msg: str, *, time: datetime | None = None) -> datetime:
    return _log(logging.INFO, msg, time=time)


def hint(msg: str, *, time: datetime | None = None) -> datetime:
    return _log(HINT, f"--> {msg}", time=time)


def debug(msg: str, *, time: datetime | None = None) -> datetime:
    return _log(logging.DEBUG, msg, time=time)
