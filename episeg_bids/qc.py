"""Quality-control report: per-run figures, one page per subject, one dataset report.

Public API (the pipeline and the group level call these):

- :func:`write_run_figures` — the figures of one run under ``OUT/sub-<label>/figures/``;
- :func:`write_subject_page` — ``OUT/sub-<label>.html``, every run of the subject;
- :func:`write_dataset_report` — ``OUT/qc/index.html``, every run on disk in a sortable,
  searchable table beside an image viewer, with keyboard ratings kept in the browser.

Pages are built only from what is on disk, read through :class:`episeg_bids.derivatives.RunRecord`
(mask sidecars, masks; figures, rebuilt from the mask and the segmented image when missing; the
motion table of a motion-corrected run), so separate jobs each add their runs; a file lock
(``OUT/qc/.lock``) and atomic renames keep concurrent writers from corrupting them. The group
level's results (outlier z-scores, accuracy, the manual mask of each run) are kept in
``OUT/qc/group_extra.json``, so pages written later by a participant job still show them, except
for runs whose mask was recomputed after that group level (their group results no longer apply).
Pages are self-contained (CSS and JS inlined, no network, open with ``file://``). Everything that
comes from the dataset is escaped (Jinja2 autoescape; JSON for the scripts in a
``<script type="application/json">`` block with ``<``, ``>``, ``&`` escaped), and a
Content-Security-Policy allows only the page's own scripts (by hash), so injected markup cannot run.
Figures are drawn by :mod:`episeg_bids.qc_figures`.
"""

from __future__ import annotations

import base64
import csv
import functools
import hashlib
import json
import logging
import math
import re
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote, unquote, urlparse

import nibabel as nib
import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from . import __version__
from . import derivatives as deriv
from . import epi, metrics, moco
from .atomic import json_text, locked, write_bytes_atomic, write_json_atomic
from .derivatives import MASK_END, figure_paths
from .metrics import OUTLIER_MAD_FLOOR, OUTLIER_MIN_RUNS, OUTLIER_Z
from .qc_figures import motion_svg, run_figures

log = logging.getLogger("episeg_bids")

#: Meaning of every automatic flag code: the input reader's, motion correction's, the mask's (each
#: module defines the texts of the flags it raises, with their thresholds).
FLAG_LEGEND = {**epi.FLAG_LEGEND, **moco.FLAG_LEGEND, **metrics.FLAG_HELP}
GROUP_FLAG_HELP = (f"Group level: the run is an outlier of the dataset, |modified z| > {OUTLIER_Z} (median and "
                   f"MAD, floored at {OUTLIER_MAD_FLOOR:g} x |median|, over at least {OUTLIER_MIN_RUNS} runs; "
                   "Iglewicz & Hoaglin 1993).")
ORIENTATION_NOTE = (
    "Axial tiles: anterior up, patient left on the viewer's left (as SCT), most superior slice first, numbered "
    "with the slice's voxel index in the input file; a 30 mm field of view centred on the slice's largest island "
    "of mask voxels (slices without cord: amber dashed frame, centred on the nearest slice with cord); key w (or "
    "the “Whole field” button) shows each slice's whole field of view instead, the 30 mm window as a dashed "
    "yellow frame. Sagittal: superior up, anterior on the left, through the mask's median left-right position. "
    "Bars: cord area per slice, aligned with the sagittal rows, plausible range shaded green.")
ENTITY_KEYS = ("sub", "ses", "task", "run")
#: Group-level columns: key → (short label, meaning, shown as a table column). Others keep their key.
GROUP_COLUMNS = {
    "z_volume_mm3": ("z vol.", "robust z-score of the cord volume in the dataset", True),
    "z_mean_area_mm2": ("z area", "robust z-score of the mean cord area in the dataset", True),
    "dice": ("Dice", "Dice with the manual mask, all slices", True),
    "hd95_mm": ("HD95 mm", "95th-percentile Hausdorff distance to the manual mask, mm", True),
    "dice_common": ("Dice common", "Dice on the slices both masks cover", False),
    "hd95_mm_common": ("HD95 common mm", "HD95 on the slices both masks cover, mm", False),
    "volume_diff_mm3": ("Volume diff. mm³", "our volume minus the manual mask's, mm³", False),
    "volume_diff_percent": ("Volume diff. %", "our volume minus the manual mask's, % of the manual", False),
    "common_slices": ("Common slices", "slices both masks cover", False),
}
#: Components listed per run (the main one, then the flagged ones, then the largest others).
MAX_LISTED_COMPONENTS = 12


@functools.lru_cache(maxsize=1)
def _jinja() -> Environment:
    """The template environment, built once per process (compiling the templates costs more than
    rendering a page)."""
    env = Environment(loader=PackageLoader("episeg_bids", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.policies["json.dumps_kwargs"] = {"sort_keys": True, "ensure_ascii": False}
    return env


def _static(name: str) -> str:
    return (resources.files("episeg_bids") / "static" / name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def _inline_assets(css_names: tuple[str, ...], js_names: tuple[str, ...]) -> dict[str, Any]:
    """CSS and JS text for the template, and a Content-Security-Policy that allows exactly them."""
    css = "\n".join(_static(n) for n in css_names)
    js = "\n".join(_static(n) for n in js_names)
    policy = ("default-src 'none'; img-src 'self' file: data: blob:; "
              f"style-src {_csp_hash(css)}; script-src {_csp_hash(js)}; base-uri 'none'; form-action 'none'")
    return {"css": Markup(css), "js": Markup(js), "csp": policy}


def _locked(output_dir: Path):
    """Hold ``OUT/qc/.lock`` while pages are written (parallel jobs share the report)."""
    return locked(output_dir / "qc" / ".lock")


def write_run_figures(output_dir: Path, mask_path: Path, image: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                      zooms_mm: tuple, rows: list[dict], *, flags: list[dict] | None = None,
                      reference: np.ndarray | None = None, labels: tuple[np.ndarray, int] | None = None,
                      components: list[dict] | None = None) -> dict[str, str]:
    """Write the axial mosaic, sagittal view and area profile of one run (SVG, atomically).

    Parameters
    ----------
    output_dir : Path
        The derivatives folder.
    mask_path : Path
        The run's ``*_space-orig_label-SC_mask.nii.gz`` (absolute, or relative to ``output_dir``).
    image : (X, Y, Z) ndarray
        The volume that was segmented (the temporal mean of a 4D run), on-disk voxel order.
    mask : (X, Y, Z) ndarray
        Its binary mask.
    affine : (4, 4) ndarray
        Voxel → scanner RAS+ mm.
    zooms_mm : (3,) tuple of float
        Voxel size along X, Y, Z.
    rows : list of dict
        Per-slice rows of :func:`episeg_bids.metrics.per_slice` (areas shown on the figures).
    flags : list of dict, optional
        The run's :func:`episeg_bids.metrics.quality_flags`; flagged slices are marked.
    reference : (X, Y, Z) ndarray, optional
        The run's manual mask on the same grid (group level): drawn with ours, per-slice Dice.
    labels, components : optional
        :func:`episeg_bids.metrics.label_components` and ``describe_components`` of the mask,
        when the caller has them (else computed).

    Returns
    -------
    dict
        ``{'mosaic', 'sagittal', 'area'}`` → path relative to ``output_dir`` (POSIX).
    """
    figures = run_figures(image, mask, affine, zooms_mm, rows, flags, reference=reference, labels=labels,
                          components=components)
    paths = figure_paths(output_dir, mask_path)
    for kind, path in paths.items():
        write_bytes_atomic(figures[kind].encode("utf-8"), path)
    return {kind: path.relative_to(output_dir).as_posix() for kind, path in paths.items()}


def _raw_dataset(output_dir: Path) -> Path | None:
    """The input dataset named by ``DatasetLinks.raw`` in ``dataset_description.json``."""
    try:
        raw = json.loads((output_dir / "dataset_description.json").read_text())["DatasetLinks"]["raw"]
        return Path(unquote(urlparse(raw).path))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _segmented_image(record: deriv.RunRecord, shape: tuple[int, ...]) -> np.ndarray | None:
    """The volume that was segmented (the mean written here, or the 3D input), if it is on disk
    and on the mask's grid."""
    path = record.segmented_image(_raw_dataset(record.output_dir))
    if path is None or not path.is_file():
        return None
    img = nib.load(path)
    if img.shape[:3] != shape or (len(img.shape) > 3 and img.shape[3:] != (1,) * (len(img.shape) - 3)):
        return None
    return np.asarray(img.dataobj, dtype=np.float32).reshape(shape)


def _zooms(record: deriv.RunRecord, mask_img: nib.Nifti1Image) -> tuple[float, float, float]:
    """The voxel size the run was measured with (the sidecar's), else the mask header's."""
    return tuple(float(z) for z in record.inputs.get("VoxelSizeMM") or mask_img.header.get_zooms()[:3])


def reference_path(output_dir: Path, value: Any) -> Path | None:
    """The manual mask named by the group level (``extra[mask]['ground_truth']``): absolute, or
    relative to ``output_dir``."""
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    return path if path.is_absolute() else output_dir / path


def load_reference(path: Path, mask_img: nib.Nifti1Image) -> np.ndarray:
    """A manual mask as a bool (X, Y, Z) array on the mask's grid.

    Raises
    ------
    ValueError
        If it is on another grid (shape or affine), as the group level's accuracy refuses it.
    """
    img = nib.load(path)
    if img.shape[:3] != mask_img.shape[:3] or not np.allclose(img.affine, mask_img.affine, atol=1e-3):
        raise ValueError(f"{path.name} is on another grid ({img.shape}) than the mask ({mask_img.shape}); resample it "
                         "to the input image")
    return np.asarray(img.dataobj).reshape(mask_img.shape[:3]) > 0


def rebuild_figures(record: deriv.RunRecord, *, reference: Path | None = None) -> dict[str, str] | None:
    """Figures of a run from its files on disk (mask, mean or 3D source, and the manual mask
    ``reference`` when given); None when the segmented image is not found (a 4D source without
    its mean is not averaged again here)."""
    mask_img = nib.load(record.mask)
    mask = np.asarray(mask_img.dataobj)
    image = _segmented_image(record, mask.shape)
    if image is None:
        return None
    zooms = _zooms(record, mask_img)
    rows = metrics.per_slice(mask, mask_img.affine, zooms)
    truth = load_reference(reference, mask_img) if reference is not None else None
    return write_run_figures(record.output_dir, record.mask, image, mask, mask_img.affine, zooms, rows,
                             flags=record.flags, reference=truth)


def _text(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value) if value else "none"
    if isinstance(value, dict):
        return "; ".join(f"{k} = {_text(v)}" for k, v in sorted(value.items())) or "none"
    return str(value)


def _anchor(name: str) -> str:
    return "run-" + re.sub(r"[^A-Za-z0-9_-]", "_", name[: -len(MASK_END)] if name.endswith(MASK_END) else name)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        log.warning("%s cannot be read (%s); left out of the QC report", path, err)
        return None
    return value if isinstance(value, dict) else None


def _group_item(record: deriv.RunRecord, extra: dict, extra_date: str | None) -> dict[str, Any]:
    """The group level's results for this run; none when its mask was recomputed after that group
    level (they describe the previous mask)."""
    item = extra.get(record.mask_rel)
    if not isinstance(item, dict):
        return {}
    if extra_date and record.date_processed and record.date_processed > extra_date:
        return {}
    return item


def collect_runs(output_dir: Path, subject: str | None = None, *, rebuild: bool = True, extra: dict | None = None,
                 extra_date: str | None = None, redraw: frozenset[str] | set[str] = frozenset(),
                 detail: bool = False, measured: Mapping[str, list[dict]] | None = None) -> list[dict[str, Any]]:
    """One plain dict per run record on disk (optionally of one subject), sorted by path.

    ``extra`` holds the group level's results (see :func:`write_dataset_report`). Missing figures
    are rebuilt from the files on disk when ``rebuild`` (and possible); the figures of the runs
    in ``redraw`` (mask paths relative to ``output_dir``) are drawn again, with their manual mask
    when the group level named one. With ``detail`` (subject pages), every component is measured
    from the mask and the motion table is plotted; without (the dataset report, rebuilt after
    every participant job), only what the sidecars hold is read: the flagged components.
    ``measured`` holds component tables (:func:`episeg_bids.metrics.describe_components`) this
    process has just measured, by mask path relative to ``output_dir``: used instead of reading
    those masks again.
    """
    runs = []
    records, problems = deriv.run_records(output_dir, subject)
    for problem in problems:
        log.warning("%s; left out of the QC report", problem)
    for record in records:
        group = _group_item(record, extra or {}, extra_date)
        reference = reference_path(output_dir, group.get("ground_truth"))
        paths = figure_paths(output_dir, record.mask)
        figures = {k: p.relative_to(output_dir).as_posix() for k, p in paths.items()}
        complete = all(p.is_file() for p in paths.values())
        drawn = None
        if record.mask_rel in redraw or (rebuild and not complete):
            try:
                drawn = rebuild_figures(record, reference=reference)
            except Exception as err:  # a broken file must not stop the report
                log.warning("figures of %s cannot be drawn (%s)", record.mask_rel, err)
        missing = "" if drawn or complete else "figures missing and the segmented image was not found"
        with_reference = reference is not None and (drawn is not None or (complete and record.mask_rel not in redraw))
        table = (measured or {}).get(record.mask_rel)
        runs.append(_run_entry(record, None if missing else figures, missing, group, with_reference, detail, table))
    return runs


def _task_name(record: deriv.RunRecord) -> str | None:
    """TaskName: recorded with the input, else from the mean's sidecar (outputs of older versions)."""
    if isinstance(record.inputs.get("TaskName"), str):
        return record.inputs["TaskName"]
    mean = record.segmented_image(None)
    value = (_read_json(deriv.sidecar_of(mean)) or {}).get("TaskName") if mean else None
    return value if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    """A finite number from a record or a table cell ('n/a', text, NaN, bool → None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _component_row(item: dict[str, Any]) -> dict[str, Any]:
    status = ("cord (largest)" if item["main"] else "flagged: worth a look" if item["flagged"]
              else "speck" if item["speck"] else "close to the cord")
    return {"id": item["id"], "slices": metrics.slice_range(item["first_slice"], item["last_slice"]),
            "centroid": ", ".join(f"{c:.1f}" for c in item["centroid_mm"]), "voxels": item["voxels"],
            "volume": f"{item['volume_mm3']:.4g}", "distance": "—" if item["main"] else f"{item['distance_mm']:.1f}",
            "status": status, "flagged": item["flagged"]}


def _components(record: deriv.RunRecord, measure: bool,
                table: list[dict] | None = None) -> tuple[list[dict[str, Any]], int]:
    """The run's components for the report (main, flagged, then the largest others; at most
    :data:`MAX_LISTED_COMPONENTS`) and how many are left out; nothing for a one-component mask.

    When ``measure``: ``table`` (the mask's :func:`~episeg_bids.metrics.describe_components`), or
    measured from the mask when it is None; else the flagged ones recorded with the
    ``components`` flag (no file read)."""
    count = record.metrics.get("components")
    if not isinstance(count, int) or count < 2:
        return [], 0
    if not measure:
        flagged = [c for f in record.flags if f.get("code") == "components" for c in f.get("components") or []
                   if isinstance(c, dict)]
        try:
            return [_component_row(c) for c in flagged[:MAX_LISTED_COMPONENTS]], count - min(
                len(flagged), MAX_LISTED_COMPONENTS)
        except (KeyError, TypeError, ValueError):  # a flag of another version
            return [], count
    try:
        if table is None:
            img = nib.load(record.mask)
            table = metrics.describe_components(np.asarray(img.dataobj), img.affine, _zooms(record, img))
    except Exception as err:  # a broken mask must not stop the report
        log.warning("components of %s cannot be measured (%s)", record.mask_rel, err)
        return [], 0
    others = sorted(table[1:], key=lambda c: (not c["flagged"], -c["voxels"], c["id"]))
    shown = table[:1] + others[:MAX_LISTED_COMPONENTS - 1]
    return [_component_row(c) for c in shown], len(table) - len(shown)


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _motion(record: deriv.RunRecord, plot: bool) -> dict[str, Any] | None:
    """Motion of a motion-corrected run: summary facts (``meta['Motion']``) and, when ``plot``,
    the plot of its table (``outputs['motion']``: one row per volume, ``framewise_displacement_mm``
    and ``mean_translation_<axis>_mm`` columns) as a data URI; None when the run has neither."""
    summary = record.meta.get("Motion") if isinstance(record.meta.get("Motion"), dict) else {}
    table = record.outputs.get("motion")
    if not summary and not table:
        return None
    threshold = _number(summary.get("ThresholdMM"))
    high = summary.get("HighMotionVolumes")
    facts = [("Framewise displacement", f"mean {_text(_number(summary.get('FramewiseDisplacementMeanMM')))} mm, "
                                        f"max {_text(_number(summary.get('FramewiseDisplacementMaxMM')))} mm")]
    if isinstance(high, list):
        listed = ", ".join(map(str, high[:20])) + (" …" if len(high) > 20 else "")
        facts.append(("High-motion volumes", f"{len(high)}" + (f" (FD > {threshold:g} mm)" if threshold else "")
                      + (f": {listed}" if high else "")))
    elif high is not None:
        facts.append(("High-motion volumes", _text(high) + (f" (FD > {threshold:g} mm)" if threshold else "")))
    image, problem = None, ""
    if table and plot:
        try:
            rows = _read_tsv(record.output_dir / table)
            names = (re.fullmatch(r"mean_translation_(\w+)_mm", k) for k in (rows[0] if rows else {}))
            axes = [m.group(1) for m in names if m]
            numbers = [_number(r.get("volume")) for r in rows]
            volumes = [int(v) if v is not None else i for i, v in enumerate(numbers)]
            svg = motion_svg(volumes, [_number(r.get("framewise_displacement_mm")) for r in rows],
                             {a: [_number(r.get(f"mean_translation_{a}_mm")) for r in rows] for a in axes},
                             threshold_mm=threshold)
            image = "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")
        except (OSError, ValueError, KeyError) as err:
            problem = f"the motion table {table} cannot be read ({err})"
            log.warning("%s", problem)
    return {"facts": facts, "plot": image, "problem": problem,
            "fd_max_mm": _number(summary.get("FramewiseDisplacementMaxMM"))}


def _group_facts(group: dict[str, Any]) -> list[tuple[str, str]]:
    """The group level's columns of a run as (label, value) pairs, known ones first."""
    columns = group.get("columns") if isinstance(group.get("columns"), dict) else {}
    keys = [k for k in GROUP_COLUMNS if k in columns] + sorted(k for k in columns if k not in GROUP_COLUMNS)
    return [(GROUP_COLUMNS[k][0] if k in GROUP_COLUMNS else k, _text(columns[k])) for k in keys
            if columns[k] is not None]


def _flag_entries(flags: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    return [{"code": str(f.get("code", "")), "message": str(f.get("message", "")), "source": source,
             "slices": [int(s) for s in f.get("slices") or [] if isinstance(s, int)]}
            for f in flags if isinstance(f, dict)]


def _run_entry(record: deriv.RunRecord, figures: dict[str, str] | None, missing: str, group: dict[str, Any],
               with_reference: bool, detail: bool, table: list[dict] | None = None) -> dict[str, Any]:
    """What the pages show of one run, as plain values (strings are escaped by the templates);
    ``detail`` as :func:`collect_runs`; ``table``: the mask's components, when already measured."""
    meta, inputs, model, m = record.meta, record.inputs, record.model, record.metrics
    mask_rel, subject_dir = record.mask_rel, record.subject_dir
    name = Path(mask_rel).name
    entities = deriv.loose_entities(Path(str(inputs.get("Path") or name)).name)
    task_name = _task_name(record)
    flags = _flag_entries(record.flags, "run") + _flag_entries(group.get("flags") or [], "group")
    n_slices, covered = m.get("n_slices"), m.get("slices_with_cord")
    confidence = _number(m.get("confidence"))
    components, more = _components(record, detail, table)
    motion = _motion(record, detail)
    reference = reference_path(record.output_dir, group.get("ground_truth")) if with_reference else None
    return {
        "anchor": _anchor(name), "mask": mask_rel, "name": name, "subject_dir": subject_dir,
        "subject": subject_dir[4:], "session": entities.get("ses"), "task": entities.get("task"),
        "run": entities.get("run"),
        "other": " ".join(f"{k}-{v}" for k, v in entities.items() if k not in ENTITY_KEYS) or None,
        "input": inputs.get("Path"), "task_name": task_name,
        "volume_mm3": m.get("volume_mm3"), "mean_area_mm2": m.get("mean_area_mm2"), "voxels": m.get("voxels"),
        "slices_with_cord": covered, "n_slices": n_slices, "components": m.get("components"),
        "confidence": confidence, "fd_max_mm": motion["fd_max_mm"] if motion else None,
        "slices": f"{_text(covered)}/{_text(n_slices)}", "flags": flags, "figures": figures, "missing": missing,
        "demo": bool(model.get("IsDemoModel")), "model": model.get("Name"), "date": meta.get("DateProcessed"),
        "metrics": [("Cord volume", f"{_text(m.get('volume_mm3'))} mm³"), ("Voxels", _text(m.get("voxels"))),
                    ("Slices with cord", f"{_text(covered)} of {_text(n_slices)} (slices {_text(m.get('first_slice'))}"
                                         f"–{_text(m.get('last_slice'))}, voxel axis {_text(m.get('slice_axis'))})"),
                    ("Mean area", f"{_text(m.get('mean_area_mm2'))} mm²"), ("Components", _text(m.get("components"))),
                    *([("Confidence", f"{confidence:.3f} (0–1, higher = more certain)")]
                      if confidence is not None else []),
                    *(motion["facts"] if motion else [])],
        "group": _group_facts(group), "group_columns": dict(group.get("columns") or {}),
        "reference": reference.name if reference else None,
        "components_list": components, "components_more": more, "motion": motion,
        "provenance": [
            ("Input", _text(inputs.get("Path"))), ("Input kind", _text(inputs.get("Kind"))),
            ("Task name", _text(task_name)),
            ("Shape", _text(inputs.get("Shape"))), ("Voxel size (mm)", _text(inputs.get("VoxelSizeMM"))),
            ("Orientation", _text(inputs.get("Orientation"))),
            ("Volumes averaged", _text(inputs.get("VolumesAveraged"))),
            ("Non-finite values", _text(inputs.get("NonFiniteValues"))), ("Input SHA256", _text(inputs.get("SHA256"))),
            ("Model", _text(model.get("Name"))), ("Model path", _text(model.get("Path"))),
            ("Folds", _text(model.get("Folds"))), ("Checkpoint", _text(model.get("Checkpoint"))),
            ("Checkpoint SHA256", _text(model.get("CheckpointSHA256"))), ("Model URL", _text(model.get("URL"))),
            ("Demo model", _text(model.get("IsDemoModel"))), ("Options", _text(meta.get("Options"))),
            ("Post-processing", _text(meta.get("PostProcessing"))), ("Notes", _text(meta.get("Notes"))),
            ("Run time (s)", _text(meta.get("RunTimeSeconds"))), ("Versions", _text(meta.get("PipelineVersions"))),
            ("Processed", _text(meta.get("DateProcessed"))), ("Fingerprint", _text(meta.get("Fingerprint"))),
            ("Description", _text(meta.get("Description"))),
            *([("Manual mask", str(reference))] if reference else []),
        ],
        "sidecar": json_text(meta),
    }


def _href(relpath: str, prefix: str = "") -> str:
    """URL of an output file, relative to a page (``prefix`` '../' from ``qc/``), percent-encoded."""
    return prefix + quote(relpath, safe="/")


def _legend(flag_lists: list[list[dict[str, Any]]]) -> list[dict[str, str]]:
    """Meaning of every flag code: the automatic ones, then any other code that occurs."""
    codes = {f["code"]: f["source"] for flags in flag_lists for f in flags}
    legend = [{"code": code, "text": text} for code, text in FLAG_LEGEND.items()]
    legend += [{"code": code, "text": GROUP_FLAG_HELP if source == "group" else "Flag of another episeg-bids version."}
               for code, source in sorted(codes.items()) if code not in FLAG_LEGEND]
    return legend


def _page_common(title: str) -> dict[str, Any]:
    return {"title": title, "version": __version__, "orientation_note": ORIENTATION_NOTE,
            "generated": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _subject_label(subject: str) -> str:
    label = subject[4:] if subject.startswith("sub-") else subject
    if not label or "/" in label or label in (".", ".."):
        raise ValueError(f"subject label {subject!r} is not a BIDS label; pass e.g. '01' or 'sub-01'")
    return label


def _crash_files(output_dir: Path, subject_dir: str) -> list[dict[str, str]]:
    return [{"name": p.name, "href": _href(p.relative_to(output_dir).as_posix())}
            for p in sorted((output_dir / subject_dir / "log").glob("crash-*.txt"))]


def _failures(output_dir: Path, runs: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Crash files whose input has no mask processed after the crash (as the group level)."""
    done = {r["input"]: r["date"] or "" for r in runs if r["input"]}
    return [{"input": c.input, "error": c.error, "name": Path(c.crash_file).name, "href": _href(c.crash_file, "../")}
            for c in deriv.unresolved_crashes(output_dir, done)]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_subject_page(output_dir: Path, subject: str, *, extra: dict | None = None,
                       measured: Mapping[str, list[dict]] | None = None) -> Path:
    """Write ``OUT/sub-<label>.html``: every run of the subject with its figures, metrics, flags,
    components, motion, the group level's results and provenance (inputs, model, options,
    timing, versions). ``subject`` with or without ``sub-``.

    Parameters
    ----------
    extra : dict, optional
        The group level's results (see :func:`write_dataset_report`); when None, those kept by
        the last group level.
    measured : mapping, optional
        Component tables already measured by the caller, by mask path relative to
        ``output_dir`` (see :func:`collect_runs`).

    Returns
    -------
    Path
        The page.
    """
    label = _subject_label(subject)
    output_dir = Path(output_dir)
    extra, extra_date = (extra, _now()) if extra is not None else _kept_extra(output_dir)
    runs = collect_runs(output_dir, label, extra=extra, extra_date=extra_date, detail=True, measured=measured)
    for run in runs:
        run["figure_hrefs"] = {k: _href(v) for k, v in run["figures"].items()} if run["figures"] else None
    page = output_dir / f"sub-{label}.html"
    html = _jinja().get_template("subject.html").render(
        **_page_common(f"sub-{label}"), **_inline_assets(("qc.css",), ("qc_subject.js",)),
        subject=label, runs=runs, legend=_legend([r["flags"] for r in runs]), demo=any(r["demo"] for r in runs),
        crashes=_crash_files(output_dir, f"sub-{label}"), index_href="qc/index.html",
        any_reference=any(r["reference"] for r in runs),
        extra_date=extra_date if any(r["group"] for r in runs) else None)
    with _locked(output_dir):
        deriv.remove_temporaries(output_dir, [page.name])
        write_bytes_atomic(html.encode("utf-8"), page)
    return page


def _dataset_info(output_dir: Path) -> dict[str, Any]:
    description = _read_json(output_dir / "dataset_description.json") or {}
    sources = description.get("SourceDatasets") or [{}]
    name = sources[0].get("Name") if isinstance(sources[0], dict) else None
    key = hashlib.sha256(str(output_dir.resolve()).encode()).hexdigest()[:16]
    return {"name": str(name or output_dir.name), "key": key, "path": str(output_dir.resolve())}


def _kept_extra(output_dir: Path) -> tuple[dict, str | None]:
    """The group level's results kept in ``qc/group_extra.json`` and their date ({} and None
    before any group level)."""
    kept = _read_json(output_dir / "qc" / "group_extra.json")
    if kept and isinstance(kept.get("extra"), dict):
        return kept["extra"], kept.get("Date")
    return {}, None


def _load_extra(output_dir: Path, extra: dict | None) -> tuple[dict, str | None]:
    """``extra`` (and keep it in ``qc/group_extra.json``) or, when None, the last one kept there,
    so a participant job after the group level does not drop the group columns."""
    if extra is None:
        return _kept_extra(output_dir)
    stamp = _now()
    write_json_atomic({"Date": stamp, "extra": extra}, output_dir / "qc" / "group_extra.json")
    return extra, stamp


#: Table columns of the dataset report: key, header, numeric, what it is (the header's tooltip).
#: Columns empty for every run are left out, and so are the entity columns with one value for
#: every run (named above the table instead), so that the table fits its panel at 1400 px.
COLUMNS = (("subject", "Subject", False, "participant label"), ("session", "Ses.", False, "session label"),
           ("task", "Task", False, "task label"), ("run", "Run", False, "run index"),
           ("other", "Entities", False, "other entities of the input's name"),
           ("flag_codes", "Flags", False, "automatic flags (run, then group level)"),
           ("confidence", "Conf.", True, "model confidence, 0–1: sort ascending for the least certain first"),
           ("volume_mm3", "Vol. mm³", True, "cord volume, mm³"),
           ("mean_area_mm2", "Area mm²", True, "mean cord area over the slices with cord, mm²"),
           ("fd_max_mm", "FD max", True, "largest framewise displacement, mm (motion-corrected runs)"))
#: Shown in the viewer (and searched), not as columns.
VIEWER_ONLY = ("slices", "components")
CONSTANT_DROPPED = ("session", "task", "run", "other")


def _index_data(output_dir: Path, runs: list[dict[str, Any]], extra_date: str | None) -> dict[str, Any]:
    """The JSON the dataset report's script reads: columns, runs, dataset key."""
    extra_keys: list[str] = []
    for run in runs:
        extra_keys += [k for k in run["group_columns"] if k not in extra_keys]
    extra_keys.sort(key=lambda k: (list(GROUP_COLUMNS).index(k) if k in GROUP_COLUMNS else len(GROUP_COLUMNS), k))
    entries = []
    for run in runs:
        cells = {key: run.get(key) for key in [k for k, *_ in COLUMNS] + list(VIEWER_ONLY)}
        cells["flag_codes"] = " ".join(dict.fromkeys(f["code"] for f in run["flags"]))
        cells.update({k: run["group_columns"].get(k) for k in extra_keys})
        entries.append({
            "key": run["mask"], "title": Path(str(run["input"] or run["name"])).name, "cells": cells,
            "input": run["input"], "task_name": run["task_name"], "flags": run["flags"], "date": run["date"],
            "demo": run["demo"], "missing": run["missing"], "metrics": run["metrics"] + run["group"],
            "reference": run["reference"], "components": run["components_list"],
            "components_more": run["components_more"],
            "figures": {k: _href(v, "../") for k, v in run["figures"].items()} if run["figures"] else None,
            "page": _href(f"sub-{run['subject']}.html", "../") + "#" + run["anchor"],
        })
    columns, constant = [], []
    for key, label, numeric, title in COLUMNS:
        values = [e["cells"][key] for e in entries]
        if key not in ("subject", "flag_codes") and all(v is None for v in values):
            continue
        if key in CONSTANT_DROPPED and len(entries) > 1 and len(set(map(str, values))) == 1:
            constant.append({"label": label, "value": _text(values[0])})
            continue
        columns.append({"key": key, "label": label, "numeric": numeric, "title": title, "table": True})
    for key in extra_keys:
        label, title, in_table = GROUP_COLUMNS.get(key, (key, f"group level: {key}", True))
        columns.append({"key": key, "label": label, "numeric": True, "title": title, "table": in_table,
                        "extra": True})
    return {"dataset": _dataset_info(output_dir), "columns": columns, "constant": constant, "runs": entries,
            "extra_date": extra_date}


def write_dataset_report(output_dir: Path, extra: dict | None = None) -> Path:
    """Write ``OUT/qc/index.html`` from every mask sidecar on disk (under a file lock).

    Parameters
    ----------
    output_dir : Path
        The derivatives folder.
    extra : dict, optional
        The group level's results: mask path relative to ``output_dir`` → ``{'columns': {name:
        value}, 'flags': [{'code', 'message'}], 'ground_truth': path}`` (outlier z-scores,
        accuracy; ``ground_truth``, absolute or relative to ``output_dir``, the run's manual mask
        on the same grid). Kept in ``qc/group_extra.json``; when None, the last kept one is shown
        (except for runs whose mask was recomputed since). When given, the figures of every run
        with a manual mask (or that had one) are drawn again: the manual mask's contour with ours,
        the per-slice Dice under each tile.

    Returns
    -------
    Path
        The report.
    """
    output_dir = Path(output_dir)
    with _locked(output_dir):
        deriv.remove_temporaries(output_dir / "qc", ["index.html", "group_extra.json"])
        redraw: set[str] = set()
        if extra is not None:
            previous, _ = _kept_extra(output_dir)
            redraw = {k for source in (extra, previous) for k, v in source.items()
                      if isinstance(v, dict) and v.get("ground_truth")}
        extra, extra_date = _load_extra(output_dir, extra)
        runs = collect_runs(output_dir, extra=extra, extra_date=extra_date, redraw=redraw)
        data = _index_data(output_dir, runs, extra_date)
        crashes = _failures(output_dir, runs)
        html = _jinja().get_template("index.html").render(
            **_page_common("episeg-bids QC"), **_inline_assets(("qc.css",), ("qc_index.js",)),
            data=data, dataset=data["dataset"], n_runs=len(runs), legend=_legend([e["flags"] for e in data["runs"]]),
            n_flagged=sum(bool(e["flags"]) for e in data["runs"]), demo=any(r["demo"] for r in runs), crashes=crashes,
            any_reference=any(r["reference"] for r in runs))
        path = output_dir / "qc" / "index.html"
        write_bytes_atomic(html.encode("utf-8"), path)
    return path
