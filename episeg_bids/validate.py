"""Validate a BIDS dataset with the official validator (PyPI ``bids-validator-deno``).

Mean EPI volumes stored as 3D ``_bold`` files (ds005143's ``rec-MoCoMean_bold``) are reported by
the validator as ``BOLD_NOT_4D``. That finding is expected for the inputs this app exists for, so
it never fails validation; every other error does.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import EpisegError, ValidationFailed

log = logging.getLogger("episeg_bids")

#: Validator error codes that do not fail validation, with the reason shown to the user.
EXPECTED_CODES = {"BOLD_NOT_4D": "3D mean EPI volumes stored as _bold (as in ds005143) are supported"}


@dataclass(frozen=True)
class Finding:
    """One validator issue: code, severity, file (dataset-relative, may be empty), message."""

    code: str
    severity: str
    location: str
    message: str

    def line(self) -> str:
        where = f" {self.location}" if self.location else ""
        return f"{self.code}{where}: {self.message}".strip()


def validator_executable() -> str:
    """Path of ``bids-validator-deno`` (next to the running Python first, then on PATH).

    Raises
    ------
    EpisegError
        If it is not installed.
    """
    beside = Path(sys.executable).parent / "bids-validator-deno"
    if beside.is_file():
        return str(beside)
    found = shutil.which("bids-validator-deno")
    if not found:
        raise EpisegError(
            "bids-validator-deno is not installed; install it (pip install bids-validator-deno) "
            "or pass --skip-bids-validation"
        )
    return found


def run_validator(dataset: Path, *, timeout_s: float = 3600) -> list[Finding]:
    """Every issue the validator reports for ``dataset`` (errors and warnings)."""
    command = [validator_executable(), str(dataset), "--format", "json", "--no-color"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise EpisegError(f"bids-validator-deno took more than {timeout_s:.0f} s on {dataset}; "
                          "use --skip-bids-validation") from err
    try:
        report = json.loads(done.stdout)
    except ValueError as err:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EpisegError(f"bids-validator-deno failed on {dataset}: {tail[0]}") from err
    findings = []
    for issue in report.get("issues", {}).get("issues", []):
        message = issue.get("issueMessage") or issue.get("subCode") or ""
        findings.append(Finding(
            code=issue.get("code", "UNKNOWN"),
            severity=issue.get("severity", "error"),
            location=issue.get("location") or "",
            message=" ".join(str(message).split())[:200],
        ))
    return findings


def blocking_errors(findings: list[Finding]) -> list[Finding]:
    """The errors that fail validation: severity ``error`` and not in :data:`EXPECTED_CODES`."""
    return [f for f in findings if f.severity == "error" and f.code not in EXPECTED_CODES]


def check_dataset(bids_dir: Path) -> None:
    """Validate ``bids_dir``: log the accepted findings, raise on any other error.

    Raises
    ------
    ValidationFailed
        With the first error in the message (exit code 16).
    """
    findings = run_validator(bids_dir)
    for code, reason in EXPECTED_CODES.items():
        n = sum(f.code == code for f in findings)
        if n:
            log.info("validator: %d x %s accepted (%s)", n, code, reason)
    errors = blocking_errors(findings)
    for finding in errors:
        log.error("validator: %s", _one_line(finding.line()))
    if errors:
        raise ValidationFailed(
            f"{bids_dir} failed BIDS validation with {len(errors)} error(s), first: {_one_line(errors[0].line())}; "
            "fix the dataset or pass --skip-bids-validation")
    log.info("validator: %s is valid BIDS (%d warning(s))", bids_dir, sum(f.severity == "warning" for f in findings))


def _one_line(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
