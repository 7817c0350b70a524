"""Files written whole or not at all, and advisory locks between processes.

Every output of episeg-bids is written under a hidden temporary name in its final folder and then
renamed (``os.replace`` is atomic on POSIX file systems), so a killed job never leaves a
half-written file under a final name. :func:`locked` serialises writers that share a folder
(parallel participant jobs, SLURM array tasks) with ``fcntl.flock``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

try:  # POSIX only; elsewhere writes stay atomic but are not serialised
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

log = logging.getLogger("episeg_bids")


def temporary_sibling(path: Path) -> Path:
    """A new hidden file next to ``path`` (``.<name>.<random><ext>``), keeping the extension so
    that nibabel picks the right format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name[:100]}.", suffix="".join(path.suffixes[-2:])[:20],
                                dir=path.parent)
    os.close(fd)
    return Path(name)


def replace(tmp: Path, path: Path) -> None:
    """Make ``tmp`` world-readable and rename it to ``path`` (atomic)."""
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    tmp = temporary_sibling(path)
    try:
        tmp.write_bytes(data)
        replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def json_text(obj: Any) -> str:
    """Stable JSON: sorted keys, 2-space indent, trailing newline, so two runs can be diffed.

    Examples
    --------
    >>> print(json_text({'b': 1, 'a': [1, 2]}), end='')
    {
      "a": [
        1,
        2
      ],
      "b": 1
    }
    """
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default, ensure_ascii=False) + "\n"


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` as stable JSON (see :func:`json_text`), atomically."""
    write_bytes_atomic(json_text(obj).encode("utf-8"), path)


def tsv_text(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows as a BIDS TSV: header line, tab-separated, ``n/a`` for missing values.

    Examples
    --------
    >>> tsv_text([{'slice': 0, 'area_mm2': None}])
    'slice\\tarea_mm2\\n0\\tn/a\\n'
    """
    buffer = io.StringIO()
    columns = columns if columns is not None else (list(rows[0]) if rows else [])
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["n/a" if row.get(c) is None else row[c] for c in columns])
    return buffer.getvalue()


def write_tsv_atomic(rows: list[dict[str, Any]], path: Path, columns: list[str] | None = None) -> None:
    """Write rows (see :func:`tsv_text`) atomically."""
    write_bytes_atomic(tsv_text(rows, columns).encode("utf-8"), path)


@contextmanager
def locked(lock_path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold an ``fcntl.flock`` lock on ``lock_path`` (created if needed) for the ``with`` block.

    The lock is released by the kernel when the process dies, so a killed job never leaves a
    stale lock behind. Where ``flock`` is unavailable (some network file systems), a warning is
    logged and the block runs unlocked.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        held = False
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                held = True
            except OSError as err:
                log.warning("cannot lock %s (%s); going on unlocked", lock_path, err)
        try:
            yield
        finally:
            if held:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
