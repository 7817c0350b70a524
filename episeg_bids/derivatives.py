"""BIDS-derivative names and files, each written atomically (temporary name, then rename).

For a source ``sub-01/ses-01/func/sub-01_ses-01_task-rest_run-01_bold.nii.gz`` the outputs are,
under ``OUT/sub-01/ses-01/func/`` (REFERENCE §4)::

    sub-01_ses-01_task-rest_run-01_desc-mean_bold.nii.gz        temporal mean (4D input only)
    sub-01_ses-01_task-rest_run-01_space-orig_label-SC_mask.nii.gz      binary cord mask (ROI)
    sub-01_ses-01_task-rest_run-01_space-orig_label-SC_probseg.nii.gz   foreground probability
    sub-01_ses-01_task-rest_run-01_space-orig_label-SC_morph.tsv        per-slice metrics

each with its JSON sidecar. ``space-orig`` means the source image's own grid and affine. The mean
is stored as a 4D image of one volume, ``(X, Y, Z, 1)``: a 3D ``_bold`` file is invalid BIDS
(``BOLD_NOT_4D``), and one volume keeps the derivative dataset valid.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from . import CODE_URL, __version__
from .errors import OutputError

#: BIDS entity order (BIDS specification, "Entity table"), short keys.
ENTITY_ORDER = (
    "sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain", "rec",
    "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split",
    "recording", "chunk", "seg", "res", "den", "label", "desc",
)
_NAME_RE = re.compile(r"^(?P<pairs>(?:[a-zA-Z]+-[a-zA-Z0-9]+_)*)(?P<suffix>[a-zA-Z0-9]+)(?P<ext>\..*)?$")


def parse_name(filename: str) -> tuple[dict[str, str], str]:
    """Entities and suffix of a BIDS file name.

    Examples
    --------
    >>> parse_name('sub-01_task-rest_rec-MoCoMean_bold.nii.gz')
    ({'sub': '01', 'task': 'rest', 'rec': 'MoCoMean'}, 'bold')
    """
    match = _NAME_RE.match(filename)
    if not match:
        raise ValueError(f"{filename} is not a BIDS file name (key-value pairs and a suffix)")
    pairs = [p.split("-", 1) for p in match.group("pairs").strip("_").split("_") if p]
    return dict(pairs), match.group("suffix")


def derivative_name(source_name: str, *, entities: dict[str, str], suffix: str, extension: str) -> str:
    """Name of a derivative of ``source_name``: its entities plus ``entities``, in BIDS order.

    Examples
    --------
    >>> derivative_name('sub-01_run-1_bold.nii.gz', entities={'desc': 'mean'}, suffix='bold',
    ...                 extension='.nii.gz')
    'sub-01_run-1_desc-mean_bold.nii.gz'
    """
    pairs, _ = parse_name(source_name)
    pairs.update(entities)
    order = {key: i for i, key in enumerate(ENTITY_ORDER)}
    keys = sorted(pairs, key=lambda k: order.get(k, len(order)))
    return "_".join(f"{k}-{pairs[k]}" for k in keys) + f"_{suffix}{extension}"


@dataclass(frozen=True)
class RunOutputs:
    """Output paths of one input image."""

    folder: Path
    mean: Path
    mask: Path
    probseg: Path
    morph: Path

    @staticmethod
    def sidecar(path: Path) -> Path:
        """JSON sidecar of a NIfTI or TSV output."""
        return path.with_name(re.sub(r"\.(nii\.gz|nii|tsv)$", ".json", path.name))


def run_outputs(output_dir: Path, relpath: str) -> RunOutputs:
    """Output paths for the source at ``relpath`` (relative to the BIDS root)."""
    source = Path(relpath)
    folder = output_dir / source.parent
    sc = {"space": "orig", "label": "SC"}
    return RunOutputs(
        folder=folder,
        mean=folder / derivative_name(source.name, entities={"desc": "mean"}, suffix="bold", extension=".nii.gz"),
        mask=folder / derivative_name(source.name, entities=sc, suffix="mask", extension=".nii.gz"),
        probseg=folder / derivative_name(source.name, entities=sc, suffix="probseg", extension=".nii.gz"),
        morph=folder / derivative_name(source.name, entities=sc, suffix="morph", extension=".tsv"),
    )


def _temporary_sibling(path: Path) -> Path:
    """A hidden unique name in the same folder, keeping the extension (nibabel reads it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix="".join(path.suffixes[-2:]), dir=path.parent)
    os.close(fd)
    return Path(name)


def _replace(tmp: Path, path: Path) -> None:
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_bytes_atomic(data: bytes, path: Path) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    tmp = _temporary_sibling(path)
    try:
        tmp.write_bytes(data)
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_text(obj: Any) -> str:
    """Stable JSON: sorted keys, 2-space indent, trailing newline, so runs can be diffed."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (Path,)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write ``obj`` as stable JSON (see :func:`json_text`), atomically."""
    write_bytes_atomic(json_text(obj).encode(), path)


def write_tsv_atomic(rows: list[dict[str, Any]], path: Path) -> None:
    """Write rows (same keys) as a BIDS TSV (``n/a`` for missing values), atomically."""
    buffer = io.StringIO()
    columns = list(rows[0]) if rows else []
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["n/a" if row[c] is None else row[c] for c in columns])
    write_bytes_atomic(buffer.getvalue().encode(), path)


def write_nifti_atomic(data: np.ndarray, affine: np.ndarray, path: Path, *, dtype: type,
                       zooms: tuple[float, ...] | None = None) -> None:
    """Save ``data`` on the source grid (``affine``) as ``dtype``, units mm and s, atomically.

    ``zooms`` sets pixdim (e.g. the repetition time on a 4th axis); the sform and qform both
    carry ``affine``, coded as scanner-anatomical.
    """
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.header.set_data_dtype(dtype)
    img.header.set_xyzt_units("mm", "sec")
    if zooms is not None:
        img.header.set_zooms(zooms)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    tmp = _temporary_sibling(path)
    try:
        nib.save(img, tmp)
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def bids_uri(relpath: str) -> str:
    """``bids:raw:<relpath>`` URI of an input file (``DatasetLinks.raw`` names the dataset)."""
    return f"bids:raw:{relpath}"


def dataset_description(bids_dir: Path, container: dict[str, str] | None) -> dict[str, Any]:
    """``dataset_description.json`` of the derivative dataset."""
    raw = bids_dir.resolve().as_uri()
    generated = {"Name": "episeg-bids", "Version": __version__, "CodeURL": CODE_URL,
                 "Description": "EPISeg nnUNetv2 spinal-cord segmentation of EPI-BOLD fMRI"}
    if container:
        generated["Container"] = container
    source_name = None
    try:
        source_name = json.loads((bids_dir / "dataset_description.json").read_text()).get("Name")
    except (OSError, ValueError):
        pass
    source = {"URL": raw}
    if source_name:
        source["Name"] = source_name
    return {
        "Name": "episeg-bids: spinal-cord masks of EPI-BOLD fMRI",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [source],
        "DatasetLinks": {"raw": raw},
    }


README_TEXT = """episeg-bids derivatives
=======================

Spinal-cord masks of EPI-BOLD fMRI made by episeg-bids with the EPISeg nnUNetv2 model, run the way
Spinal Cord Toolbox's `sct_deepseg sc_epi` runs it. Per input image (4D run or 3D mean EPI):

- `*_desc-mean_bold.nii.gz`: temporal mean of a 4D run, stored as one volume (X, Y, Z, 1);
- `*_space-orig_label-SC_mask.nii.gz`: binary cord mask (uint8) on the input's grid;
- `*_space-orig_label-SC_probseg.nii.gz`: foreground probability (with --save-probseg);
- `*_space-orig_label-SC_morph.tsv`: per-slice cord area (mm2) and centroid (mm);
- JSON sidecars: inputs (bids:raw: URIs), model and checksums, options, versions, metrics.

Failed runs leave a crash file under `sub-<label>/log/`. Files that the BIDS specification does
not cover (per-slice tables, logs, QC pages, group tables) are listed in `.bidsignore`.
"""

#: Outputs outside the BIDS specification, for the validator's ``.bidsignore``.
BIDSIGNORE = ("*_morph.tsv", "*_morph.json", "sub-*/log", "sub-*/figures", "*.html", "qc", "group_*")


def write_dataset_files(output_dir: Path, bids_dir: Path, container: dict[str, str] | None) -> None:
    """Create ``output_dir`` with ``dataset_description.json`` and a README (atomically).

    Raises
    ------
    OutputError
        If the folder cannot be created or written.
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(dataset_description(bids_dir, container), output_dir / "dataset_description.json")
        if not (output_dir / "README").exists():
            write_bytes_atomic(README_TEXT.encode(), output_dir / "README")
        write_bytes_atomic(("\n".join(BIDSIGNORE) + "\n").encode(), output_dir / ".bidsignore")
    except OSError as err:
        raise OutputError(f"cannot write the output folder {output_dir} ({err.strerror}); check the path and permissions") from err


def crash_file_path(output_dir: Path, subject: str, name: str, stamp: str) -> Path:
    """``OUT/sub-<label>/log/crash-<stamp>-<name>.txt``."""
    return output_dir / f"sub-{subject}" / "log" / f"crash-{stamp}-{name}.txt"


def mask_sidecars(output_dir: Path, subject: str | None = None) -> list[Path]:
    """Sidecars of every mask under ``output_dir`` (or of one subject, label without ``sub-``),
    sorted: what the group level and the QC pages read."""
    return sorted(output_dir.glob(f"sub-{subject or '*'}/**/*_space-orig_label-SC_mask.json"))


def mask_of_sidecar(sidecar: Path) -> Path:
    """The ``.nii.gz`` mask that a mask sidecar describes."""
    return sidecar.with_name(sidecar.name[: -len(".json")] + ".nii.gz")


def loose_entities(name: str) -> dict[str, str]:
    """Key-value pairs of a file name, also of names without a BIDS suffix (ds005143's
    ``..._desc-spinalcordmask.nii.gz``).

    Examples
    --------
    >>> loose_entities('sub-01_task-rest_desc-spinalcordmask.nii.gz')
    {'sub': '01', 'task': 'rest', 'desc': 'spinalcordmask'}
    """
    stem = re.sub(r"\.nii(\.gz)?$|\.txt$", "", name)
    return dict(token.split("-", 1) for token in stem.split("_") if "-" in token)


def unresolved_crashes(output_dir: Path, done: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Crash files whose input has no mask processed after the crash, newest per input.

    Parameters
    ----------
    done : list of dict
        ``{'input': relpath, 'date_processed': ISO time}`` of every completed run.

    Returns
    -------
    list of dict
        ``{'input', 'error', 'crash_file'}`` (``crash_file`` relative to ``output_dir``).
    """
    finished = {row["input"]: row.get("date_processed") or "" for row in done}
    latest: dict[str, dict[str, str]] = {}
    for crash in sorted(output_dir.glob("sub-*/log/crash-*.txt")):
        text = crash.read_text(errors="replace")
        source = re.search(r"^input: (.*)$", text, re.M)
        error = re.search(r"^error: (.*)$", text, re.M)
        stamp = re.match(r"crash-(\d{8}T\d{6})-", crash.name)
        if not source:
            continue
        when = (datetime.strptime(stamp.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc).isoformat()
                if stamp else "")
        if finished.get(source.group(1), "") >= when and source.group(1) in finished:
            continue  # a later run of the same input succeeded
        latest[source.group(1)] = {"input": source.group(1), "error": error.group(1) if error else "see crash file",
                                   "crash_file": crash.relative_to(output_dir).as_posix()}
    return list(latest.values())
