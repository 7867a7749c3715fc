"""Logging a user can turn on: `ftplan -v` or `FTPLAN_LOG=debug` (ftplan's own debug: every provider request
and retry, SSH reconnects, pulls), `-vv` (the libraries' too: paramiko, botocore, httpx), `-q` (errors only).

`-v` attaches a handler to the `ftplan` logger tree only, so third-party chatter stays out until `-vv` (or
FTPLAN_LOG_ALL=1) puts it on the root logger. Every record passes through `ScrubFilter`, so an API key
that reached a message or a traceback is printed as `***`.
"""

from __future__ import annotations

import logging
import os
import sys

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "warn": logging.WARNING,
           "error": logging.ERROR, "critical": logging.CRITICAL}
_HANDLER_NAME = "ftplan-cli"
_saved_root_level: dict[str, int] = {}


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
        return logging.DEBUG
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
    everything = verbose >= 2 or bool(os.environ.get("FTPLAN_LOG_ALL"))
    target = logging.getLogger() if everything else logging.getLogger("ftplan")
    for logger in (logging.getLogger(), logging.getLogger("ftplan")):
        for h in list(logger.handlers):
            if h.get_name() == _HANDLER_NAME:
                logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(ScrubFilter())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    target.addHandler(handler)
    root = logging.getLogger()
    if everything:
        _saved_root_level.setdefault("level", root.level)
    elif "level" in _saved_root_level:  # a previous -vv in this process: give the root its level back
        root.setLevel(_saved_root_level.pop("level"))
    handler.setLevel(level)
    # The handler filters; loggers are lowered only to let more through. Raising a logger's level (the
    # default WARNING) would also silence whatever else listens in this process (a host application, pytest).
    for logger in {target, logging.getLogger("ftplan")}:
        logger.setLevel(level if level < logging.WARNING else logging.NOTSET)
    return level
