"""The group level: dataset tables, outlier flags and accuracy from what the participant level wrote.

Reads only the output folder (mask sidecars, per-slice tables, crash files) and, with
``--ground-truth``, manual masks; never runs the model. Robust to participants processed by
separate jobs, to reruns (the newest outputs win) and to failed runs (listed with their error).

Writes ``OUT/group_bold.tsv`` (one row per input image), ``OUT/group_bold.json`` (summary),
with ground truth ``OUT/group_accuracy_slices.tsv`` (per-slice Dice), and the dataset QC report.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from . import __version__
from . import derivatives as deriv
from . import qc
from .accuracy import compare
from .errors import NothingSelected
from .metrics import OUTLIER_MIN_RUNS, OUTLIER_Z
from .options import Options

log = logging.getLogger("episeg_bids")

#: Entities that name a derivative, not the acquisition: ignored when matching ground truth.
DERIVATIVE_ENTITIES = ("space", "label", "desc", "res", "den")
OUTLIER_COLUMNS = {"volume_mm3": "cord volume", "mean_area_mm2": "mean cord area"}
ENTITY_COLUMNS = (("sub", "participant_id"), ("ses", "session_id"), ("task", "task"), ("acq", "acq"),
                  ("ce", "ce"), ("rec", "rec"), ("dir", "dir"), ("run", "run"), ("echo", "echo"), ("part", "part"))


def source_entities(input_path: str) -> dict[str, str]:
    """Entities of an input file from its BIDS name."""
    return deriv.parse_name(Path(input_path).name)[0]


def collect_runs(output_dir: Path) -> list[dict[str, Any]]:
    """One plain row per mask sidecar under ``output_dir`` (status ``done``)."""
    rows = []
    for path in deriv.mask_sidecars(output_dir):
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning("%s cannot be read (%s); skipped", path, err)
            continue
        metrics = meta.get("Metrics", {})
        inputs = meta.get("Input", {})
        model = meta.get("Model", {})
        mask = deriv.mask_of_sidecar(path)
        rows.append({
            "status": "done",
            **_entity_columns(source_entities(inputs.get("Path", mask.name))),
            "input": inputs.get("Path"),
            "mask": mask.relative_to(output_dir).as_posix(),
            "kind": "run" if inputs.get("VolumesAveraged", 1) > 1 else "mean",
            "volumes_averaged": inputs.get("VolumesAveraged"),
            **{k: metrics.get(k) for k in ("voxels", "volume_mm3", "mean_area_mm2", "n_slices", "slices_with_cord",
                                           "first_slice", "last_slice", "components")},
            "flags": ",".join(f["code"] for f in meta.get("Flags", [])),
            "model": model.get("Name"),
            "model_demo": model.get("IsDemoModel"),
            "model_sha256": ",".join(model.get("CheckpointSHA256", {}).values()),
            "options": json.dumps(meta.get("Options", {}), sort_keys=True),
            "date_processed": meta.get("DateProcessed"),
            "error": None,
        })
    return rows


def _entity_columns(entities: dict[str, str]) -> dict[str, str | None]:
    columns: dict[str, str | None] = {}
    for key, column in ENTITY_COLUMNS:
        value = entities.get(key)
        columns[column] = (f"{key}-{value}" if key in ("sub", "ses") else value) if value else None
    return columns


def collect_failures(output_dir: Path, done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (status ``failed``) for crash files whose input has no mask processed after the crash."""
    return [{"status": "failed", **_entity_columns(deriv.loose_entities(Path(crash["input"]).name)), **crash}
            for crash in deriv.unresolved_crashes(output_dir, done)]


def robust_z(values: list[float | None]) -> list[float | None]:
    """Modified z-scores ``0.6745 (x − median) / MAD`` (None stays None; all 0 when MAD is 0;
    all None with fewer than :data:`OUTLIER_MIN_RUNS` values).

    Examples
    --------
    >>> robust_z([1.0, 2.0, 3.0, None, 4.0, 5.0, 100.0])
    [-1.1242, -0.6745, -0.2248, None, 0.2248, 0.6745, 43.3928]
    """
    present = [v for v in values if v is not None]
    if len(present) < OUTLIER_MIN_RUNS:
        return [None for _ in values]
    median = statistics.median(present)
    mad = statistics.median(abs(v - median) for v in present)
    if mad == 0:
        return [None if v is None else 0.0 for v in values]
    return [None if v is None else round(0.6745 * (v - median) / mad, 4) for v in values]


def add_outlier_flags(rows: list[dict[str, Any]], *, threshold: float = OUTLIER_Z) -> None:
    """Add ``z_<column>`` and ``group_flags`` (``outlier_volume_mm3`` ...) to the done rows, in place."""
    done = [r for r in rows if r["status"] == "done"]
    for row in done:
        row["group_flags"] = []
    for column, label in OUTLIER_COLUMNS.items():
        for row, z in zip(done, robust_z([r.get(column) for r in done])):
            row[f"z_{column}"] = z
            if z is not None and abs(z) > threshold:
                row["group_flags"].append({"code": f"outlier_{column}",
                                           "message": f"{label} is a group outlier (robust z = {z:+.1f})"})


def find_ground_truth(folder: Path) -> list[tuple[dict[str, str], Path]]:
    """Manual masks under ``folder``: ds005143's ``*_desc-spinalcordmask`` or ``*_label-SC_mask``
    NIfTI files, at any depth, with their acquisition entities."""
    found = []
    for path in sorted(folder.rglob("sub-*")):
        name = path.name
        if not re.search(r"(_desc-spinalcordmask|_label-SC_mask|_label-SC_desc-[a-zA-Z0-9]+_mask)\.nii(\.gz)?$", name):
            continue
        entities = {k: v for k, v in deriv.loose_entities(name).items() if k not in DERIVATIVE_ENTITIES}
        found.append((entities, path))
    return found


def match_ground_truth(entities: dict[str, str], truths: list[tuple[dict[str, str], Path]]) -> Path | None:
    """The manual mask whose entities are all in ``entities`` (the most specific one, if unique).

    ds005143's masks omit ``rec-MoCoMean``, so a mask matches when its entities are a subset.
    """
    wanted = {k: v for k, v in entities.items() if k not in DERIVATIVE_ENTITIES}
    candidates = [(len(e), p) for e, p in truths if e.items() <= wanted.items() and e.get("sub") == wanted.get("sub")]
    if not candidates:
        return None
    best = max(n for n, _ in candidates)
    chosen = [p for n, p in candidates if n == best]
    return chosen[0] if len(chosen) == 1 else None


def accuracy_rows(output_dir: Path, rows: list[dict[str, Any]], truth_dir: Path) -> list[dict[str, Any]]:
    """Add accuracy columns to the done rows with a matching manual mask; returns per-slice rows."""
    truths = find_ground_truth(truth_dir)
    log.info("%d manual mask(s) found under %s", len(truths), truth_dir)
    slices = []
    for row in rows:
        if row["status"] != "done":
            continue
        truth_path = match_ground_truth(source_entities(row["input"]), truths)
        row["ground_truth"] = truth_path.as_posix() if truth_path else None
        if truth_path is None:
            continue
        pred_img, truth_img = nib.load(output_dir / row["mask"]), nib.load(truth_path)
        if pred_img.shape != truth_img.shape[:3] or not np.allclose(pred_img.affine, truth_img.affine, atol=1e-3):
            row["accuracy_error"] = (f"{truth_path.name} is on another grid ({truth_img.shape}) than the mask "
                                     f"({pred_img.shape}); resample it to the input image")
            continue
        zooms = tuple(float(z) for z in pred_img.header.get_zooms()[:3])
        result = compare(np.asarray(pred_img.dataobj), np.asarray(truth_img.dataobj).reshape(pred_img.shape),
                         pred_img.affine, zooms)
        for item in result.pop("per_slice"):
            slices.append({"participant_id": row["participant_id"], "mask": row["mask"], **item})
        row.update(result)
    return slices


def describe(values: list[float | None]) -> dict[str, float | int | None]:
    """n, mean, median, SD (sample), min, max of the values that are present."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"n": 0, "mean": None, "median": None, "sd": None, "min": None, "max": None}
    return {"n": len(present), "mean": round(statistics.fmean(present), 4),
            "median": round(statistics.median(present), 4),
            "sd": round(statistics.stdev(present), 4) if len(present) > 1 else None,
            "min": round(min(present), 4), "max": round(max(present), 4)}


ACCURACY_COLUMNS = ("dice", "hd95_mm", "dice_common", "hd95_mm_common", "volume_diff_mm3",
                    "volume_diff_percent", "common_slices")


def summarise(rows: list[dict[str, Any]], with_accuracy: bool) -> dict[str, Any]:
    """The group JSON: counts, failures, flags, metric and accuracy statistics, models used."""
    done = [r for r in rows if r["status"] == "done"]
    flags: dict[str, int] = {}
    for row in done:
        for code in filter(None, (row["flags"] or "").split(",")):
            flags[code] = flags.get(code, 0) + 1
        for item in row.get("group_flags", []):
            flags[item["code"]] = flags.get(item["code"], 0) + 1
    result = {
        "GeneratedBy": {"Name": "episeg-bids", "Version": __version__},
        "Date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "Runs": {"total": len(rows), "done": len(done), "failed": len(rows) - len(done)},
        "Failed": [{"input": r["input"], "error": r["error"], "crash_file": r.get("crash_file")}
                   for r in rows if r["status"] == "failed"],
        "FlagCounts": flags,
        "Metrics": {c: describe([r.get(c) for r in done]) for c in ("volume_mm3", "mean_area_mm2", "slices_with_cord")},
        "Models": sorted({f"{r['model']} ({'DEMO' if r['model_demo'] else r['model_sha256'][:12]})" for r in done}),
        "OutlierRule": f"|modified z| > {OUTLIER_Z} for {', '.join(OUTLIER_COLUMNS)} "
                       f"(needs at least {OUTLIER_MIN_RUNS} runs)",
    }
    if with_accuracy:
        scored = [r for r in done if r.get("dice") is not None or r.get("dice_common") is not None]
        result["Accuracy"] = {"runs_with_ground_truth": len(scored),
                              **{c: describe([r.get(c) for r in scored]) for c in ACCURACY_COLUMNS}}
    return result


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for ``group_bold.tsv``: the same columns for every row, flags as text."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    out = []
    for row in rows:
        flat = {k: row.get(k) for k in keys}
        flat["group_flags"] = ",".join(f["code"] for f in row.get("group_flags", [])) or None
        out.append(flat)
    return out


def group(options: Options) -> int:
    """Write the group tables and the dataset report; returns the exit code (1 if runs failed).

    Raises
    ------
    NothingSelected
        When the output folder holds no participant-level result at all.
    """
    output_dir, ground_truth = options.output_dir, options.ground_truth
    done = collect_runs(output_dir)
    failed = collect_failures(output_dir, done)
    rows = done + failed
    if not rows:
        raise NothingSelected(f"{output_dir} holds no participant-level output; run the participant level first")
    if options.participant_labels:
        wanted = {f"sub-{label}" for label in options.participant_labels}
        rows = [r for r in rows if r["participant_id"] in wanted]
    add_outlier_flags(rows)
    slices = accuracy_rows(output_dir, rows, ground_truth) if ground_truth else []
    deriv.write_tsv_atomic(table_rows(rows), output_dir / "group_bold.tsv")
    deriv.write_json_atomic(summarise(rows, ground_truth is not None), output_dir / "group_bold.json")
    if slices:
        deriv.write_tsv_atomic(slices, output_dir / "group_accuracy_slices.tsv")
    _write_report(output_dir, rows)
    for row in rows:
        if row["status"] == "failed":
            log.error("FAILED %s: %s", row["input"], row["error"])
    log.info("group level: %d run(s), %d failed; tables in %s", len(rows),
             sum(r["status"] == "failed" for r in rows), output_dir)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def _write_report(output_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Every subject page and the dataset QC report, with the group columns and outlier flags."""
    for subject in sorted({r["participant_id"][4:] for r in rows if r["status"] == "done"}):
        qc.write_subject_page(output_dir, subject)
    extra = {}
    for row in rows:
        if row["status"] != "done":
            continue
        columns = {k: row.get(k) for k in ("z_volume_mm3", "z_mean_area_mm2", *ACCURACY_COLUMNS) if row.get(k) is not None}
        extra[row["mask"]] = {"columns": columns, "flags": row.get("group_flags", [])}
    qc.write_dataset_report(output_dir, extra=extra)
