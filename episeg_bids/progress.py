"""Progress over runs: a bar on a terminal, plain log lines otherwise (batch jobs, CI)."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

log = logging.getLogger("episeg_bids")


class Progress:
    """Report ``total`` steps; :meth:`step` after each finished run.

    On a TTY a single line is redrawn (``[#####-----] 3/10 12 s sub-01_task-rest_bold done``);
    elsewhere each step is an INFO log line.
    """

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30):
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.width = width
        self.start = time.monotonic()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def step(self, name: str, status: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.start
        if self.tty:
            filled = int(self.width * self.done / max(self.total, 1))
            bar = "#" * filled + "-" * (self.width - filled)
            end = "\n" if self.done == self.total else ""
            self.stream.write(f"\r[{bar}] {self.done}/{self.total} {elapsed:4.0f} s {name} {status}\033[K{end}")
            self.stream.flush()
        else:
            log.info("[%d/%d] %s %s (%.0f s)", self.done, self.total, name, status, elapsed)
