import io
import logging

from episeg_bids.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_on_a_terminal():
    stream = Terminal()
    progress = Progress(2, stream=stream, width=10)
    progress.step("sub-01_task-rest_bold", "done")
    progress.step("sub-02_task-rest_bold", "FAILED")
    text = stream.getvalue()
    assert "\r[#####-----] 1/2" in text and "\r[##########] 2/2" in text and text.endswith("\n")


def test_log_lines_elsewhere(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="episeg_bids"):
        Progress(1, stream=stream).step("sub-01_task-rest_bold", "done")
    assert stream.getvalue() == "" and "[1/1] sub-01_task-rest_bold done" in caplog.text
