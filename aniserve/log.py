"""Progress and notices: library code logs to the ``aniserve`` logger and prints nothing.
Unconfigured (as a library), only warnings reach stderr, through Python's last-resort
handler; the command line, and anyone who wants the progress lines, call
``to_stderr()``."""

from __future__ import annotations

import logging
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners and click's runner
    swap it), not the stream there was when the handler was made."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def to_stderr(prefix: str = "", level: int = logging.INFO) -> None:
    """Show aniserve's messages from ``level`` up on stderr, one line each, after
    ``prefix``; calling it again replaces the earlier setting."""
    logger = logging.getLogger("aniserve")
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(prefix.replace("%", "%%") + "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
