"""The on-disk output format: names, NIfTI files, sidecars, crash files, and the one reader.

This module is the only owner of what a run leaves on disk. For a source
``sub-01/ses-01/func/sub-01_ses-01_task-rest_run-01_bold.nii.gz`` the outputs are, under
``OUT/sub-01/ses-01/func/`` (REFERENCE §4)::

    sub-01_ses-01_task-rest_run-01_desc-mean_boldref.nii.gz     temporal mean (4D input only), 3D
    sub-01_ses-01_task-rest_run-01_desc-mocomean_boldref.nii.gz  ... after motion correction
    sub-01_ses-01_task-rest_run-01_desc-moco_timeseries.tsv      motion table
    sub-01_ses-01_task-rest_run-01_space-orig_label-SC_mask.nii.gz      binary cord mask (ROI)
    sub-01_ses-01_task-rest_run-01_space-orig_label-SC_probseg.nii.gz   foreground probability
    sub-01_ses-01_task-rest_run-01_space-orig_label-SC_morph.tsv        per-slice metrics

each with its JSON sidecar. ``space-orig`` means the source image's own grid: every image is
written with the input's own header geometry (pixdim, qform and sform with their codes, units),
so every tool sees the grid the input has. The mean of a 4D run is a 3D image named as
fMRIPrep's ``boldref`` (listed in ``.bidsignore``: a 3D ``_bold`` file is invalid BIDS and the
validator does not cover ``boldref``), so SCT and other 3D-only tools read it directly. The mask
sidecar is written last and lists the other outputs: it marks a complete run, and :class:`RunRecord` (read by the rerun check, the QC report
and the group level) is read from it alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from . import CODE_URL, __version__
from .atomic import json_text, locked, replace, temporary_sibling, write_bytes_atomic, write_json_atomic
from .errors import EpisegError, InputImageError, OutputError

#: Bumped when the meaning of the outputs changes, so older outputs are recomputed on a rerun.
FORMAT_VERSION = 3

#: BIDS entity order (BIDS specification, "Entity table"), short keys.
ENTITY_ORDER = (
    "sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain", "rec",
    "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split",
    "recording", "chunk", "seg", "res", "den", "label", "desc",
)
_NAME_RE = re.compile(r"^(?P<pairs>(?:[a-zA-Z]+-[a-zA-Z0-9]+_)*)(?P<suffix>[a-zA-Z0-9]+)(?P<ext>\..*)?$")
#: Longest file name most file systems accept, in bytes.
MAX_NAME_BYTES = 255


def parse_name(filename: str) -> tuple[dict[str, str], str]:
    """Entities and suffix of a BIDS file name.

    Raises
    ------
    ValueError
        If the name is not BIDS key-value pairs and a suffix.

    Examples
    --------
    >>> parse_name('sub-01_task-rest_rec-MoCoMean_bold.nii.gz')
    ({'sub': '01', 'task': 'rest', 'rec': 'MoCoMean'}, 'bold')
    """
    match = _NAME_RE.match(filename)
    if not match:
        raise ValueError(f"{filename!r} is not a BIDS file name (key-value pairs and a suffix)")
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


def lock_path(output_dir: Path, key: str) -> Path:
    """The lock file that serialises writers of one thing (``OUT/.locks/<key>.lock``; a hash for
    input paths, which may be long or odd)."""
    if not re.fullmatch(r"[a-z]+", key):
        key = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return output_dir / ".locks" / f"{key}.lock"


def sidecar_of(path: Path) -> Path:
    """JSON sidecar of a NIfTI or TSV output."""
    return path.with_name(re.sub(r"\.(nii\.gz|nii|tsv)$", ".json", path.name))


@dataclass(frozen=True)
class RunOutputs:
    """Output paths of one input image."""

    folder: Path
    mean: Path
    mocomean: Path
    motion: Path
    mask: Path
    probseg: Path
    morph: Path

    @staticmethod
    def sidecar(path: Path) -> Path:
        """JSON sidecar of a NIfTI or TSV output."""
        return sidecar_of(path)

    def files(self) -> list[Path]:
        """Every output file an input can have (each also has a sidecar)."""
        return [self.mean, self.mocomean, self.motion, self.mask, self.probseg, self.morph]


def run_outputs(output_dir: Path, relpath: str) -> RunOutputs:
    """Output paths for the source at ``relpath`` (relative to the BIDS root).

    Raises
    ------
    InputImageError
        If the source's name is not a BIDS name, or an output name would be too long.
    """
    source = Path(relpath)
    try:
        names = {
            "mean": derivative_name(source.name, entities={"desc": "mean"}, suffix="boldref", extension=".nii.gz"),
            "mocomean": derivative_name(source.name, entities={"desc": "mocomean"}, suffix="boldref",
                                        extension=".nii.gz"),
            "motion": derivative_name(source.name, entities={"desc": "moco"}, suffix="timeseries", extension=".tsv"),
            **{kind: derivative_name(source.name, entities={"space": "orig", "label": "SC"}, suffix=kind,
                                     extension=ext)
               for kind, ext in (("mask", ".nii.gz"), ("probseg", ".nii.gz"), ("morph", ".tsv"))},
        }
    except ValueError:
        raise InputImageError(
            f"{printable(source.name)} is not a BIDS file name (labels may hold only letters and digits); "
            "rename it or exclude it with --bids-filter-file") from None
    figure = names["mask"][: -len("_mask.nii.gz")] + "_desc-sagittal_mask.svg"   # the longest QC figure name
    longest = max([*names.values(), figure], key=lambda n: len(n.encode()))
    if len(longest.encode()) > MAX_NAME_BYTES:
        raise InputImageError(f"{printable(source.name)}: its output name would be {len(longest.encode())} bytes "
                              f"long (the file-system limit is {MAX_NAME_BYTES}); shorten its labels")
    folder = output_dir / source.parent
    return RunOutputs(folder=folder, **{kind: folder / name for kind, name in names.items()})


def printable(text: str) -> str:
    """``text`` with control characters (newlines in file names...) escaped, for one-line messages.

    Examples
    --------
    >>> printable('sub-01\\n_bold')
    'sub-01\\\\n_bold'
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


#: The QC figures of a run, one SVG each (see :mod:`episeg_bids.qc`).
FIGURES = ("mosaic", "sagittal", "area")
MASK_END = "_mask.nii.gz"


def _mask_path(output_dir: Path, mask_path: Path) -> Path:
    path = Path(mask_path)
    path = path if path.is_absolute() else output_dir / path
    if not path.name.endswith(MASK_END):
        raise ValueError(f"{path.name} is not a mask (*{MASK_END}); pass the *_space-orig_label-SC_mask.nii.gz path")
    return path


def figure_paths(output_dir: Path, mask_path: Path) -> dict[str, Path]:
    """Where the figures of a mask go: ``OUT/sub-<label>/figures/<mask stem>_desc-<kind>_mask.svg``."""
    path = _mask_path(output_dir, mask_path)
    subject_dir = output_dir / path.relative_to(output_dir).parts[0]
    stem = path.name[: -len(MASK_END)]
    return {kind: subject_dir / "figures" / f"{stem}_desc-{kind}_mask.svg" for kind in FIGURES}


def remove_temporaries(folder: Path, names: list[str]) -> None:
    """Delete temporary files (:func:`~episeg_bids.atomic.temporary_sibling`) that a killed job left
    for these file names in ``folder``. The caller holds the lock under which they are written."""
    if not folder.is_dir():
        return
    prefixes = tuple(f".{name[:100]}." for name in names)
    for entry in os.scandir(folder):
        if entry.name.startswith(prefixes) and entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)


def remove_run_temporaries(output_dir: Path, outputs: RunOutputs) -> None:
    """Temporary files of one input's outputs and figures (the caller holds the input's lock)."""
    files = outputs.files()
    remove_temporaries(outputs.folder, [p.name for p in files] + [sidecar_of(p).name for p in files])
    figures = figure_paths(output_dir, outputs.mask)
    remove_temporaries(next(iter(figures.values())).parent, [p.name for p in figures.values()])


# --- images ---------------------------------------------------------------------------------

_GEOMETRY_FIELDS = ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z",
                    "srow_x", "srow_y", "srow_z", "qform_code", "sform_code", "dim_info")


def output_header(shape: tuple[int, ...], dtype: type, *, geometry: nib.Nifti1Header | None = None,
                  affine: np.ndarray | None = None, tr_s: float | None = None) -> nib.Nifti1Header:
    """A NIfTI-1 header for an output of ``shape`` and ``dtype``.

    With ``geometry`` (the input's own header, NIfTI-1 or -2), pixdim, qform, sform, their codes
    and the spatial unit are copied field by field, so the output lies on exactly the grid every
    tool reads from the input, even when pixdim, qform and sform disagree. Otherwise ``affine``
    (voxel → scanner RAS+ mm) is written as sform and qform, code 1. ``tr_s`` sets pixdim[4] of a
    4D output in seconds.
    """
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    if geometry is not None:
        for name in _GEOMETRY_FIELDS:
            header[name] = geometry[name]
        header["pixdim"][0] = geometry["pixdim"][0] if geometry["pixdim"][0] in (-1, 1) else 1
        header["pixdim"][1:4] = geometry["pixdim"][1:4]
        unit = geometry.get_xyzt_units()[0]
        header.set_xyzt_units(unit if unit in ("meter", "mm", "micron") else "mm", "sec")
    else:
        if affine is None:
            raise ValueError("output_header needs the input's header or an affine")
        header.set_qform(affine, code=1)
        header.set_sform(affine, code=1)
        header.set_xyzt_units("mm", "sec")
    if len(shape) > 3:
        header["pixdim"][4] = tr_s if tr_s else 1.0
    return header


def write_nifti_atomic(data: np.ndarray, path: Path, *, dtype: type, geometry: nib.Nifti1Header | None = None,
                       affine: np.ndarray | None = None, tr_s: float | None = None) -> None:
    """Save ``data`` (on-disk voxel order of the input) as ``dtype``, atomically.

    See :func:`output_header` for ``geometry``, ``affine`` and ``tr_s``.
    """
    array = np.asarray(data, dtype=dtype)
    img = nib.Nifti1Image(array, None, header=output_header(array.shape, dtype, geometry=geometry,
                                                             affine=affine, tr_s=tr_s))
    tmp = temporary_sibling(path)
    try:
        nib.save(img, tmp)
        replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- dataset-level files --------------------------------------------------------------------

def bids_uri(relpath: str) -> str:
    """``bids:raw:<relpath>`` URI of an input file (``DatasetLinks.raw`` names the dataset)."""
    return f"bids:raw:{relpath}"


def output_uri(output_dir: Path, path: Path) -> str:
    """``bids::<relpath>`` URI of a file of this derivative dataset."""
    return "bids::" + path.relative_to(output_dir).as_posix()


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
    except (OSError, ValueError, AttributeError):
        pass
    source = {"URL": raw}
    if isinstance(source_name, str) and source_name:
        source["Name"] = source_name
    return {
        "Name": "episeg-bids: spinal-cord masks of EPI-BOLD fMRI",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [source],
        "DatasetLinks": {"raw": raw},
    }


def readme_text(model_name: str, is_demo: bool) -> str:
    """The derivative dataset's README; names the model that made the masks."""
    made_by = (f"the episeg-bids DEMO model ({model_name}), a small model for testing the pipeline; "
               "these masks are NOT from the published EPISeg weights" if is_demo
               else f"the EPISeg nnUNetv2 model ({model_name})")
    return f"""episeg-bids derivatives
=======================

Spinal-cord masks of EPI-BOLD fMRI made by episeg-bids with {made_by}, run the way Spinal Cord
Toolbox's `sct_deepseg sc_epi` runs it. Per input image (4D run or 3D mean EPI):

- `*_desc-mean_boldref.nii.gz` (or `*_desc-mocomean_boldref.nii.gz` after motion correction): the
  temporal mean of a 4D run, a 3D image on the run's grid that SCT, FSL and ANTs read directly;
- `*_desc-moco_timeseries.tsv`: per-volume, per-slice in-plane translations (motion correction);
- `*_space-orig_label-SC_mask.nii.gz`: binary cord mask (uint8) on the input's grid;
- `*_space-orig_label-SC_probseg.nii.gz`: foreground probability (with --save-probseg);
- `*_space-orig_label-SC_morph.tsv`: per-slice cord area (mm2) and centroid (mm);
- JSON sidecars: inputs (bids:raw: URIs), model and checksums, options, versions, metrics.

Failed runs leave a crash file under `sub-<label>/log/`. Files that the BIDS specification does
not cover (3D means, motion and per-slice tables, logs, QC pages, group tables) are listed in
`.bidsignore`.
"""


#: Outputs outside the BIDS specification, for the validator's ``.bidsignore``.
#: The 3D means are fMRIPrep's ``boldref`` images and the motion table is named as fMRIPrep names its
#: confounds (``desc-<label>_timeseries.tsv``); bids-validator-deno 3.0 reports both as NOT_INCLUDED
#: (and a 3D ``_bold`` as BOLD_NOT_4D), so they are listed here.
BIDSIGNORE = ("*_boldref.nii.gz", "*_boldref.json", "*_morph.tsv", "*_morph.json", "*_timeseries.tsv",
              "*_timeseries.json", "sub-*/log", "sub-*/figures", "*.html", "qc", "group_*", "log")


def write_dataset_files(output_dir: Path, bids_dir: Path, container: dict[str, str] | None, *,
                        model_name: str = "", is_demo: bool = False) -> None:
    """Create ``output_dir`` with ``dataset_description.json``, README and ``.bidsignore``.

    Raises
    ------
    OutputError
        If the folder cannot be created or written.
    """
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with locked(lock_path(output_dir, "dataset")):
            remove_temporaries(output_dir, ["dataset_description.json", "README", ".bidsignore"])
            write_json_atomic(dataset_description(bids_dir, container), output_dir / "dataset_description.json")
            write_bytes_atomic(readme_text(model_name, is_demo).encode(), output_dir / "README")
            write_bytes_atomic(("\n".join(BIDSIGNORE) + "\n").encode(), output_dir / ".bidsignore")
    except OSError as err:
        raise OutputError(f"cannot write the output folder {output_dir} ({err.strerror}); check the path and "
                          "permissions") from err


# --- sidecars -------------------------------------------------------------------------------

def provenance(versions: dict[str, str]) -> dict[str, Any]:
    """Keys every sidecar of a run shares: who made it, with which software versions."""
    return {
        "GeneratedBy": [{"Name": "episeg-bids", "Version": __version__, "CodeURL": CODE_URL}],
        "PipelineVersions": versions,
    }


def mean_sidecar(*, source_uri: str, task_name: str, tr_s: float | None, n_volumes: int, nonfinite: int,
                 versions: dict[str, str], motion_corrected: bool = False) -> dict[str, Any]:
    """Sidecar of the temporal mean (a 3D ``boldref`` image, as fMRIPrep's)."""
    what = "Motion-corrected temporal mean" if motion_corrected else "Temporal mean"
    return {
        **provenance(versions),
        "Description": f"{what} of {n_volumes} volumes (NaN/Inf samples excluded), a 3D image on the run's grid",
        "Sources": [source_uri],
        "TaskName": task_name,
        **({"RepetitionTime": tr_s} if tr_s else {}),
        "SkullStripped": False,
        "VolumesAveraged": n_volumes,
        "NonFiniteValues": nonfinite,
    }


def motion_sidecar(*, source_uri: str, slice_axis: int, n_slices: int, reference: str,
                   versions: dict[str, str]) -> dict[str, Any]:
    """Column descriptions of the motion table (:func:`episeg_bids.moco.motion_table`)."""
    a, b = [("ijk")[axis] for axis in range(3) if axis != slice_axis]
    width = max(2, len(str(n_slices - 1)))
    sign = "mm; + means the anatomy moved towards increasing voxel index relative to the reference"
    columns = {
        "volume": {"Description": "Volume index in the run (0-based)"},
        "framewise_displacement_mm": {"Description": "Mean over the registered slices of the in-plane "
                                                     "displacement since the previous volume", "Units": "mm"},
        f"mean_translation_{a}_mm": {"Description": f"In-plane translation along voxel axis {a}, mean over the "
                                                    f"registered slices ({sign})", "Units": "mm"},
        f"mean_translation_{b}_mm": {"Description": f"In-plane translation along voxel axis {b}, mean over the "
                                                    f"registered slices ({sign})", "Units": "mm"},
        "max_displacement_mm": {"Description": "Largest in-plane displacement from the reference over the "
                                               "registered slices", "Units": "mm"},
    }
    for s in range(n_slices):
        for axis in (a, b):
            columns[f"translation_{axis}_slice{s:0{width}d}_mm"] = {
                "Description": f"In-plane translation of slice {s} (voxel index along axis {'ijk'[slice_axis]}) "
                               f"along voxel axis {axis} ({sign})", "Units": "mm"}
    return {**provenance(versions), "Description": "Slice-wise in-plane motion of the run (episeg-bids moco). "
            + reference, "Sources": [source_uri], **columns}


def probseg_sidecar(*, sources: list[str], spatial_reference: str, model: dict[str, Any],
                    versions: dict[str, str]) -> dict[str, Any]:
    """Sidecar of the foreground probability map."""
    return {
        **provenance(versions),
        "Description": "Spinal-cord probability (1 - softmax of the background class), 0-1, before "
                       "post-processing",
        "Sources": sources, "SpatialReference": spatial_reference, "Label": "SC", "Model": model,
    }


def morph_sidecar(mask_uri: str, axis: int) -> dict[str, Any]:
    """Column descriptions of the per-slice table."""
    return {
        "Description": "Per-slice spinal-cord metrics of the mask",
        "Sources": [mask_uri],
        "slice": {"Description": f"Voxel index along axis {axis} (closest to superior-inferior)"},
        "voxels": {"Description": "Mask voxels in the slice"},
        "area_mm2": {"Description": "Cord cross-sectional area in the slice plane", "Units": "mm^2"},
        "centroid_x_mm": {"Description": "Centroid, scanner RAS+ x", "Units": "mm"},
        "centroid_y_mm": {"Description": "Centroid, scanner RAS+ y", "Units": "mm"},
        "centroid_z_mm": {"Description": "Centroid, scanner RAS+ z", "Units": "mm"},
        "confidence": {"Description": "The network's expected Dice of the slice, 2 sum_mask(p) / (|mask| + sum(p)) "
                                      "with p the foreground probability; n/a where the slice holds no cord "
                                      "(episeg_bids.confidence)"},
    }


def mask_sidecar(*, sources: list[str], spatial_reference: str, model: dict[str, Any], is_demo: bool,
                 options: dict[str, Any], post_processing: list[str], inputs: dict[str, Any],
                 metrics: dict[str, Any], flags: list[dict[str, Any]], notes: list[str],
                 timings: dict[str, float], fingerprint: str, outputs: dict[str, Any],
                 versions: dict[str, str]) -> dict[str, Any]:
    """Sidecar of the mask: inputs, model, options, versions, metrics, flags, timing, and the list
    of the run's other outputs (``Outputs``: kind → path relative to the output folder)."""
    demo = " (DEMO model: not the published EPISeg weights)" if is_demo else ""
    return {
        **provenance(versions),
        "Description": "Spinal-cord mask by the EPISeg nnUNetv2 model, run as sct_deepseg sc_epi" + demo,
        "Type": "ROI",
        "Label": "SC",
        "Manual": False,
        "Sources": sources,
        "SpatialReference": spatial_reference,
        "Model": model,
        "Options": options,
        "PostProcessing": post_processing,
        "Input": inputs,
        "Metrics": metrics,
        "Flags": flags,
        "Notes": notes,
        "Outputs": outputs,
        "RunTimeSeconds": {k: round(v, 3) for k, v in timings.items()},
        "Fingerprint": fingerprint,
        "FormatVersion": FORMAT_VERSION,
        "DateProcessed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# --- the reader -----------------------------------------------------------------------------

class RecordError(ValueError):
    """A mask sidecar that cannot be read as a run record."""


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class RunRecord:
    """What one run left on disk, read from its mask sidecar (the last file a run writes).

    Attributes
    ----------
    output_dir : Path
        The derivative dataset.
    sidecar : Path
        Absolute path of the ``*_space-orig_label-SC_mask.json`` sidecar.
    meta : dict
        Its content.
    """

    output_dir: Path
    sidecar: Path
    meta: dict[str, Any]

    @property
    def mask(self) -> Path:
        return self.sidecar.with_name(self.sidecar.name[: -len(".json")] + ".nii.gz")

    @property
    def mask_rel(self) -> str:
        """The mask's path relative to the output folder (POSIX), the run's key in reports."""
        return self.mask.relative_to(self.output_dir).as_posix()

    @property
    def subject_dir(self) -> str:
        """``sub-<label>``: the top-level folder the run is in."""
        return self.sidecar.relative_to(self.output_dir).parts[0]

    @property
    def inputs(self) -> dict[str, Any]:
        return _dict(self.meta.get("Input"))

    @property
    def input_path(self) -> str | None:
        """The input's path relative to the BIDS root."""
        value = self.inputs.get("Path")
        return value if isinstance(value, str) else None

    @property
    def metrics(self) -> dict[str, Any]:
        return _dict(self.meta.get("Metrics"))

    @property
    def model(self) -> dict[str, Any]:
        return _dict(self.meta.get("Model"))

    @property
    def options(self) -> dict[str, Any]:
        return _dict(self.meta.get("Options"))

    @property
    def flags(self) -> list[dict[str, Any]]:
        return [f for f in self.meta.get("Flags") or [] if isinstance(f, dict)]

    @property
    def fingerprint(self) -> str | None:
        return self.meta.get("Fingerprint")

    @property
    def date_processed(self) -> str:
        return str(self.meta.get("DateProcessed") or "")

    @property
    def outputs(self) -> dict[str, str]:
        """Every file of the run (kind → path relative to the output folder), mask included."""
        listed = {k: v for k, v in _dict(self.meta.get("Outputs")).items() if isinstance(v, str)}
        return {**listed, "mask": self.mask_rel, "mask_sidecar": self.sidecar.relative_to(self.output_dir).as_posix()}

    @property
    def figures(self) -> dict[str, str]:
        return {k: v for k, v in _dict(self.meta.get("Figures")).items() if isinstance(v, str)}

    def missing_outputs(self) -> list[str]:
        """Listed outputs that are not on disk (figures are not required: the report rebuilds them)."""
        return sorted(rel for rel in self.outputs.values() if not (self.output_dir / rel).is_file())

    @property
    def complete(self) -> bool:
        return not self.missing_outputs()

    def segmented_image(self, bids_dir: Path | None) -> Path | None:
        """The volume that was segmented: the mean written here, or the 3D input in ``bids_dir``."""
        if "mean" in self.outputs:
            return self.output_dir / self.outputs["mean"]
        derived = [s for s in self.meta.get("Sources") or [] if isinstance(s, str) and s.startswith("bids::")]
        if derived:  # outputs of format 1 list the mean only among their sources
            return self.output_dir / derived[0][len("bids::"):]
        if bids_dir is not None and self.input_path:
            return bids_dir / self.input_path
        return None


def read_record(output_dir: Path, sidecar: Path) -> RunRecord:
    """The record of the run whose mask sidecar is ``sidecar``.

    Raises
    ------
    RecordError
        If the sidecar cannot be read or is not a JSON object.
    """
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RecordError(f"{sidecar} cannot be read ({err})") from err
    if not isinstance(meta, dict):
        raise RecordError(f"{sidecar} is not a JSON object")
    return RunRecord(Path(output_dir), Path(sidecar), meta)


def record_of(output_dir: Path, outputs: RunOutputs) -> RunRecord | None:
    """The record of one input's outputs, None when there is none or it cannot be read."""
    sidecar = sidecar_of(outputs.mask)
    if not sidecar.is_file():
        return None
    try:
        return read_record(output_dir, sidecar)
    except RecordError:
        return None


def mask_sidecars(output_dir: Path, subject: str | None = None) -> list[Path]:
    """Sidecars of every mask under ``output_dir`` (or of one subject, label without ``sub-``), sorted."""
    return sorted(output_dir.glob(f"sub-{glob_escape(subject) if subject else '*'}/**/*_space-orig_label-SC_mask.json"))


def glob_escape(text: str) -> str:
    """``text`` with glob metacharacters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", text)


def run_records(output_dir: Path, subject: str | None = None) -> tuple[list[RunRecord], list[str]]:
    """Every run record under ``output_dir`` (optionally of one subject), sorted by path, and the
    sidecars that could not be read (one message each)."""
    records, problems = [], []
    for sidecar in mask_sidecars(output_dir, subject):
        try:
            records.append(read_record(output_dir, sidecar))
        except RecordError as err:
            problems.append(str(err))
    return records, problems


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


# --- crash files ----------------------------------------------------------------------------

_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


def crash_file_path(output_dir: Path, subject: str | None, name: str, stamp: str) -> Path:
    """``OUT/sub-<label>/log/crash-<stamp>-<name>.txt``, the name shortened (with a hash of the
    whole) to fit the file-name limit; inputs without a usable subject label go to ``OUT/log/``."""
    folder = output_dir / f"sub-{subject}" / "log" if subject and _LABEL_RE.match(subject) else output_dir / "log"
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    if len(safe) > 120 or safe != name:
        safe = f"{safe[:120]}-{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
    return folder / f"crash-{stamp}-{safe}.txt"


def crash_text(*, relpath: str, path: Path, error: BaseException, options: dict[str, Any], stamp: str) -> str:
    """The crash report of a failed run: input, error, traceback, options."""
    return "\n".join([
        f"episeg-bids {__version__} crash report, {stamp} UTC",
        f"input: {json.dumps(relpath)}",
        f"path: {printable(str(path))}",
        f"error: {printable(error_line(error))}",
        "",
        "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        "options:",
        json_text(options),
    ])


def error_line(error: BaseException) -> str:
    """One line for a failure: our own messages as they are, anything else prefixed by its type."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, EpisegError):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def write_crash_file(output_dir: Path, *, subject: str | None, name: str, relpath: str, path: Path,
                     error: BaseException, options: dict[str, Any]) -> Path:
    """Write the crash report of a failed run (atomically) and return its path.

    Raises
    ------
    OSError
        If it cannot be written.
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = crash_file_path(output_dir, subject, name, stamp)
    write_bytes_atomic(crash_text(relpath=relpath, path=path, error=error, options=options, stamp=stamp)
                       .encode("utf-8", "backslashreplace"), target)
    return target


@dataclass(frozen=True)
class CrashRecord:
    """A crash file: the input it is about, the error line, when, and where the file is."""

    input: str
    error: str
    date: str
    crash_file: str


def read_crash(output_dir: Path, crash: Path) -> CrashRecord | None:
    """The crash file's input, error and time; None when it is not an episeg-bids crash report."""
    text = crash.read_text(encoding="utf-8", errors="replace")
    source = re.search(r"^input: (.*)$", text, re.M)
    error = re.search(r"^error: (.*)$", text, re.M)
    stamp = re.match(r"crash-(\d{8}T\d{6})-", crash.name)
    if not source:
        return None
    when = (datetime.strptime(stamp.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc).isoformat()
            if stamp else "")
    try:  # the input's path is written as a JSON string (a file name may hold a newline)
        relpath = json.loads(source.group(1))
    except ValueError:
        relpath = source.group(1)
    return CrashRecord(str(relpath), error.group(1) if error else "see the crash file", when,
                       crash.relative_to(output_dir).as_posix())


def crash_files(output_dir: Path) -> list[Path]:
    """Every crash file under the output folder, sorted."""
    return sorted([*output_dir.glob("sub-*/log/crash-*.txt"), *output_dir.glob("log/crash-*.txt")])


def unresolved_crashes(output_dir: Path, done: dict[str, str]) -> list[CrashRecord]:
    """The newest crash of each input that has no complete run processed after it.

    Parameters
    ----------
    done : dict
        Input path (relative to the BIDS root) → ISO time it was processed, for every complete run.
    """
    latest: dict[str, CrashRecord] = {}
    for path in crash_files(output_dir):
        crash = read_crash(output_dir, path)
        if crash is None:
            continue
        if crash.input in done and done[crash.input] >= crash.date:
            continue  # a later run of the same input succeeded
        if crash.input not in latest or latest[crash.input].date <= crash.date:
            latest[crash.input] = crash
    return [latest[k] for k in sorted(latest)]
