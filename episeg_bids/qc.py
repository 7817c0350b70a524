"""Quality-control report: per-run figures, one page per subject, one dataset report.

Public API (the pipeline and the group level call these):

- :func:`write_run_figures` — the figures of one run under ``OUT/sub-<label>/figures/``;
- :func:`write_subject_page` — ``OUT/sub-<label>.html``, every run of the subject;
- :func:`write_dataset_report` — ``OUT/qc/index.html``, every run on disk in a sortable,
  searchable table beside an image viewer, with keyboard ratings kept in the browser.

Pages are built only from what is on disk (mask sidecars and masks; figures, rebuilt from the mask
and the segmented image when missing), so separate jobs each add their runs; a file lock (``OUT/qc/.lock``) and atomic renames keep concurrent writers
from corrupting them. Pages are self-contained (CSS and JS inlined, no network, open with
``file://``). Everything that comes from the dataset is escaped (Jinja2 autoescape; JSON for the
scripts in a ``<script type="application/json">`` block with ``<``, ``>``, ``&`` escaped), and a
Content-Security-Policy allows only the page's own scripts (by hash), so injected markup cannot run.
Figures are drawn by :mod:`episeg_bids.qc_figures`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlparse

import nibabel as nib
import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from . import __version__
from . import derivatives as deriv
from . import epi, metrics
from .atomic import json_text, locked, write_bytes_atomic, write_json_atomic
from .derivatives import FIGURES, MASK_END, figure_paths
from .metrics import OUTLIER_MIN_RUNS, OUTLIER_Z
from .qc_figures import run_figures

log = logging.getLogger("episeg_bids")

#: Meaning of every automatic flag code: those of the input reader, then those of the mask.
FLAG_LEGEND = {**epi.FLAG_LEGEND, **metrics.FLAG_HELP}
GROUP_FLAG_HELP = (f"Group level: the run is an outlier of the dataset, |modified z| > {OUTLIER_Z} (median and "
                   f"MAD over at least {OUTLIER_MIN_RUNS} runs; Iglewicz & Hoaglin 1993).")
ORIENTATION_NOTE = (
    "Axial tiles: anterior up, patient left on the viewer's left (as SCT), most superior slice first, numbered "
    "with the slice's voxel index in the input file; a 30 mm field of view centred on the slice's largest island "
    "of mask voxels (slices without cord: amber dashed frame, centred on the nearest slice with cord). Sagittal: "
    "superior up, anterior on the left, through the mask's median left-right position. Bars: cord area per slice, "
    "aligned with the sagittal rows, plausible range shaded green.")
ENTITY_KEYS = ("sub", "ses", "task", "run")


def _jinja() -> Environment:
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
                      zooms_mm: tuple, rows: list[dict], *, flags: list[dict] | None = None) -> dict[str, str]:
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

    Returns
    -------
    dict
        ``{'mosaic', 'sagittal', 'area'}`` → path relative to ``output_dir`` (POSIX).
    """
    figures = run_figures(image, mask, affine, zooms_mm, rows, flags)
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


def rebuild_figures(record: deriv.RunRecord) -> dict[str, str] | None:
    """Figures of a run from its files on disk (mask, mean or 3D source); None when the segmented
    image is not found (a 4D source without its mean is not averaged again here)."""
    mask_img = nib.load(record.mask)
    mask = np.asarray(mask_img.dataobj)
    image = _segmented_image(record, mask.shape)
    if image is None:
        return None
    zooms = tuple(float(z) for z in record.inputs.get("VoxelSizeMM") or mask_img.header.get_zooms()[:3])
    rows = metrics.per_slice(mask, mask_img.affine, zooms)
    return write_run_figures(record.output_dir, record.mask, image, mask, mask_img.affine, zooms, rows,
                             flags=record.flags)


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


def collect_runs(output_dir: Path, subject: str | None = None, *, rebuild: bool = True) -> list[dict[str, Any]]:
    """One plain dict per run record on disk (optionally of one subject), sorted by path.

    Missing figures are rebuilt from the files on disk when ``rebuild`` (and possible).
    """
    runs = []
    records, problems = deriv.run_records(output_dir, subject)
    for problem in problems:
        log.warning("%s; left out of the QC report", problem)
    for record in records:
        paths = figure_paths(output_dir, record.mask)
        figures = {k: p.relative_to(output_dir).as_posix() for k, p in paths.items()}
        missing = ""
        if not all(p.is_file() for p in paths.values()):
            built = None
            if rebuild:
                try:
                    built = rebuild_figures(record)
                except Exception as err:  # a broken file must not stop the report
                    log.warning("figures of %s cannot be rebuilt (%s)", record.mask_rel, err)
            missing = "" if built else "figures missing and the segmented image was not found"
        runs.append(_run_entry(record, None if missing else figures, missing))
    return runs


def _task_name(record: deriv.RunRecord) -> str | None:
    """TaskName: recorded with the input, else from the mean's sidecar (outputs of older versions)."""
    if isinstance(record.inputs.get("TaskName"), str):
        return record.inputs["TaskName"]
    mean = record.segmented_image(None)
    value = (_read_json(deriv.sidecar_of(mean)) or {}).get("TaskName") if mean else None
    return value if isinstance(value, str) else None


def _run_entry(record: deriv.RunRecord, figures: dict[str, str] | None, missing: str) -> dict[str, Any]:
    """What the pages show of one run, as plain values (strings are escaped by the templates)."""
    meta, inputs, model, m = record.meta, record.inputs, record.model, record.metrics
    mask_rel, subject_dir = record.mask_rel, record.subject_dir
    name = Path(mask_rel).name
    entities = deriv.loose_entities(Path(str(inputs.get("Path") or name)).name)
    task_name = _task_name(record)
    flags = [{"code": str(f.get("code", "")), "message": str(f.get("message", "")), "source": "run",
              "slices": list(f.get("slices") or [])} for f in record.flags]
    n_slices, covered = m.get("n_slices"), m.get("slices_with_cord")
    return {
        "anchor": _anchor(name), "mask": mask_rel, "name": name, "subject_dir": subject_dir,
        "subject": subject_dir[4:], "session": entities.get("ses"), "task": entities.get("task"),
        "run": entities.get("run"),
        "other": " ".join(f"{k}-{v}" for k, v in entities.items() if k not in ENTITY_KEYS) or None,
        "input": inputs.get("Path"), "task_name": task_name,
        "volume_mm3": m.get("volume_mm3"), "mean_area_mm2": m.get("mean_area_mm2"), "voxels": m.get("voxels"),
        "slices_with_cord": covered, "n_slices": n_slices, "components": m.get("components"),
        "slices": f"{_text(covered)}/{_text(n_slices)}", "flags": flags, "figures": figures, "missing": missing,
        "demo": bool(model.get("IsDemoModel")), "model": model.get("Name"), "date": meta.get("DateProcessed"),
        "metrics": [("Cord volume", f"{_text(m.get('volume_mm3'))} mm³"), ("Voxels", _text(m.get("voxels"))),
                    ("Slices with cord", f"{_text(covered)} of {_text(n_slices)} (slices {_text(m.get('first_slice'))}"
                                         f"–{_text(m.get('last_slice'))}, voxel axis {_text(m.get('slice_axis'))})"),
                    ("Mean area", f"{_text(m.get('mean_area_mm2'))} mm²"), ("Components", _text(m.get("components")))],
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


def write_subject_page(output_dir: Path, subject: str) -> Path:
    """Write ``OUT/sub-<label>.html``: every run of the subject with its figures, metrics, flags
    and provenance (inputs, model, options, timing, versions). ``subject`` with or without ``sub-``.

    Returns
    -------
    Path
        The page.
    """
    label = _subject_label(subject)
    output_dir = Path(output_dir)
    runs = collect_runs(output_dir, label)
    for run in runs:
        run["figure_hrefs"] = {k: _href(v) for k, v in run["figures"].items()} if run["figures"] else None
    page = output_dir / f"sub-{label}.html"
    html = _jinja().get_template("subject.html").render(
        **_page_common(f"sub-{label}"), **_inline_assets(("qc.css",), ("qc_subject.js",)),
        subject=label, runs=runs, legend=_legend([r["flags"] for r in runs]), demo=any(r["demo"] for r in runs),
        crashes=_crash_files(output_dir, f"sub-{label}"), index_href="qc/index.html")
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


def _load_extra(output_dir: Path, extra: dict | None) -> tuple[dict, str | None]:
    """``extra`` (and keep it in ``qc/group_extra.json``) or, when None, the last one kept there,
    so a participant job after the group level does not drop the group columns."""
    path = output_dir / "qc" / "group_extra.json"
    if extra is not None:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        write_json_atomic({"Date": stamp, "extra": extra}, path)
        return extra, stamp
    kept = _read_json(path)
    if kept and isinstance(kept.get("extra"), dict):
        return kept["extra"], kept.get("Date")
    return {}, None


#: Table columns of the dataset report: key, header, numeric (columns empty for every run are left out).
COLUMNS = (("subject", "Subject", False), ("session", "Session", False), ("task", "Task", False),
           ("run", "Run", False), ("flag_codes", "Flags", False), ("volume_mm3", "Vol. mm³", True),
           ("slices", "Slices", False), ("mean_area_mm2", "Area mm²", True), ("components", "Comp.", True),
           ("other", "Other entities", False))


def _index_data(output_dir: Path, runs: list[dict[str, Any]], extra: dict, extra_date: str | None) -> dict[str, Any]:
    """The JSON the dataset report's script reads: columns, runs, dataset key."""
    extra_keys: list[str] = []
    for item in extra.values():
        extra_keys += [k for k in (item.get("columns") or {}) if k not in extra_keys]
    entries = []
    for run in runs:
        added = extra.get(run["mask"]) or {}
        flags = run["flags"] + [{"code": str(f.get("code", "")), "message": str(f.get("message", "")),
                                 "source": "group", "slices": []} for f in added.get("flags") or []]
        cells = {key: run.get(key) for key, _, _ in COLUMNS}
        cells["flag_codes"] = " ".join(f["code"] for f in flags)
        cells.update({k: (added.get("columns") or {}).get(k) for k in extra_keys})
        entries.append({
            "key": run["mask"], "title": Path(str(run["input"] or run["name"])).name, "cells": cells,
            "input": run["input"], "task_name": run["task_name"], "flags": flags, "date": run["date"],
            "demo": run["demo"], "missing": run["missing"], "metrics": run["metrics"],
            "figures": {k: _href(v, "../") for k, v in run["figures"].items()} if run["figures"] else None,
            "page": _href(f"sub-{run['subject']}.html", "../") + "#" + run["anchor"],
        })
    columns = [{"key": k, "label": label, "numeric": numeric} for k, label, numeric in COLUMNS
               if k in ("subject", "flag_codes") or any(e["cells"][k] is not None for e in entries)]
    columns += [{"key": k, "label": k, "numeric": True, "extra": True} for k in extra_keys]
    return {"dataset": _dataset_info(output_dir), "columns": columns, "runs": entries, "extra_date": extra_date}


def write_dataset_report(output_dir: Path, extra: dict | None = None) -> Path:
    """Write ``OUT/qc/index.html`` from every mask sidecar on disk (under a file lock).

    Parameters
    ----------
    output_dir : Path
        The derivatives folder.
    extra : dict, optional
        Mask path relative to ``output_dir`` → ``{'columns': {name: value}, 'flags': [{'code',
        'message'}]}``, added by the group level (outliers, accuracy). Kept in
        ``qc/group_extra.json``; when None, the last kept one is shown.

    Returns
    -------
    Path
        The report.
    """
    output_dir = Path(output_dir)
    with _locked(output_dir):
        deriv.remove_temporaries(output_dir / "qc", ["index.html", "group_extra.json"])
        runs = collect_runs(output_dir)
        extra, extra_date = _load_extra(output_dir, extra)
        data = _index_data(output_dir, runs, extra, extra_date)
        crashes = _failures(output_dir, runs)
        html = _jinja().get_template("index.html").render(
            **_page_common("episeg-bids QC"), **_inline_assets(("qc.css",), ("qc_index.js",)),
            data=data, dataset=data["dataset"], n_runs=len(runs), legend=_legend([e["flags"] for e in data["runs"]]),
            n_flagged=sum(bool(e["flags"]) for e in data["runs"]), demo=any(r["demo"] for r in runs), crashes=crashes)
        path = output_dir / "qc" / "index.html"
        write_bytes_atomic(html.encode("utf-8"), path)
    return path
