"""Three stages that overlap: read item k+1 and write item k-1 while item k is computed.

A bounded producer/consumer chain for the participant level: ``prepare`` (reading, averaging)
runs in a reader thread at most one item ahead, ``compute`` (the network) in the calling thread,
``write`` (files, figures) in a writer thread at most one item behind. So at most three items are
in memory, each stage's work on one item starts only after the previous stage finished it, and
``finish`` sees the items in their input order.

Log records emitted while a stage works on an item are held back and handed to the log handlers
when the item is finished, in item order, so the log reads the same as a sequential run whatever
the timing. An exception in a stage ends that item's chain (later stages are skipped) and is
given to ``finish``; it never stops the other items.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

Item = TypeVar("Item")


@dataclass
class Work(Generic[Item]):
    """One item going through the stages.

    Attributes
    ----------
    item
        What the stages work on (e.g. a discovered input).
    state
        What the last stage returned (``prepare``'s result, then ``compute``'s).
    error
        The exception that ended the chain, if any.
    stopped
        True when a stage ended the chain on purpose (e.g. outputs already complete).
    logs
        Log records held back until the item is finished.
    """

    item: Item
    state: Any = None
    error: BaseException | None = None
    stopped: bool = False
    logs: list[logging.LogRecord] = field(default_factory=list)

    @property
    def going(self) -> bool:
        return self.error is None and not self.stopped


class Stop(Exception):
    """Raised by a stage to end an item's chain without an error; ``value`` becomes its state."""

    def __init__(self, value: Any = None):
        super().__init__("stopped")
        self.value = value


class _HeldLogs(logging.Filter):
    """A handler filter that diverts records emitted by a thread working on an item."""

    def __init__(self) -> None:
        super().__init__()
        self._local = threading.local()

    @contextmanager
    def into(self, records: list[logging.LogRecord]) -> Iterator[None]:
        self._local.records = records
        try:
            yield
        finally:
            self._local.records = None

    def filter(self, record: logging.LogRecord) -> bool:
        records = getattr(self._local, "records", None)
        if records is None:
            return True
        if not records or records[-1] is not record:   # each handler sees the same record
            records.append(record)
        return False


@contextmanager
def _holding_logs() -> Iterator[_HeldLogs]:
    held = _HeldLogs()
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(held)
    try:
        yield held
    finally:
        for handler in handlers:
            handler.removeFilter(held)


def _release(work: Work) -> None:
    """Hand the held records to the log handlers (in the calling thread, so not held again)."""
    for record in work.logs:
        logging.getLogger(record.name).handle(record)
    work.logs.clear()


def _stage(held: _HeldLogs, work: Work, step: Callable[[Any, Any], Any]) -> Work:
    """Run one stage on ``work`` unless its chain has ended, recording the result or the error."""
    if not work.going:
        return work
    with held.into(work.logs):
        try:
            work.state = step(work.item, work.state)
        except Stop as stop:
            work.state, work.stopped = stop.value, True
        except Exception as error:  # one item must never stop the others
            work.error = error
    return work


def run_overlapped(items: Sequence[Item], *, prepare: Callable[[Item, Any], Any], compute: Callable[[Item, Any], Any],
                   write: Callable[[Item, Any], Any], finish: Callable[[Work], None]) -> None:
    """Run ``prepare`` → ``compute`` → ``write`` on every item, overlapped, and ``finish`` each in order.

    Each stage is called as ``stage(item, state)`` with the previous stage's result (``None`` for
    ``prepare``) and returns the next state; raising :class:`Stop` ends the chain quietly.
    ``finish(work)`` is called in the calling thread, in item order, after the item's last stage
    (whatever its outcome) and after its held log records were released.
    """
    if not items:
        return
    with _holding_logs() as held, ThreadPoolExecutor(1, "episeg-read") as reader, \
            ThreadPoolExecutor(1, "episeg-write") as writer:
        def ahead(index: int) -> Future | None:
            return reader.submit(_stage, held, Work(items[index]), prepare) if index < len(items) else None

        next_read = ahead(0)
        behind: Future | None = None
        for index in range(len(items)):
            work = next_read.result()
            next_read = ahead(index + 1)
            _stage(held, work, compute)
            if behind is not None:
                _done(behind.result(), finish)
                behind = None
            if work.going:
                behind = writer.submit(_stage, held, work, write)
            else:
                _done(work, finish)
        if behind is not None:
            _done(behind.result(), finish)


def _done(work: Work, finish: Callable[[Work], None]) -> None:
    _release(work)
    finish(work)
