"""Scan a BIDS dataset for functional images and sidecars, and keep what they hold in an index.

The two steps of discovery that touch the dataset (the queries, names and selection are in
:mod:`episeg_bids.layout`):

1. **Scan** (:func:`scan`) only where BIDS puts functional data, relative to the dataset root:
   ``sub-<label>/[ses-<label>/]func/`` for NIfTI files whose name contains ``bold``, and the
   ``*_bold.json`` sidecars there and at the session, subject and root level. Symbolic links to
   files are followed (git-annex and DataLad datasets are made of them; a link to missing content
   is reported). A linked dataset root, or a linked ``sub-*``, ``ses-*`` or ``func`` folder, is
   followed too, because these levels are fixed; nothing below ``func`` is ever entered, so a link
   loop (``func/loop -> ..``) cannot multiply runs. Hidden files are skipped.
2. **Index** (:func:`current_index`): each file's header facts (shape, kind) and each sidecar's
   content are kept in ``WORK/discovery/<dataset>/index-<selection>.json``, with the size, mtime,
   ctime and inode they were read at; only files whose values changed are read again (every file
   with ``refresh``), and files modified within :data:`RACY_NS` of their reading. One index per set
   of participants (sessions, tasks and filters are applied afterwards, so they share it). The key
   of the index covers every file scanned (images and sidecars, inherited ones included), the
   dataset, the participants and the code that made the facts. The index is written under a
   temporary name and renamed, under an ``fcntl.flock`` lock: concurrent jobs wait for it or reuse
   it, a killed job leaves the previous index (whose key no longer matches) or none.

Headers are read with nibabel (through :mod:`episeg_bids.epi`) only when a file changed, so a
warm discovery imports neither nibabel nor pybids.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import __version__
from .errors import EpisegError, InputImageError, OutputError

log = logging.getLogger(__name__)

#: Version of the index file layout; an index of another version is never read.
INDEX_FORMAT = 1

#: A file modified less than this before it was read may change again within the same timestamp
#: tick (coarse clocks, 1-2 s on some network file systems) without changing its signature: its
#: facts are read again next time ("racy" files, as git calls them).
RACY_NS = 2_000_000_000


def _one_line(text: str) -> str:
    """``text`` with control characters (a newline in a file name...) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


# --- scanning the dataset --------------------------------------------------------------------

@dataclass
class Inventory:
    """What a scan found: relpath → ``[size, mtime_ns, ctime_ns, inode]`` of each image and
    sidecar, relpath → problem of each folder that cannot be listed, and the subject labels."""

    images: dict[str, list[int]] = field(default_factory=dict)
    sidecars: dict[str, list[int]] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)
    subjects: set[str] = field(default_factory=set)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a symbolic link
    except OSError:
        return False


def _signature(entry: os.DirEntry) -> list[int] | None:
    """Size, mtime, ctime and inode of a regular file (through its link), of the link itself
    when it points nowhere; ``None`` for anything else."""
    try:
        st = entry.stat()
    except OSError:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            return None
        if not stat.S_ISLNK(st.st_mode):
            return None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _is_image_name(name: str) -> bool:
    return name.endswith((".nii", ".nii.gz")) and "bold" in name.lower()


def _is_sidecar_name(name: str) -> bool:
    return name == "bold.json" or name.endswith("_bold.json")


def _listing(root: Path, rel: str, inventory: Inventory) -> list[os.DirEntry]:
    """Entries of folder ``rel`` (not hidden); a folder that cannot be listed is recorded."""
    try:
        with os.scandir(f"{root}/{rel}") as entries:
            return [e for e in entries if not e.name.startswith(".")]
    except OSError as err:
        inventory.folders[rel] = (f"{_one_line(rel)}: the folder cannot be listed ({err.strerror}); "
                                  "make it readable or move it out of the dataset")
        return []


def _add_files(entries: list[os.DirEntry], rel: str, inventory: Inventory, *, images: bool) -> None:
    for entry in entries:
        table = (inventory.images if images and _is_image_name(entry.name)
                 else inventory.sidecars if _is_sidecar_name(entry.name) else None)
        if table is not None:
            signature = _signature(entry)
            if signature is not None:
                table[f"{rel}/{entry.name}" if rel else entry.name] = signature


def _scan_folder(root: Path, rel: str, inventory: Inventory, *, sessions: bool) -> None:
    """A ``sub-*`` (``sessions=True``) or ``ses-*`` folder: its sidecars, ``func`` and sessions."""
    entries = _listing(root, rel, inventory)
    _add_files(entries, rel, inventory, images=False)
    for entry in entries:
        if entry.name == "func" and _is_dir(entry):
            _add_files(_listing(root, f"{rel}/func", inventory), f"{rel}/func", inventory, images=True)
        elif sessions and entry.name.startswith("ses-") and _is_dir(entry):
            _scan_folder(root, f"{rel}/{entry.name}", inventory, sessions=False)


def scan(root: Path, subjects: list[str] | None) -> Inventory:
    """The images and sidecars of the selected subjects (all when ``None``) and the root sidecars.

    Parameters
    ----------
    root : Path
        Dataset root, absolute (may be a symbolic link).
    subjects : list of str or None
        Participant labels without ``sub-``; only their folders are listed. ``None``: all.

    Returns
    -------
    Inventory
        Signatures of the files found, the folders that cannot be listed, and the labels of every
        ``sub-*`` folder of the root (selected or not).

    Raises
    ------
    EpisegError
        If the dataset folder cannot be listed.
    """
    inventory = Inventory()
    try:
        with os.scandir(root) as listing:
            top = [e for e in listing if not e.name.startswith(".")]
    except OSError as err:
        raise EpisegError(f"{root}: cannot list the dataset folder ({err.strerror}); check the path "
                          "and its permissions") from err
    _add_files(top, "", inventory, images=False)
    folders = sorted(e.name for e in top if e.name.startswith("sub-") and _is_dir(e))
    inventory.subjects = {name[4:] for name in folders}
    wanted = set(f"sub-{label}" for label in subjects) if subjects else None
    for name in folders:
        if wanted is None or name in wanted:
            _scan_folder(root, name, inventory, sessions=True)
    return inventory


# --- the index: facts read from files, kept in the work directory ----------------------------

def _image_facts(path: Path) -> list[Any]:
    """``[shape, kind, problem]`` from the NIfTI header only (the data are not read)."""
    from .epi import image_kind, load_image

    if path.is_symlink() and not path.exists():
        return [[], None, (f"{_one_line(path.name)} is a symbolic link to missing content (a git-annex/"
                           "DataLad file not retrieved?); get the file (datalad get) or remove the link")]
    shape: tuple[int, ...] = ()
    try:
        image = load_image(path)
        shape = tuple(int(n) for n in image.shape)
        kind = image_kind(path, shape)
        _check_uncompressed_size(path, image, shape)
        return [list(shape), kind, None]
    except InputImageError as err:
        return [list(shape), None, _one_line(str(err))]
    except Exception as err:  # noqa: BLE001 - one odd header must not stop discovery
        return [list(shape), None, _one_line(f"{path.name}: the NIfTI header cannot be used ({type(err).__name__}: "
                                             f"{err}); check or re-export the file")]


def _check_uncompressed_size(path: Path, image, shape: tuple[int, ...]) -> None:
    """A ``.nii`` shorter than its header says is truncated (``.nii.gz`` cannot be checked
    without decompressing it)."""
    offset = getattr(image.dataobj, "offset", None)  # where the data start, from the header
    if path.name.endswith(".nii") and offset is not None:
        expected = int(offset) + image.get_data_dtype().itemsize * _product(shape)
        size = path.stat().st_size
        if size < expected:
            raise InputImageError(f"{path.name} is truncated: its header describes {expected} bytes, the "
                                  f"file has {size}; copy or export it again")


def _product(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def _sidecar_facts(path: Path, rel: str) -> list[Any]:
    """``[content, problem]`` of a JSON sidecar; the content must be an object."""
    try:
        data = json.loads(path.read_bytes())
    except OSError as err:
        return [None, _one_line(f"{rel}: the sidecar cannot be read ({err.strerror}); make it readable or remove it")]
    except json.JSONDecodeError as err:
        return [None, _one_line(f"{rel}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno}); "
                                "fix or remove the sidecar")]
    except (ValueError, RecursionError) as err:  # undecodable bytes, absurd nesting
        return [None, _one_line(f"{rel}: not valid JSON ({err}); fix or remove the sidecar")]
    if not isinstance(data, dict):
        return [None, _one_line(f"{rel}: holds a JSON {type(data).__name__} where BIDS expects an object of "
                                "metadata; fix or remove the sidecar")]
    return [data, None]


@lru_cache(maxsize=1)
def _code_fingerprint() -> str:
    """Changes when the code that makes or reads the cached facts changes (``layout.py``, this
    module, ``epi.py``)."""
    digest = hashlib.sha256(__version__.encode())
    for module in ("layout.py", "discovery_index.py", "epi.py"):
        digest.update(Path(__file__).with_name(module).read_bytes())
    return digest.hexdigest()[:16]


def _index_key(root_real: str, subjects: list[str] | None, inventory: Inventory) -> str:
    """Hash of everything the index depends on: files scanned (name, size, mtime, ctime, inode),
    folders that cannot be listed, dataset, selection, index format and code."""
    digest = hashlib.sha256(json.dumps([INDEX_FORMAT, _code_fingerprint(), root_real, subjects]).encode())
    for tag, table in (("i", inventory.images), ("s", inventory.sidecars), ("f", inventory.folders)):
        for rel in sorted(table):
            digest.update(f"{tag}\0{rel}\0{table[rel]}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _index_path(work_dir: Path, root_real: str, subjects: list[str] | None) -> Path:
    """``WORK/discovery/<dataset hash>/index-<selection>.json``.

    Raises
    ------
    OutputError
        If the folder cannot be created.
    """
    dataset = hashlib.sha256(root_real.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    folder = Path(work_dir) / "discovery" / dataset
    selection = "all" if subjects is None else hashlib.sha256("\0".join(subjects).encode()).hexdigest()[:16]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{folder}: cannot create the discovery index folder ({err.strerror}); pass -w with "
                          "a writable folder on local disk") from err
    return folder / f"index-{selection}.json"


def _read_index(path: Path) -> dict[str, Any] | None:
    """A complete index of this format, or ``None`` (absent, unreadable, other format)."""
    try:
        index = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    ok = (isinstance(index, dict) and index.get("format") == INDEX_FORMAT and isinstance(index.get("key"), str)
          and isinstance(index.get("images"), dict) and isinstance(index.get("sidecars"), dict)
          and isinstance(index.get("racy"), list)
          and all(isinstance(v, list) and len(v) == 4 for v in index["images"].values())
          and all(isinstance(v, list) and len(v) == 3 for v in index["sidecars"].values()))
    return index if ok else None


def _build_index(root: Path, key: str, inventory: Inventory, previous: dict[str, Any] | None) -> dict[str, Any]:
    """Facts of every scanned file: reused from ``previous`` where the file's signature is
    unchanged and it was not racy, read otherwise."""
    racy_after = time.time_ns() - RACY_NS
    previous = previous or {"images": {}, "sidecars": {}, "racy": []}
    started, racy, read, was_racy = time.monotonic(), [], 0, set(previous["racy"])
    tables = {}
    for table, reader in (("images", lambda rel: _image_facts(root / rel)),
                          ("sidecars", lambda rel: _sidecar_facts(root / rel, rel))):
        old, tables[table] = previous[table], {}
        for rel, signature in getattr(inventory, table).items():
            cached = old.get(rel)
            if cached is None or cached[0] != signature or rel in was_racy:
                cached, read = [signature, *reader(rel)], read + 1
            tables[table][rel] = cached
            if signature[1] > racy_after:
                racy.append(rel)
    log.info("discovery: %d of %d file(s) read in %.1f s", read, len(inventory.images) + len(inventory.sidecars),
             time.monotonic() - started)
    return {"format": INDEX_FORMAT, "key": key, "root": os.path.realpath(root), "racy": racy, **tables}


def _write_index(path: Path, index: dict[str, Any]) -> None:
    """Write under a temporary name and rename; remove temporaries of killed writers (the caller
    holds the lock, so no live writer has one)."""
    from .atomic import write_bytes_atomic

    for stale in path.parent.glob(f".{path.name}.*"):
        stale.unlink(missing_ok=True)
    write_bytes_atomic(json.dumps(index, separators=(",", ":")).encode("ascii"), path)


def _reuse_or_build(root: Path, path: Path, key: str, inventory: Inventory, refresh: bool) -> tuple[dict, bool]:
    """The index for ``key``: the one on disk when its key matches (and not ``refresh``), else
    built under the lock; a job that waited for the lock reuses what the holder wrote."""
    from .atomic import locked

    if not refresh:
        index = _read_index(path)
        if index is not None and index["key"] == key and not index["racy"]:
            return index, True
    try:
        with locked(path.with_suffix(".lock")):
            previous = _read_index(path)
            if previous is not None and previous["key"] == key and not previous["racy"] and not refresh:
                return previous, True
            index = _build_index(root, key, inventory, None if refresh else previous)
            _write_index(path, index)
    except OSError as err:  # the lock file or the index cannot be written
        raise OutputError(f"{path}: cannot write the discovery index ({err.strerror}); pass -w with a "
                          "writable folder on local disk") from err
    return index, False


def current_index(root: Path, work_dir: Path, subjects: list[str] | None, inventory: Inventory, *,
                  refresh: bool = False) -> tuple[dict[str, Any], Path, bool]:
    """The index of the files of ``inventory``: reused from ``work_dir`` when nothing changed,
    else brought up to date (only changed or racy files read again) and written.

    Parameters
    ----------
    root : Path
        Dataset root, absolute, as :func:`scan` was given it.
    work_dir : Path
        Where the index is kept (``discovery/`` inside); local disk, shared safely by parallel jobs.
    subjects : list of str or None
        The sorted participant labels :func:`scan` was given (``None``: all); one index each.
    inventory : Inventory
        From :func:`scan`.
    refresh : bool
        Read every header and sidecar again even when nothing changed.

    Returns
    -------
    index : dict
        ``images``: relpath → ``[signature, shape, kind, problem]`` (``kind`` ``'run'``,
        ``'mean'`` or None, ``problem`` None or one line); ``sidecars``: relpath →
        ``[signature, content, problem]``; also ``format``, ``key``, ``root`` and ``racy``.
    path : Path
        The index file, ``WORK/discovery/<dataset>/index-<selection>.json``.
    reused : bool
        True when the index on disk was reused as it was (nothing read again).

    Raises
    ------
    OutputError
        If the index folder cannot be created or the index cannot be written in ``work_dir``.
    """
    root_real = os.path.realpath(root)
    path = _index_path(work_dir, root_real, subjects)
    index, reused = _reuse_or_build(root, path, _index_key(root_real, subjects, inventory), inventory, refresh)
    return index, path, reused
