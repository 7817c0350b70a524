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
   ``*_bold.json`` sidecars there and at the session, subject and root level
   (:func:`~episeg_bids.discovery_index.scan`; :mod:`episeg_bids.discovery_index` says how symbolic
   links, link loops and hidden files are handled).
2. **Names**: entities are parsed from the path *relative to the root* with pybids' entity table
   (pybids 0.22 matches its patterns on the absolute path, so a dataset under ``/scratch/perf/`` or
   ``/data/sub-01/`` gets wrong entities there). A name that is not ``sub-<label>[_<key>-<label>]...
   _bold.nii[.gz]``, with known keys, labels of letters and digits, and folders that agree with it
   gives an ``'invalid'`` run with a one-line ``problem``.
3. **Index**: each file's header facts (shape, kind) and each sidecar's content are kept in
   ``WORK/discovery/<dataset>/index-<selection>.json`` and read again only when the file changed
   (:func:`~episeg_bids.discovery_index.current_index`; :mod:`episeg_bids.discovery_index` says what
   the index key covers and how concurrent and killed jobs share it). One index per set of
   participants (sessions, tasks and filters are applied afterwards, so they share it).
4. **Select**: filters and labels, then metadata by the BIDS inheritance principle (root → subject
   → session → ``func``, fewer entities first, later keys override earlier ones).

pybids' indexer (``BIDSLayout``) is not used: it takes entities from the absolute path, follows
folder link loops, stops at the first sidecar that is not JSON, and indexes 4-10 times slower than
a cold discovery here (``benchmarks/bench_discovery.py``). On the warm path neither pybids nor
nibabel is imported.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from .discovery_index import _one_line, current_index, scan
from .errors import EpisegError, UsageError

log = logging.getLogger(__name__)

QUERY_NAMES = ("bold", "mean")

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
    inventory = scan(root, scope)
    index, path, reused = current_index(root, work_dir, scope, inventory, refresh=refresh)
    restrict = {k: list(v) for k, v in (("session", sessions), ("task", tasks)) if v}
    runs = _runs(root, index, inventory.folders, filters, restrict)
    missing = [label for label in subjects or () if label not in inventory.subjects]
    log.info("discovery: %d input(s); index %s (%s)", len(runs), path, "reused" if reused else "written")
    return Discovery(runs=runs, missing_subjects=missing, database=path, reused=reused)
