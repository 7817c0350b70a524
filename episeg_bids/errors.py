"""Expected failures of episeg-bids, one base class, each mapped to a BIDS-App exit code.

Library code raises these; only :mod:`episeg_bids.cli` turns them into exit codes (it never
calls ``sys.exit`` elsewhere). Exit codes follow the BIDS Execution specification draft:
0 success, 1 a run failed, 16 input failed BIDS validation, 17 unknown analysis level,
18 the filters selected no files, 64 usage error, 73 cannot create output.
"""


class EpisegError(Exception):
    """Base class of expected failures: bad input, missing model, bad options.

    The message is one line that names the file, what was found, what was expected and what
    to do about it.
    """

    exit_code = 1


class UsageError(EpisegError):
    """Command-line options that cannot work together, or a malformed filter file."""

    exit_code = 64


class ValidationFailed(EpisegError):
    """The input dataset failed BIDS validation."""

    exit_code = 16


class NothingSelected(EpisegError):
    """The participant, session, task labels and filters selected no run."""

    exit_code = 18


class OutputError(EpisegError):
    """The output or work directory cannot be created or written."""

    exit_code = 73


class InputImageError(EpisegError):
    """An input image is unreadable or has a shape the pipeline cannot segment."""


class ModelError(EpisegError):
    """No usable model folder: missing, incomplete or unreadable."""

    exit_code = 1


class InstallError(EpisegError):
    """``install-model`` failed: download, checksum or unsafe archive."""
