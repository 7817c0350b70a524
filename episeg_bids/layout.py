"""Find the functional runs and mean EPI volumes of a BIDS dataset.

Two named queries select the inputs (``bids_filters.json`` in the package, the defaults):

``bold``
    4D ``_bold`` runs (their temporal mean is segmented);
``mean``
    3D ``_bold`` volumes, e.g. ds005143's ``rec-MoCoMean_bold`` (segmented as they are).

A user's ``--bids-filter-file`` is merged into them as fMRIPrep does: ``{"bold": {"task": "rest"}}``
overrides or adds entities of the ``bold`` query; ``null`` means "entity absent", ``"*"`` "any
value", a list "any of these". Entities are named as in pybids (``session``, ``reconstruction``)
or by their BIDS keys (``ses``, ``rec``). Queries of other apps (``t1w``, ``fmap``, ... in a filter
file shared with fMRIPrep or BABS) are ignored with a warning.

How discovery works (:func:`discover`):

1. **Scan** only where BIDS puts functional data, relative to the dataset root:
   ``sub-<label>/[ses-<label>/]func/`` for NIfTI files whose name contains ``bold``, and the
   ``*_bold.json`` sidecars there and at the session, subject and root level. Symbolic links to
   files are followed (git-annex and DataLad datasets are made of them; a link to missing content
   is reported). A linked dataset root, or a linked ``sub-*``, ``ses-*`` or ``func`` folder, is
   followed too, because these levels are fixed; nothing below ``func`` is ever entered, so a link
   loop (``func/loop -> ..``) cannot multiply runs. Hidden files are skipped.
2. **Names**: entities are parsed from the path *relative to the root* with pybids' entity table
   (pybids 0.22 matches its patterns on the absolute path, so a dataset under ``/scratch/perf/`` or
   ``/data/sub-01/`` gets wrong entities there). A name that is not ``sub-<label>[_<key>-<label>]...
   _bold.nii[.gz]``, with known keys, labels of letters and digits, and folders that agree with it
   gives an ``'invalid'`` run with a one-line ``problem``.
3. **Index**: each file's header facts (shape, kind) and each sidecar's content are kept in
   ``WORK/discovery/<dataset>/index-<selection>.json``, with the size, mtime, ctime and inode they
   were read at; only files whose values changed are read again (every file with ``refresh``), and
   files modified within :data:`RACY_NS` of their reading. One index per set of participants
   (sessions, tasks and filters are applied afterwards, so they share it). The key of the index
   covers every file scanned (images and sidecars, inherited ones included), the dataset, the
   participants and the code that made the facts. The index is written under a temporary name and
   renamed, under an ``fcntl.flock`` lock: concurrent jobs wait for it or reuse it, a killed job
   leaves the previous index (whose key no longer matches) or none.
4. **Select**: filters and labels, then metadata by the BIDS inheritance principle (root → subject
   → session → ``func``, fewer entities first, later keys override earlier ones).

pybids' indexer (``BIDSLayout``) is not used: it takes entities from the absolute path, follows
folder link loops, stops at the first sidecar that is not JSON, and indexes 4-10 times slower than
a cold discovery here (``benchmarks/bench_discovery.py``). On the warm path neither pybids nor
nibabel is imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from . import __version__
from .errors import EpisegError, InputImageError, OutputError, UsageError

log = logging.getLogger(__name__)

QUERY_NAMES = ("bold", "mean")

#: Version of the index file layout; an index of another version is never read.
INDEX_FORMAT = 1

#: A file modified less than this before it was read may change again within the same timestamp
#: tick (coarse clocks, 1-2 s on some network file systems) without changing its signature: its
#: facts are read again next time ("racy" files, as git calls them).
RACY_NS = 2_000_000_000

#: A BIDS label or suffix: letters and digits only.
LABEL = re.compile(r"[a-zA-Z0-9]+")

#: Entities that are not key-label pairs and the only values episeg-bids can use.
FIXED_VALUES = {"datatype": ("func",), "suffix": ("bold",), "extension": (".nii", ".nii.gz")}


@dataclass(frozen=True)
class Run:
    """One input image selected for segmentation.

    Attributes
    ----------
    path : Path
        Absolute path of the NIfTI file, under the dataset root as it was given.
    relpath : str
        Path relative to the BIDS root, POSIX separators (used for ``bids:raw:`` URIs).
    entities : dict of str to str
        pybids entity names to labels (``subject``, ``session``, ``task``, ``run``: ``'01'``, ...,
        ``datatype``, ``suffix``, ``extension``). For an ``'invalid'`` run whose name cannot be
        parsed, only the labels of its valid ``sub-``/``ses-`` folders.
    kind : {'run', 'mean', 'invalid'}
        4D run, 3D mean EPI, or an input that cannot be segmented (see ``problem``).
    shape : tuple of int
        Shape from the NIfTI header (empty when unread or unreadable).
    metadata : dict
        The sidecar metadata with BIDS inheritance (``RepetitionTime``, ``TaskName``, ...); shared
        with other runs, treat it as read-only.
    problem : str or None
        Why an ``'invalid'`` input cannot be used: one line naming the file and what to do.
    """

    path: Path
    relpath: str
    entities: dict[str, Any]
    kind: str
    shape: tuple[int, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    @property
    def subject(self) -> str:
        """Subject label, ``''`` for an invalid input in a folder that is not ``sub-<label>``."""
        return str(self.entities.get("subject", ""))

    @property
    def name(self) -> str:
        """File name without extension, e.g. ``sub-01_task-rest_bold``."""
        return re.sub(r"\.nii(\.gz)?$", "", self.path.name)


@dataclass(frozen=True)
class Discovery:
    """What :func:`discover` found.

    Attributes
    ----------
    runs : list of Run
        Every selected input, invalid ones included, sorted by ``relpath``.
    missing_subjects : list of str
        Requested participant labels without a ``sub-<label>`` folder.
    database : Path
        The index file used (``WORK/discovery/<dataset>/index-<selection>.json``).
    reused : bool
        True when the index was reused as it was (nothing read again).
    """

    runs: list[Run]
    missing_subjects: list[str]
    database: Path
    reused: bool


def strip_prefix(labels: Iterable[str] | None, prefix: str) -> list[str] | None:
    """Labels without their BIDS prefix: ``['sub-01', '02']`` → ``['01', '02']``."""
    if not labels:
        return None
    return [label[len(prefix):] if label.startswith(prefix) else label for label in labels]


# --- entities and filters ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Entity:
    name: str           # pybids name, e.g. 'reconstruction'
    key: str            # BIDS key in file names, e.g. 'rec'
    value: re.Pattern   # pybids' pattern of the label

    @property
    def numeric(self) -> bool:
        """Index entities (``run``, ``echo``...) compare as integers: ``run-1`` is ``run-01``."""
        return self.value.pattern in (r"\d+", "[0-9]+")


@lru_cache(maxsize=1)
def _entity_table() -> dict[str, _Entity]:
    """pybids' key-label entities of raw BIDS names, by BIDS key, read from its ``bids.json``
    configuration (without importing pybids, which is slow to import)."""
    spec = importlib.util.find_spec("bids")
    locations = list(spec.submodule_search_locations or []) if spec else []
    config = Path(locations[0]) / "layout" / "config" / "bids.json" if locations else None
    if config is None or not config.is_file():
        raise EpisegError("pybids' entity table (bids/layout/config/bids.json) is missing; reinstall pybids")
    table = {}
    for entry in json.loads(config.read_text())["entities"]:
        match = re.fullmatch(r".*\]\+([a-z]+)-\((.+)\)", entry.get("pattern", ""))
        if match:
            table[match.group(1)] = _Entity(entry["name"], match.group(1), re.compile(match.group(2)))
    return table


@lru_cache(maxsize=1)
def _entities_by_name() -> dict[str, _Entity]:
    return {entity.name: entity for entity in _entity_table().values()}


def _valid_label(entity: _Entity, value: str) -> bool:
    return bool(LABEL.fullmatch(value) and entity.value.fullmatch(value))


def _label_form(entity: _Entity) -> str:
    """How a label of ``entity`` looks, for messages: 'a number', 'one of mag, phase...'."""
    if entity.numeric:
        return "a number"
    if "|" in entity.value.pattern:
        return "one of " + entity.value.pattern.replace("|", ", ")
    return "a label of letters and digits"


def _allowed(name: str) -> str:
    """What a filter may give for entity ``name``, for error messages."""
    if name in FIXED_VALUES:
        return " or ".join(map(repr, FIXED_VALUES[name])) + ' or "*" (episeg-bids reads nothing else)'
    return f'{_label_form(_entities_by_name()[name])}, null (entity absent), "*" (any value), or a list of these'


def _filter_name(source: str, query: str, key: Any) -> str:
    """The pybids name of filter key ``key`` (a pybids name or a BIDS key)."""
    names = _entities_by_name()
    if key in names or key in FIXED_VALUES:
        return key
    if key in _entity_table():
        return _entity_table()[key].name
    raise UsageError(
        f"{source}: query {query!r}: unknown entity {key!r}; use a pybids entity name "
        f"({', '.join([*names, *FIXED_VALUES])}) or a BIDS key ({', '.join(_entity_table())})")


def _filter_value(source: str, query: str, name: str, value: Any) -> Any:
    """One filter value checked (see :func:`_allowed`); an integer index becomes its string."""
    if value == "*" or (value is None and name not in FIXED_VALUES):
        return value
    numeric = name in _entities_by_name() and _entities_by_name()[name].numeric
    if numeric and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if isinstance(value, str):
        entity = _entities_by_name().get(name)
        if value in FIXED_VALUES.get(name, ()) or (entity is not None and _valid_label(entity, value)):
            return value
    raise UsageError(f"{source}: query {query!r}, entity {name!r}: value {json.dumps(value)} is not "
                     f"allowed; use {_allowed(name)}")


def _checked_query(source: str, query: str, raw: dict[str, Any]) -> dict[str, Any]:
    """A query with pybids entity names and checked values.

    Raises
    ------
    UsageError
        For an unknown entity, an entity given twice, or a value of the wrong type or form.
    """
    checked: dict[str, Any] = {}
    for key, value in raw.items():
        name = _filter_name(source, query, key)
        if name in checked:
            raise UsageError(f"{source}: query {query!r} gives entity {name!r} twice (as {name!r} and "
                             f"by its BIDS key); keep one")
        if isinstance(value, list):
            if not value:
                raise UsageError(f"{source}: query {query!r}, entity {name!r}: an empty list selects "
                                 f"nothing; use {_allowed(name)}")
            checked[name] = [_filter_value(source, query, name, v) for v in value]
        else:
            checked[name] = _filter_value(source, query, name, value)
    return checked


def default_filters() -> dict[str, dict[str, Any]]:
    """The default queries, from the package's ``bids_filters.json``."""
    raw = json.loads(resources.files("episeg_bids").joinpath("bids_filters.json").read_text())
    return {name: _checked_query("bids_filters.json", name, raw[name]) for name in QUERY_NAMES}


def load_filters(path: Path | None) -> dict[str, dict[str, Any]]:
    """Default queries with a user's filter file merged into them.

    Returns
    -------
    dict
        ``{'bold': {...}, 'mean': {...}}`` with pybids entity names (BIDS keys translated).

    Raises
    ------
    UsageError
        If the file is not JSON, not an object of objects, or a ``bold``/``mean`` query names an
        unknown entity or gives a value that is not a label, ``null``, ``"*"`` or a list of these.
        Queries other than ``bold`` and ``mean`` (a filter file shared with fMRIPrep or BABS) are
        ignored with a warning.
    """
    filters = default_filters()
    if path is None:
        return filters
    source = f"--bids-filter-file {path}"
    try:
        user = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{source}: cannot read JSON ({err})") from err
    if not isinstance(user, dict) or not all(isinstance(v, dict) for v in user.values()):
        raise UsageError(f"{source}: expected {{\"bold\": {{...}}, \"mean\": {{...}}}}")
    unknown = sorted(set(user) - set(QUERY_NAMES))
    if unknown:  # shared filter files (BABS, fMRIPrep) also hold anat/fmap queries: ignore them
        log.warning("%s: ignoring queries %s (episeg-bids uses %s)", source,
                    ", ".join(map(repr, unknown)), ", ".join(map(repr, QUERY_NAMES)))
    for name in QUERY_NAMES:
        filters[name].update(_checked_query(source, name, user.get(name, {})))
    return filters


def _same(name: str, have: str, wanted: str) -> bool:
    if have == wanted:
        return True
    entity = _entities_by_name().get(name)
    return bool(entity and entity.numeric and have.isdigit() and wanted.isdigit() and int(have) == int(wanted))


def _value_matches(name: str, have: str | None, wanted: Any) -> bool:
    if isinstance(wanted, list):
        return any(_value_matches(name, have, w) for w in wanted)
    if wanted is None or have is None:
        return wanted is None and have is None
    return wanted == "*" or _same(name, have, wanted)


def _matches(entities: dict[str, str], query: dict[str, Any], unsure: frozenset[str] = frozenset()) -> bool:
    """True when ``entities`` satisfy every entry of ``query``; entities in ``unsure`` (unparsable
    in an invalid name) are not held against the file."""
    return all(name in unsure or _value_matches(name, entities.get(name), wanted)
               for name, wanted in query.items())


# --- file names ------------------------------------------------------------------------------

class _NotBids(ValueError):
    """A file or folder name that BIDS naming cannot parse; the message says why."""


def _one_line(text: str) -> str:
    """``text`` with control characters (a newline in a file name...) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _split_extension(name: str) -> tuple[str, str]:
    for extension in (".nii.gz", ".nii", ".json"):
        if name.endswith(extension):
            return name[:-len(extension)], extension
    raise _NotBids("its extension is not .nii, .nii.gz or .json")


def bids_entities(name: str, *, subject_first: bool = True) -> dict[str, str]:
    """Entities of a BIDS file name, by pybids name, with ``suffix`` and ``extension``.

    Raises
    ------
    ValueError
        When the name is not ``[sub-<label>_]<key>-<label>_..._<suffix><extension>`` with known
        keys, each once, and labels of letters and digits that fit pybids' patterns.

    Examples
    --------
    >>> bids_entities('sub-01_ses-2_task-rest_run-01_bold.nii.gz')
    {'subject': '01', 'session': '2', 'task': 'rest', 'run': '01', 'suffix': 'bold', 'extension': '.nii.gz'}
    """
    stem, extension = _split_extension(name)
    *pairs, suffix = stem.split("_")
    entities: dict[str, str] = {}
    for token in pairs:
        key, dash, label = token.partition("-")
        entity = _entity_table().get(key)
        if not dash or entity is None:
            raise _NotBids(f"{token!r} is not a BIDS entity (key-label with a known key)")
        if not _valid_label(entity, label):
            raise _NotBids(f"{token!r}: {key} takes {_label_form(entity)}")
        if entity.name in entities:
            raise _NotBids(f"the entity {key}- appears twice")
        entities[entity.name] = label
    if not LABEL.fullmatch(suffix):
        raise _NotBids(f"the suffix {suffix!r} is not letters and digits")
    if subject_first and not stem.startswith("sub-"):
        raise _NotBids("it does not start with sub-<label>")
    return {**entities, "suffix": suffix, "extension": extension}


def _folder_labels(parts: list[str]) -> dict[str, str]:
    """Valid ``sub-``/``ses-`` labels of a scanned path's folders (``parts`` of its relpath)."""
    labels = {"subject": parts[0][4:]}
    if len(parts) == 4:
        labels["session"] = parts[1][4:]
    return {k: v for k, v in labels.items() if LABEL.fullmatch(v)}


def _image_entities(parts: list[str]) -> dict[str, str]:
    """Entities of an image at ``sub-*/[ses-*/]func/<name>``, checked against its folders.

    Raises
    ------
    _NotBids
        Naming the folder or the part of the name that is wrong.
    """
    for folder in parts[:-2]:
        if not LABEL.fullmatch(folder[4:]):
            raise _NotBids(f"the folder {folder!r} is not {folder[:3]}-<label> with a label of letters and "
                           "digits; rename it")
    name = parts[-1]
    try:
        entities = bids_entities(name)
    except _NotBids as err:
        raise _NotBids(f"not a BIDS name: {err}; rename the file (labels are letters and digits only) "
                       "or move it out of the dataset") from None
    labels = _folder_labels(parts)
    for entity, key in (("subject", "sub"), ("session", "ses")):
        named, folder = entities.get(entity), labels.get(entity)
        if named != folder:
            raise _NotBids(f"the name has {f'{key}-{named}' if named else f'no {key}-'} but the folder is "
                           f"{f'{key}-{folder}' if folder else f'not a {key}- folder'}; rename or move the file")
    if entities["suffix"] != "bold" and entities["suffix"].lower() == "bold":
        raise _NotBids(f"the suffix must be lower-case bold, not {entities['suffix']}; rename the file")
    return {**entities, "datatype": "func"}


def _loose_entities(parts: list[str]) -> tuple[dict[str, str], frozenset[str]]:
    """Best guess at the entities of a name that is not valid BIDS, for filtering only: the valid
    labels, and the entities the name leaves in doubt (unparsable tokens put every absent one in
    doubt)."""
    entities = {"datatype": "func", **_folder_labels(parts)}
    unsure: set[str] = set()
    name = parts[-1]
    stem = re.sub(r"\.nii(\.gz)?$", "", name)
    entities["extension"] = name[len(stem):]
    *pairs, suffix = stem.split("_")
    garbage = False
    for token in pairs:
        key, dash, label = token.partition("-")
        entity = _entity_table().get(key)
        if not dash or entity is None:
            garbage = True
        elif not _valid_label(entity, label):
            unsure.add(entity.name)
        elif entity.name not in entities:  # folders' labels first
            entities[entity.name] = label
    if LABEL.fullmatch(suffix) and (suffix == "bold" or suffix.lower() != "bold"):
        entities["suffix"] = suffix
    else:  # garbled, or a _BOLD that was meant to be _bold
        unsure.add("suffix")
    if garbage:
        unsure |= {e.name for e in _entity_table().values()} - set(entities)
    return entities, frozenset(unsure)


# --- scanning the dataset --------------------------------------------------------------------

@dataclass
class _Inventory:
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


def _listing(root: Path, rel: str, inventory: _Inventory) -> list[os.DirEntry]:
    """Entries of folder ``rel`` (not hidden); a folder that cannot be listed is recorded."""
    try:
        with os.scandir(f"{root}/{rel}") as entries:
            return [e for e in entries if not e.name.startswith(".")]
    except OSError as err:
        inventory.folders[rel] = (f"{_one_line(rel)}: the folder cannot be listed ({err.strerror}); "
                                  "make it readable or move it out of the dataset")
        return []


def _add_files(entries: list[os.DirEntry], rel: str, inventory: _Inventory, *, images: bool) -> None:
    for entry in entries:
        table = (inventory.images if images and _is_image_name(entry.name)
                 else inventory.sidecars if _is_sidecar_name(entry.name) else None)
        if table is not None:
            signature = _signature(entry)
            if signature is not None:
                table[f"{rel}/{entry.name}" if rel else entry.name] = signature


def _scan_folder(root: Path, rel: str, inventory: _Inventory, *, sessions: bool) -> None:
    """A ``sub-*`` (``sessions=True``) or ``ses-*`` folder: its sidecars, ``func`` and sessions."""
    entries = _listing(root, rel, inventory)
    _add_files(entries, rel, inventory, images=False)
    for entry in entries:
        if entry.name == "func" and _is_dir(entry):
            _add_files(_listing(root, f"{rel}/func", inventory), f"{rel}/func", inventory, images=True)
        elif sessions and entry.name.startswith("ses-") and _is_dir(entry):
            _scan_folder(root, f"{rel}/{entry.name}", inventory, sessions=False)


def _scan(root: Path, subjects: list[str] | None) -> _Inventory:
    """The images and sidecars of the selected subjects (all when ``None``) and the root sidecars.

    Raises
    ------
    EpisegError
        If the dataset folder cannot be listed.
    """
    inventory = _Inventory()
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
    """Changes when the code that makes the cached facts changes (this module, ``epi.py``)."""
    digest = hashlib.sha256(__version__.encode())
    for module in ("layout.py", "epi.py"):
        digest.update(Path(__file__).with_name(module).read_bytes())
    return digest.hexdigest()[:16]


def _index_key(root_real: str, subjects: list[str] | None, inventory: _Inventory) -> str:
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


def _build_index(root: Path, key: str, inventory: _Inventory, previous: dict[str, Any] | None) -> dict[str, Any]:
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


def _current_index(root: Path, path: Path, key: str, inventory: _Inventory, refresh: bool) -> tuple[dict, bool]:
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


# --- runs from the index ---------------------------------------------------------------------

def _sidecars_by_folder(sidecars: dict[str, list[Any]]) -> dict[str, list[tuple[dict[str, str], str, list[Any]]]]:
    """Folder relpath → ``(entities, relpath, [signature, content, problem])`` of each sidecar
    with a BIDS name, fewer entities first (inherited order within a folder)."""
    folders: dict[str, list] = {}
    for rel, facts in sidecars.items():
        folder, _, name = rel.rpartition("/")
        try:
            entities = bids_entities(name, subject_first=False)
        except _NotBids as err:
            log.debug("%s ignored: %s", _one_line(rel), err)
            continue
        if entities["suffix"] == "bold":
            del entities["suffix"], entities["extension"]
            folders.setdefault(folder, []).append((entities, rel, facts))
    for items in folders.values():
        items.sort(key=lambda item: (len(item[0]), item[1]))
    return folders


def _metadata(parts: list[str], entities: dict[str, str], sidecars: dict) -> tuple[dict[str, Any], str | None]:
    """Metadata of an image by inheritance, and the problem of the first broken sidecar."""
    chain = ["", parts[0]] + (["/".join(parts[:2])] if len(parts) == 4 else []) + ["/".join(parts[:-1])]
    merged: dict[str, Any] = {}
    for folder in chain:
        for side_entities, _rel, (_sig, content, problem) in sidecars.get(folder, ()):
            if all(k in entities and _same(k, entities[k], v) for k, v in side_entities.items()):
                if problem:
                    return merged, problem
                merged.update(content)
    return merged, None


def _selected_queries(entities: dict[str, str], filters: dict, restrict: dict, unsure=frozenset()) -> set[str]:
    if not _matches(entities, restrict, unsure):
        return set()
    return {name for name in QUERY_NAMES if _matches(entities, filters[name], unsure)}


def _invalid(root: Path, rel: str, entities: dict[str, str], problem: str, **facts: Any) -> Run:
    return Run(path=root / rel, relpath=rel, entities=entities, kind="invalid", problem=_one_line(problem), **facts)


def _image_run(root: Path, rel: str, facts: list[Any], sidecars: dict, filters: dict, restrict: dict,
               twin: bool) -> Run | None:
    """The run of one indexed image, ``None`` when it is not selected."""
    _sig, shape, kind, problem = facts
    parts = rel.split("/")
    try:
        entities = _image_entities(parts)
    except _NotBids as err:
        loose, unsure = _loose_entities(parts)
        if not _selected_queries(loose, filters, restrict, unsure):
            return None
        return _invalid(root, rel, _folder_labels(parts), f"{rel}: {err}")
    if entities["suffix"] != "bold":
        return None
    selected = _selected_queries(entities, filters, restrict)
    if not selected or (kind is not None and {"run": "bold", "mean": "mean"}[kind] not in selected):
        return None
    if twin:
        problem = (f"{rel}: the same run exists as .nii and .nii.gz; keep one (their outputs would have "
                   "the same names)")
    metadata, sidecar_problem = _metadata(parts, entities, sidecars)
    problem = problem or sidecar_problem
    if problem:
        return _invalid(root, rel, entities, problem, shape=tuple(shape), metadata=metadata)
    return Run(path=root / rel, relpath=rel, entities=entities, kind=kind, shape=tuple(shape), metadata=metadata)


def _runs(root: Path, index: dict[str, Any], folders: dict[str, str], filters: dict, restrict: dict) -> list[Run]:
    """Every selected input of the index, sorted by relpath."""
    sidecars = _sidecars_by_folder(index["sidecars"])
    stems = Counter(re.sub(r"\.nii(\.gz)?$", "", rel) for rel in index["images"])
    runs = []
    for rel, facts in index["images"].items():
        run = _image_run(root, rel, facts, sidecars, filters, restrict,
                         twin=stems[re.sub(r"\.nii(\.gz)?$", "", rel)] > 1)
        if run is not None:
            runs.append(run)
    for rel, problem in folders.items():
        labels = _unlisted_folder_labels(rel)
        if "session" not in labels or _matches(labels, {k: v for k, v in restrict.items() if k == "session"}):
            runs.append(_invalid(root, rel, labels, problem))
    return sorted(runs, key=lambda run: run.relpath)


def _unlisted_folder_labels(rel: str) -> dict[str, str]:
    """Valid subject and session labels of a folder ``sub-*[/ses-*][/func]``."""
    parts = rel.split("/")
    labels = {"subject": parts[0][4:]}
    if len(parts) > 1 and parts[1].startswith("ses-"):
        labels["session"] = parts[1][4:]
    return {k: v for k, v in labels.items() if LABEL.fullmatch(v)}


def _check_labels(labels: list[str] | None, what: str) -> None:
    for label in labels or ():
        if not isinstance(label, str) or not LABEL.fullmatch(label):
            raise UsageError(f"{what} label {_one_line(repr(label))} is not a BIDS label (letters and digits "
                             f"only, without the prefix); fix the --{what}-label value")


def discover(bids_dir: Path, work_dir: Path, filters: dict[str, dict[str, Any]], *,
             subjects: list[str] | None = None, sessions: list[str] | None = None,
             tasks: list[str] | None = None, refresh: bool = False) -> Discovery:
    """Every 4D run selected by the ``bold`` query and every 3D volume selected by ``mean``.

    Deterministic for the same dataset, filters and labels. One odd input (a name BIDS cannot
    parse, a broken sidecar, an unreadable or 2D header, a link to missing content) becomes a run
    with ``kind='invalid'`` and a ``problem``, never an exception.

    Parameters
    ----------
    bids_dir : Path
        Dataset root (may be a symbolic link).
    work_dir : Path
        Where the index is kept (``discovery/`` inside); local disk, shared safely by parallel jobs.
    filters : dict
        From :func:`load_filters`.
    subjects, sessions, tasks : list of str, optional
        Labels without prefix; ``None`` means all. Only the selected subjects' folders are read.
    refresh : bool
        Read every header and sidecar again even when nothing changed (``--overwrite``).

    Returns
    -------
    Discovery

    Raises
    ------
    UsageError
        If a label is not letters and digits.
    EpisegError
        If the dataset folder cannot be listed; :class:`~episeg_bids.errors.OutputError` if the
        index cannot be written in ``work_dir``.
    """
    for labels, what in ((subjects, "participant"), (sessions, "session"), (tasks, "task")):
        _check_labels(labels, what)
    root = Path(os.path.abspath(bids_dir))
    root_real = os.path.realpath(root)
    if not os.path.isdir(root_real):
        raise EpisegError(f"{root}: the BIDS dataset folder does not exist or is not a folder; check the path")
    scope = sorted(set(subjects)) if subjects else None
    inventory = _scan(root, scope)
    path = _index_path(work_dir, root_real, scope)
    index, reused = _current_index(root, path, _index_key(root_real, scope, inventory), inventory, refresh)
    restrict = {k: list(v) for k, v in (("session", sessions), ("task", tasks)) if v}
    runs = _runs(root, index, inventory.folders, filters, restrict)
    missing = [label for label in subjects or () if label not in inventory.subjects]
    log.info("discovery: %d input(s); index %s (%s)", len(runs), path, "reused" if reused else "written")
    return Discovery(runs=runs, missing_subjects=missing, database=path, reused=reused)
