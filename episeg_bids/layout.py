"""Find the functional runs and mean EPI volumes of a BIDS dataset with pybids.

Two named queries select the inputs (``bids_filters.json`` in the package, the defaults):

``bold``
    4D ``_bold`` runs (their temporal mean is segmented);
``mean``
    3D ``_bold`` volumes, e.g. ds005143's ``rec-MoCoMean_bold`` (segmented as they are).

A user's ``--bids-filter-file`` is merged into them as fMRIPrep does: ``{"bold": {"task": "rest"}}``
overrides or adds entities of the ``bold`` query; ``null`` means "entity absent", ``"*"`` "any
value". Whether a file is 4D or 3D is read from its NIfTI header. The layout is built once per
work directory and kept in an SQLite database there, rebuilt when the dataset's ``func`` folders
change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from .errors import EpisegError, InputImageError, UsageError

log = logging.getLogger(__name__)

QUERY_NAMES = ("bold", "mean")

#: Folders and files the indexer skips: only sub-*/[ses-*/]func/ matters.
IGNORE = [
    "code", "derivatives", "sourcedata", "stimuli", "models", "phenotype",
    re.compile(r"^.*/(anat|dwi|fmap|perf|beh|eeg|meg|ieeg|pet|micr|nirs|motion|mrs)(/.*)?$"),
    re.compile(r"^.*_(events|physio|stim|sbref|phase)\.(tsv|tsv\.gz|json|nii|nii\.gz)$"),
    re.compile(r"(^|.*/)\.[^/]*$"),
]


@dataclass(frozen=True)
class Run:
    """One input image selected for segmentation.

    Attributes
    ----------
    path : Path
        Absolute path of the NIfTI file.
    relpath : str
        Path relative to the BIDS root, POSIX separators (used for ``bids:raw:`` URIs).
    entities : dict
        pybids entities (``subject``, ``session``, ``task``, ``run``, ...).
    kind : {'run', 'mean', 'invalid'}
        4D run, 3D mean EPI, or an image that cannot be segmented (see ``problem``).
    shape : tuple of int
        Shape from the NIfTI header (empty when unreadable).
    metadata : dict
        The sidecar metadata with BIDS inheritance (``RepetitionTime``, ``TaskName``, ...).
    problem : str or None
        Why an ``'invalid'`` image cannot be used, one line naming the file.
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
        return str(self.entities["subject"])

    @property
    def name(self) -> str:
        """File name without extension, e.g. ``sub-01_task-rest_bold``."""
        return re.sub(r"\.nii(\.gz)?$", "", self.path.name)


def strip_prefix(labels: Iterable[str] | None, prefix: str) -> list[str] | None:
    """Labels without their BIDS prefix: ``['sub-01', '02']`` → ``['01', '02']``."""
    if not labels:
        return None
    return [label[len(prefix):] if label.startswith(prefix) else label for label in labels]


def default_filters() -> dict[str, dict[str, Any]]:
    """The default queries, from the package's ``bids_filters.json``."""
    text = resources.files("episeg_bids").joinpath("bids_filters.json").read_text()
    return json.loads(text)


def load_filters(path: Path | None) -> dict[str, dict[str, Any]]:
    """Default queries with a user's filter file merged into them.

    Raises
    ------
    UsageError
        If the file is not JSON or not an object of objects. Queries other than ``bold`` and
        ``mean`` (a filter file shared with fMRIPrep or BABS) are ignored with a warning.
    """
    filters = default_filters()
    if path is None:
        return filters
    try:
        user = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"--bids-filter-file {path}: cannot read JSON ({err})") from err
    if not isinstance(user, dict) or not all(isinstance(v, dict) for v in user.values()):
        raise UsageError(f"--bids-filter-file {path}: expected {{\"bold\": {{...}}, \"mean\": {{...}}}}")
    unknown = sorted(set(user) - set(QUERY_NAMES))
    if unknown:  # shared filter files (BABS, fMRIPrep) also hold anat/fmap queries: ignore them
        log.warning("--bids-filter-file %s: ignoring queries %s (episeg-bids uses %s)", path,
                    ", ".join(map(repr, unknown)), ", ".join(map(repr, QUERY_NAMES)))
    for name in QUERY_NAMES:
        filters[name].update(user.get(name, {}))
    return filters


def to_pybids(query: dict[str, Any]) -> dict[str, Any]:
    """A filter as pybids ``get`` arguments: ``None`` → ``Query.NONE``, ``"*"`` → ``Query.ANY``
    (also inside lists)."""
    from bids.layout import Query

    def convert(value: Any) -> Any:
        if value is None:
            return Query.NONE
        if value == "*":
            return Query.ANY
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return {key: convert(value) for key, value in query.items()}


def _dataset_fingerprint(bids_dir: Path, subjects: list[str] | None) -> str:
    """Hash of the root path, the subject selection and the names and mtimes of the func folders
    indexed (cheap to compute on large datasets, changes when files are added or removed)."""
    digest = hashlib.sha256(f"{bids_dir.resolve()}|{sorted(subjects) if subjects else '*'}".encode())
    prefixes = [f"sub-{label}" for label in subjects] if subjects else ["sub-*"]
    folders = [f for prefix in prefixes for pattern in ("func", "ses-*/func") for f in bids_dir.glob(f"{prefix}/{pattern}")]
    for folder in sorted(folders):
        digest.update(f"{folder.relative_to(bids_dir)}:{folder.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def other_subjects(bids_dir: Path, subjects: list[str] | None) -> list[str]:
    """Top-level ``sub-*`` folders that are not selected (the indexer skips them)."""
    if not subjects:
        return []
    wanted = {f"sub-{label}" for label in subjects}
    return sorted(p.name for p in bids_dir.glob("sub-*") if p.is_dir() and p.name not in wanted)


def build_layout(bids_dir: Path, work_dir: Path, subjects: list[str] | None = None):
    """Index ``bids_dir`` (no validation, non-func data ignored), reusing the database in
    ``work_dir`` when the dataset has not changed.

    Parameters
    ----------
    subjects : list of str, optional
        Participant labels (no prefix): only their folders are indexed, so one job per
        participant on a large dataset (a SLURM array task) does not index every subject.

    Raises
    ------
    EpisegError
        If pybids cannot index the folder.
    """
    from bids import BIDSLayout, BIDSLayoutIndexer

    database = work_dir / "pybids_db" / _dataset_fingerprint(bids_dir, subjects)
    reuse = database.is_dir()
    try:
        layout = BIDSLayout(
            bids_dir,
            validate=False,
            database_path=database,
            reset_database=not reuse,
            indexer=BIDSLayoutIndexer(validate=False, ignore=IGNORE + other_subjects(bids_dir, subjects)),
        )
    except Exception as err:  # pybids raises ValueError, BIDSValidationError, sqlite errors
        raise EpisegError(f"{bids_dir}: pybids cannot index this dataset ({err})") from err
    log.info("%s pybids database %s", "reused" if reuse else "built", database)
    return layout


def _read_shape(path: Path) -> tuple[tuple[int, ...], str | None, str | None]:
    """``(shape, kind, problem)`` from the NIfTI header only."""
    from .epi import image_kind, load_image

    try:
        shape = tuple(int(n) for n in load_image(path).shape)
        return shape, image_kind(path, shape), None
    except InputImageError as err:
        return (), None, str(err)


def find_runs(
    layout,
    filters: dict[str, dict[str, Any]],
    *,
    subjects: list[str] | None = None,
    sessions: list[str] | None = None,
    tasks: list[str] | None = None,
) -> list[Run]:
    """Every 4D run selected by the ``bold`` query and every 3D volume selected by ``mean``.

    Files that cannot be read or are not 3D/4D are returned with ``kind='invalid'`` and a
    ``problem``, so that they are reported without stopping the others.

    Parameters
    ----------
    layout : bids.BIDSLayout
    filters : dict
        From :func:`load_filters`.
    subjects, sessions, tasks : list of str, optional
        Labels without prefix; ``None`` means all.

    Returns
    -------
    list of Run
        Sorted by relative path.
    """
    restrict: dict[str, Any] = {}
    for key, values in (("subject", subjects), ("session", sessions), ("task", tasks)):
        if values:
            restrict[key] = values
    selected: dict[str, set[str]] = {}
    files = {}
    for name in QUERY_NAMES:
        query = {**to_pybids(filters[name]), **restrict}
        for bids_file in layout.get(return_type="object", **query):
            selected.setdefault(bids_file.path, set()).add(name)
            files[bids_file.path] = bids_file
    runs = []
    for path_str in sorted(selected, key=lambda p: files[p].relpath):
        bids_file = files[path_str]
        path = Path(path_str)
        shape, kind, problem = _read_shape(path)
        wanted = {"run": "bold", "mean": "mean"}.get(kind or "")
        if kind is not None and wanted not in selected[path_str]:
            log.debug("%s is a %s but was not selected by the %r query", path.name, kind, wanted)
            continue
        runs.append(Run(
            path=path,
            relpath=Path(bids_file.relpath).as_posix(),
            entities={k: str(v) for k, v in bids_file.get_entities().items()},
            kind=kind or "invalid",
            shape=shape,
            metadata=_metadata(layout, path_str),
            problem=problem,
        ))
    return runs


def _metadata(layout, path: str) -> dict[str, Any]:
    try:
        return dict(layout.get_metadata(path))
    except Exception:  # a broken sidecar must not stop discovery; the run reports it later
        log.warning("%s: its JSON sidecar cannot be read", Path(path).name)
        return {}


def missing_subjects(layout, subjects: list[str] | None) -> list[str]:
    """Requested participant labels that are not in the dataset."""
    if not subjects:
        return []
    present = set(layout.get_subjects())
    return [s for s in subjects if s not in present]
