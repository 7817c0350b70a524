"""The group level: dataset tables, outlier flags and accuracy from what the participant level wrote.

Discovers the inputs exactly as the participant level does (same labels, filters and work
folder) and reconciles them with what is on disk: every selected input is done, failed, missing
or outdated (:func:`reconcile`), so a killed or partial participant level never passes for a
complete one. Reads run records (mask sidecars), crash files and, with ``--ground-truth``, manual
masks; never runs the model. Robust to participants processed by separate jobs and to reruns.

Writes ``OUT/group_bold.tsv`` (one row per input image), ``OUT/group_bold.json`` (summary),
with ground truth ``OUT/group_accuracy_slices.tsv`` (per-slice Dice), and the dataset QC report.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from . import __version__
from . import derivatives as deriv
from . import qc
from .accuracy import compare
from .atomic import locked, write_json_atomic, write_tsv_atomic
from .confidence import DESCRIPTION as CONFIDENCE_DESCRIPTION
from .derivatives import printable
from .errors import NothingSelected
from .layout import Run
from .metrics import OUTLIER_MAD_FLOOR, OUTLIER_MIN_RUNS, OUTLIER_Z
from .model import sha256_file
from .options import Options

log = logging.getLogger("episeg_bids")

#: Entities that name a derivative, not the acquisition: ignored when matching ground truth.
DERIVATIVE_ENTITIES = ("space", "label", "desc", "res", "den")
OUTLIER_COLUMNS = {"volume_mm3": "cord volume", "mean_area_mm2": "mean cord area"}
ENTITY_COLUMNS = (("sub", "participant_id"), ("ses", "session_id"), ("task", "task"), ("acq", "acq"),
                  ("ce", "ce"), ("rec", "rec"), ("dir", "dir"), ("run", "run"), ("echo", "echo"), ("part", "part"))


def source_entities(input_path: str) -> dict[str, str]:
    """Entities of an input file from its name (also of names that are not strictly BIDS)."""
    return deriv.loose_entities(Path(input_path).name)


def done_row(record: deriv.RunRecord) -> dict[str, Any]:
    """The group-table row of a complete run, from its record."""
    metrics, inputs, model = record.metrics, record.inputs, record.model
    return {
        "status": "done",
        **_entity_columns(source_entities(record.input_path or record.mask.name)),
        "input": record.input_path,
        "mask": record.mask_rel,
        "kind": "run" if (inputs.get("VolumesAveraged") or 1) > 1 else "mean",
        "volumes_averaged": inputs.get("VolumesAveraged"),
        **{k: metrics.get(k) for k in ("voxels", "volume_mm3", "mean_area_mm2", "n_slices", "slices_with_cord",
                                       "first_slice", "last_slice", "components", "confidence",
                                       "confidence_worst_slice")},
        "fd_mean_mm": _dict(record.meta.get("Motion")).get("FramewiseDisplacementMeanMM"),
        "fd_max_mm": _dict(record.meta.get("Motion")).get("FramewiseDisplacementMaxMM"),
        "flags": ",".join(str(f.get("code")) for f in record.flags),
        "model": model.get("Name"),
        "model_demo": model.get("IsDemoModel"),
        "model_sha256": ",".join(map(str, _dict(model.get("CheckpointSHA256")).values())),
        "options": json.dumps(record.options, sort_keys=True),
        "date_processed": record.date_processed,
        "error": None,
    }


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def other_row(status: str, input_path: str, error: str, **extra: Any) -> dict[str, Any]:
    """The group-table row of an input that is not done (``failed``, ``missing``, ``outdated``)."""
    return {"status": status, **_entity_columns(source_entities(input_path)), "input": input_path,
            "error": error, **extra}


def _entity_columns(entities: dict[str, str]) -> dict[str, str | None]:
    columns: dict[str, str | None] = {}
    for key, column in ENTITY_COLUMNS:
        value = entities.get(key)
        columns[column] = (f"{key}-{value}" if key in ("sub", "ses") else value) if value else None
    return columns


def input_changed(record: deriv.RunRecord, path: Path) -> bool:
    """True when the input at ``path`` is not the file the record's outputs were made from (size
    and modification time first; the checksum only when they differ)."""
    inputs = record.inputs
    stat = path.stat()
    if (inputs.get("SizeBytes"), inputs.get("MTimeNs")) == (stat.st_size, stat.st_mtime_ns):
        return False
    return inputs.get("SHA256") != sha256_file(path)


@dataclass
class Reconciliation:
    """The participant-level state of every selected input, and outputs whose input is gone."""

    rows: list[dict[str, Any]]
    orphaned: list[str]
    unreadable: list[str]


def reconcile(output_dir: Path, bids_dir: Path, runs: list[Run]) -> Reconciliation:
    """Each selected input is ``done`` (outputs complete, made from this very input), ``failed``
    (its newest attempt left a crash file), ``outdated`` (outputs made from another version of the
    file) or ``missing`` (never processed, or its outputs are incomplete). Outputs of inputs that
    no longer exist are ``orphaned``: reported, never tabulated as results."""
    records, unreadable = deriv.run_records(output_dir)
    complete = {r.input_path: r for r in records if r.input_path and r.complete}
    partial = {r.input_path: r for r in records if r.input_path and not r.complete}
    crashes = {c.input: c for c in deriv.unresolved_crashes(output_dir, {k: r.date_processed for k, r in complete.items()})}
    rows = []
    for run in runs:
        record = complete.get(run.relpath)
        crash = crashes.get(run.relpath)
        if crash is not None:
            rows.append(other_row("failed", run.relpath, crash.error, crash_file=crash.crash_file))
        elif record is None:
            missing = partial[run.relpath].missing_outputs() if run.relpath in partial else []
            rows.append(other_row("missing", run.relpath,
                                  f"outputs incomplete ({len(missing)} file(s) missing, e.g. {missing[0]}); run the "
                                  "participant level again" if missing else "not processed; run the participant level"))
        elif input_changed(record, run.path):
            rows.append(other_row("outdated", run.relpath, "the input changed after its outputs were made; run the "
                                                           "participant level again", mask=record.mask_rel))
        else:
            rows.append(done_row(record))
    selected = {run.relpath for run in runs}
    orphaned = sorted(r.mask_rel for r in records
                      if r.input_path and r.input_path not in selected and not (bids_dir / r.input_path).exists())
    return Reconciliation(rows, orphaned, unreadable)


def robust_z(values: list[float | None]) -> list[float | None]:
    """Modified z-scores ``0.6745 (x − median) / MAD`` (None stays None; all None with fewer than
    :data:`OUTLIER_MIN_RUNS` values). The MAD is at least :data:`OUTLIER_MAD_FLOOR` × |median|, so a
    tight cluster (runs of one participant, say) does not turn ordinary differences into outliers:
    with the floor at 5 %, only values more than about 26 % from the median can reach |z| > 3.5.

    Examples
    --------
    >>> robust_z([1.0, 2.0, 3.0, None, 4.0, 5.0, 100.0])
    [-1.1242, -0.6745, -0.2248, None, 0.2248, 0.6745, 43.3928]
    """
    present = [v for v in values if v is not None]
    if len(present) < OUTLIER_MIN_RUNS:
        return [None for _ in values]
    median = statistics.median(present)
    mad = max(statistics.median(abs(v - median) for v in present), OUTLIER_MAD_FLOOR * abs(median))
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


def summarise(rows: list[dict[str, Any]], with_accuracy: bool, orphaned: list[str] | None = None) -> dict[str, Any]:
    """The group JSON: counts, inputs not done, flags, metric and accuracy statistics, models used."""
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
        "Runs": {"total": len(rows), "done": len(done),
                 **{status: sum(r["status"] == status for r in rows) for status in NOT_DONE}},
        "NotDone": [{"input": r["input"], "status": r["status"], "error": r["error"], "crash_file": r.get("crash_file")}
                    for r in rows if r["status"] != "done"],
        "Orphaned": list(orphaned or []),
        "FlagCounts": flags,
        "Metrics": {c: describe([r.get(c) for r in done]) for c in ("volume_mm3", "mean_area_mm2", "slices_with_cord",
                                                                    "confidence", "fd_mean_mm")},
        "ConfidenceDefinition": CONFIDENCE_DESCRIPTION,
        "Models": sorted({f"{r['model']} ({'DEMO' if r['model_demo'] else r['model_sha256'][:12]})" for r in done}),
        "OutlierRule": f"|modified z| > {OUTLIER_Z} for {', '.join(OUTLIER_COLUMNS)}, the MAD floored at "
                       f"{OUTLIER_MAD_FLOOR:g} x |median| (needs at least {OUTLIER_MIN_RUNS} runs)",
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


NOT_DONE = ("failed", "missing", "outdated")


def group(options: Options) -> int:
    """Write the group tables and the dataset report; returns the exit code (1 when any selected
    input is failed, missing or outdated).

    Raises
    ------
    NothingSelected
        When the labels and filters select no input.
    """
    from .participant import discover

    output_dir, ground_truth = options.output_dir, options.ground_truth
    found = discover(options)
    if not found.runs:
        raise NothingSelected(f"no input of {options.bids_dir} matches the labels and filters; check them")
    state = reconcile(output_dir, options.bids_dir, found.runs)
    rows = state.rows
    for problem in state.unreadable:
        log.warning("%s; left out", problem)
    for mask in state.orphaned:
        log.warning("%s: its input is no longer in the dataset; left out of the tables (delete it or restore "
                    "the input)", mask)
    add_outlier_flags(rows)
    slices = accuracy_rows(output_dir, rows, ground_truth) if ground_truth else []
    tables = ("group_bold.tsv", "group_bold.json", "group_accuracy_slices.tsv")
    with locked(deriv.lock_path(output_dir, "group")):
        deriv.remove_temporaries(output_dir, list(tables))
        write_tsv_atomic(table_rows(rows), output_dir / tables[0])
        write_json_atomic(summarise(rows, ground_truth is not None, state.orphaned), output_dir / tables[1])
        if slices:
            write_tsv_atomic(slices, output_dir / tables[2])
        else:  # an accuracy table of an earlier group level would no longer match
            (output_dir / tables[2]).unlink(missing_ok=True)
    _write_report(output_dir, rows)
    counts = {status: sum(r["status"] == status for r in rows) for status in ("done", *NOT_DONE)}
    for row in rows:
        if row["status"] != "done":
            log.error("%s %s: %s", row["status"].upper(), printable(row["input"]), printable(row["error"]))
    log.info("group level: %d input(s): %s; tables in %s", len(rows),
             ", ".join(f"{n} {status}" for status, n in counts.items()), output_dir)
    if counts["done"] == 0:
        log.error("no input has complete outputs in %s; run the participant level first", output_dir)
    return 1 if any(counts[s] for s in NOT_DONE) else 0


def _write_report(output_dir: Path, rows: list[dict[str, Any]]) -> None:
    """The dataset QC report and every subject page, with the group columns, outlier flags and,
    for runs with a manual mask on their grid, that mask (drawn with ours, per-slice Dice)."""
    extra = {}
    for row in rows:
        if row["status"] != "done":
            continue
        columns = {k: row.get(k) for k in ("z_volume_mm3", "z_mean_area_mm2", *ACCURACY_COLUMNS) if row.get(k) is not None}
        extra[row["mask"]] = {"columns": columns, "flags": row.get("group_flags", [])}
        if row.get("ground_truth") and not row.get("accuracy_error"):
            extra[row["mask"]]["ground_truth"] = str(Path(row["ground_truth"]).resolve())
    try:  # the report redraws the figures of runs with a manual mask, then the pages link them
        qc.write_dataset_report(output_dir, extra=extra)
    except Exception as err:  # the tables are written; a report problem must not fail the group level
        log.warning("QC report not written (%s: %s)", type(err).__name__, err)
    for subject in sorted({r["participant_id"][4:] for r in rows if r["status"] == "done" and r["participant_id"]}):
        try:
            qc.write_subject_page(output_dir, subject, extra=extra)
        except Exception as err:  # one page must not cost the others or the tables
            log.warning("QC page of %s not written (%s: %s)", printable(subject), type(err).__name__, err)
