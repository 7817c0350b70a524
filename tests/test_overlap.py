"""The three overlapping stages: order, overlap, bounded look-ahead, isolation, log order."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from episeg_bids.overlap import Stop, run_overlapped

log = logging.getLogger("episeg_bids.test_overlap")


def test_stages_overlap_in_order_and_at_most_one_item_ahead():
    events: list[tuple[str, int]] = []
    in_flight, peak = set(), [0]
    lock = threading.Lock()

    def enter(kind: str, item: int) -> None:
        with lock:
            events.append((kind, item))
            in_flight.add(item)
            peak[0] = max(peak[0], len(in_flight))

    def prepare(item, _):
        enter("prepare", item)
        time.sleep(0.05)
        return item * 10

    def compute(item, state):
        enter("compute", item)
        time.sleep(0.05)
        return state + 1

    def write(item, state):
        enter("write", item)
        time.sleep(0.05)
        return state + 1

    finished = []

    def finish(work):
        in_flight.discard(work.item)
        finished.append((work.item, work.state))

    started = time.monotonic()
    run_overlapped(list(range(6)), prepare=prepare, compute=compute, write=write, finish=finish)
    elapsed = time.monotonic() - started
    assert finished == [(i, i * 10 + 2) for i in range(6)]
    assert elapsed < 6 * 3 * 0.05 * 0.8                    # the stages ran side by side
    assert peak[0] <= 3                                    # read k+1, compute k, write k-1
    for item in range(6):                                  # each item: prepare, compute, write in turn
        kinds = [kind for kind, i in events if i == item]
        assert kinds == ["prepare", "compute", "write"]


def test_a_failing_stage_ends_only_its_item_and_stop_is_quiet():
    def prepare(item, _):
        if item == 1:
            raise ValueError("bad input 1")
        if item == 2:
            raise Stop("skipped")
        return item

    def compute(item, state):
        if item == 3:
            raise RuntimeError("network failed on 3")
        return state

    outcomes = {}
    run_overlapped([0, 1, 2, 3, 4], prepare=prepare, compute=compute, write=lambda i, s: f"written {s}",
                   finish=lambda w: outcomes.__setitem__(w.item, (type(w.error).__name__ if w.error else None, w.state)))
    assert list(outcomes) == [0, 1, 2, 3, 4]
    assert outcomes[0] == (None, "written 0") and outcomes[4] == (None, "written 4")
    assert outcomes[1][0] == "ValueError" and outcomes[3][0] == "RuntimeError"
    assert outcomes[2] == (None, "skipped")


def test_log_lines_come_in_item_order_whatever_the_timing(caplog):
    def prepare(item, _):
        time.sleep(0.02 * (3 - item))      # later items are read faster
        log.warning("read %d", item)

    def compute(item, _):
        log.warning("computed %d", item)

    def write(item, _):
        time.sleep(0.03)
        log.warning("written %d", item)

    def finish(work):
        log.warning("finished %d", work.item)

    handler = logging.StreamHandler()      # the held-back records go through the root's handlers
    logging.getLogger().addHandler(handler)
    try:
        with caplog.at_level(logging.WARNING, logger="episeg_bids.test_overlap"):
            run_overlapped([0, 1, 2, 3], prepare=prepare, compute=compute, write=write, finish=finish)
    finally:
        logging.getLogger().removeHandler(handler)
    expected = [f"{what} {i}" for i in range(4) for what in ("read", "computed", "written", "finished")]
    assert [r.getMessage() for r in caplog.records] == expected


@pytest.mark.parametrize("items", [[], [7]])
def test_empty_and_single(items):
    seen = []
    run_overlapped(items, prepare=lambda i, s: i, compute=lambda i, s: s, write=lambda i, s: s,
                   finish=lambda w: seen.append(w.state))
    assert seen == items
