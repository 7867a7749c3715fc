"""Logging a user can turn on: `ftplan -v` (info), `-vv` or `FTPLAN_LOG=debug` (debug), `-q` (errors only).

Only the `ftplan` logger tree gets a handler (provider requests and retries, SSH reconnects, the
launcher's phases); third-party libraries stay quiet unless FTPLAN_LOG_ALL=1. Every record passes
through `ScrubFilter`, so an API key that reached a message or a traceback is printed as `***`.
"""

from __future__ import annotations

import logging
import os
import sys

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}
_HANDLER_NAME = "ftplan-cli"


class ScrubFilter(logging.Filter):
    """Replace the record's message (and traceback text) with its scrubbed form, once, before formatting."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ftplan.providers.errors import scrub

        record.msg = scrub(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def level_from(verbose: int = 0, quiet: bool = False, env: str | None = None) -> int:
    """Flags win over FTPLAN_LOG; the default shows warnings."""
    if quiet:
        return logging.ERROR
    if verbose:
        return logging.INFO if verbose == 1 else logging.DEBUG
    value = (env if env is not None else os.environ.get("FTPLAN_LOG", "")).strip().lower()
    if not value:
        return logging.WARNING
    if value in _LEVELS:
        return _LEVELS[value]
    from ftplan.planner.errors import UserError

    raise UserError(f"FTPLAN_LOG={value!r} is not a log level; use debug, info, warning or error")


def configure_logging(verbose: int = 0, quiet: bool = False, stream=None) -> int:
    """Attach one stderr handler to the `ftplan` logger (idempotent) and set its level; return the level."""
    level = level_from(verbose, quiet)
    target = logging.getLogger() if os.environ.get("FTPLAN_LOG_ALL") else logging.getLogger("ftplan")
    for h in list(target.handlers):
        if h.get_name() == _HANDLER_NAME:
            target.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(ScrubFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    target.addHandler(handler)
    target.setLevel(level)
    logging.getLogger("ftplan").setLevel(level)
    return level
