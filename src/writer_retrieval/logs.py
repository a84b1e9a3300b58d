"""Logging for stage scripts: to the rule's log file and to stderr; user errors without traceback."""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

from .errors import InputError

log = logging.getLogger("writer_retrieval")


@contextlib.contextmanager
def stage_logging(log_path: str | None, stage: str):
    """Send the library's log records to `log_path` and stderr for the duration of one stage.

    An InputError ends the process with exit code 1 after logging its message (no traceback:
    the message already names the file or key and the problem). Other errors propagate.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    fmt = logging.Formatter(f"%(asctime)s {stage} %(levelname)s %(message)s", "%H:%M:%S")
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)
    try:
        yield log
    except InputError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
