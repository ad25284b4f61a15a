"""gunicorn's logger, with session ids cut short: an id is a bearer secret (whoever has it can
read and extend the session), and access logs travel further than secrets should.

`/sessions/<id>` and `/sessions/<id>/fork` appear in every access line for those routes, and in
gunicorn's error lines about a request (`Error handling request /sessions/<id>`). Both of
gunicorn's loggers get a filter that keeps the first 4 characters of an id and drops the rest.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from gunicorn.glogging import Logger

# a path segment after /sessions/, and a session_id query parameter; 4 characters stay
_SESSION_ID = re.compile(r"(/sessions/[^/?#\s\"]{4}|session_id=[^&#\s\"]{4})[^/?&#\s\"]+", re.IGNORECASE)


def redact(text: str) -> str:
    """`/sessions/AbCdEfGh.../fork` -> `/sessions/AbCd.../fork`."""
    return _SESSION_ID.sub(r"\1...", text)


class _RedactSessionIds(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "session" in message.lower():
            record.msg, record.args = redact(message), None
        return True


class RedactingLogger(Logger):
    """gunicorn's Logger whose access and error lines never hold a whole session id."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for logger in (self.error_log, self.access_log):
            if not any(isinstance(f, _RedactSessionIds) for f in logger.filters):
                logger.addFilter(_RedactSessionIds())
