"""The participant level: the only place that knows the order of the stages.

validate → discover (``layout``) → locate the model → for each run: volume (``epi``) →
segment (``segment``, predictor built once) → post-process → metrics → write (``derivatives``).
A failing run writes a crash file and the others go on.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from . import __version__, CODE_URL
from . import derivatives as deriv
from . import epi, layout, metrics, model, postprocess, qc, segment, validate
from .errors import EpisegError, InputImageError, NothingSelected, ValidationFailed
from .options import Options
from .progress import Progress

log = logging.getLogger("episeg_bids")

SOFTWARE = ("nnunetv2", "torch", "numpy", "scipy", "nibabel", "pybids")


@dataclass
class RunResult:
    """What happened to one input: ``status`` is ``'done'``, ``'skipped'`` or ``'failed'``."""

    run: layout.Run
    status: str
    seconds: float = 0.0
    message: str = ""
    crash_file: Path | None = None


@dataclass
class Summary:
    """All run results and the wall time of the participant level."""

    results: list[RunResult] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def failed(self) -> list[RunResult]:
        return [r for r in self.results if r.status == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def lines(self) -> list[str]:
        """Closing summary for the log: counts, time, then one line per failed run."""
        head = (f"episeg-bids: {self.count('done')} done, {self.count('skipped')} skipped, "
                f"{self.count('failed')} failed in {self.seconds:.0f} s")
        return [head] + [f"FAILED {r.run.relpath}: {r.message}" + (f" (crash file {r.crash_file})" if r.crash_file else "")
                         for r in self.failed]


def software_versions() -> dict[str, str]:
    """Versions of Python, episeg-bids and the packages that shape the result."""
    versions = {"python": platform.python_version(), "episeg-bids": __version__}
    for name in SOFTWARE:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def container_info() -> dict[str, str] | None:
    """``{'Type', 'Tag'}`` when running in the project's Docker or Apptainer image."""
    kind = os.environ.get("EPISEG_CONTAINER_TYPE")
    if not kind and (os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER")):
        kind = "singularity"
    if not kind:
        return None
    tag = os.environ.get("EPISEG_CONTAINER_TAG") or os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER") or ""
    return {"Type": kind, "Tag": tag}


def check_dataset(options: Options) -> None:
    """Run the BIDS validator unless skipped; log expected findings, raise on real errors.

    Raises
    ------
    ValidationFailed
        With the first errors in the message (exit code 16).
    """
    if options.skip_bids_validation:
        log.info("BIDS validation skipped (--skip-bids-validation)")
        return
    findings = validate.run_validator(options.bids_dir)
    for code, reason in validate.EXPECTED_CODES.items():
        n = sum(f.code == code for f in findings)
        if n:
            log.info("validator: %d x %s accepted (%s)", n, code, reason)
    errors = validate.blocking_errors(findings)
    if errors:
        for finding in errors:
            log.error("validator: %s", finding.line())
        raise ValidationFailed(
            f"{options.bids_dir} failed BIDS validation with {len(errors)} error(s), first: "
            f"{errors[0].line()}; fix the dataset or pass --skip-bids-validation"
        )


def select_runs(options: Options) -> list[layout.Run]:
    """Discover the runs selected by labels and filters.

    Raises
    ------
    NothingSelected
        When nothing is selected (exit code 18).
    """
    filters = layout.load_filters(options.bids_filter_file)
    subjects = list(options.participant_labels) if options.participant_labels else None
    bids_layout = layout.build_layout(options.bids_dir, options.work_dir, subjects)
    missing = layout.missing_subjects(bids_layout, subjects)
    for label in missing:
        log.warning("participant %s is not in %s", label, options.bids_dir)
    runs = layout.find_runs(
        bids_layout, filters, subjects=subjects,
        sessions=list(options.session_labels) if options.session_labels else None,
        tasks=list(options.task_labels) if options.task_labels else None,
    )
    if not runs:
        raise NothingSelected(
            f"no 4D _bold run or 3D mean EPI in {options.bids_dir} matches the participant/session/"
            "task labels and the filters; check them (and the filter file's entities)"
        )
    return runs


class Context:
    """What every run shares: options, model spec, the predictor (built on first use)."""

    def __init__(self, options: Options, spec: model.ModelSpec):
        self.options = options
        self.spec = spec
        self.device = model.select_device(options.device)
        self.orientation = model.image_orientation(spec)
        self.fingerprint = options.fingerprint(spec.checkpoint_sha256)
        self.versions = software_versions()
        self._predictor = None

    @property
    def predictor(self):
        if self._predictor is None:
            started = time.monotonic()
            self._predictor = model.load_predictor(
                self.spec, device=self.device, tta=self.options.tta, threads=self.options.omp_nthreads)
            log.info("model %s loaded on %s in %.1f s%s", self.spec.trainer_folder.name, self.device,
                     time.monotonic() - started, " (DEMO model, not EPISeg)" if self.spec.is_demo else "")
        return self._predictor


def is_complete(outputs: deriv.RunOutputs, run: layout.Run, context: Context) -> bool:
    """True when every output of the run exists and was made with the same model and options."""
    needed = [outputs.mask, outputs.morph, deriv.RunOutputs.sidecar(outputs.mask)]
    if run.kind == "run":
        needed += [outputs.mean, deriv.RunOutputs.sidecar(outputs.mean)]
    if context.options.save_probseg:
        needed += [outputs.probseg, deriv.RunOutputs.sidecar(outputs.probseg)]
    if not all(p.is_file() for p in needed):
        return False
    try:
        sidecar = json.loads(deriv.RunOutputs.sidecar(outputs.mask).read_text())
    except (OSError, ValueError):
        return False
    if sidecar.get("Fingerprint") != context.fingerprint:
        log.info("%s: outputs were made with another model or options; recomputing", run.name)
        return False
    return True


def process_run(run: layout.Run, context: Context) -> None:
    """Segment one input and write its derivatives; raises on any failure."""
    if run.kind == "invalid":
        raise InputImageError(run.problem or f"{run.path.name} cannot be segmented")
    options = context.options
    timings: dict[str, float] = {}
    started = time.monotonic()
    volume = epi.read_volume(run.path)
    timings["read_s"] = time.monotonic() - started

    started = time.monotonic()
    need_probability = options.save_probseg or options.thr is not None
    seg = segment.segment_volume(
        context.predictor, volume.data, volume.affine, volume.zooms_mm,
        orientation=context.orientation, probabilities=need_probability)
    mask, steps = postprocess.postprocess(
        seg.mask, probability=seg.foreground_probability, thr=options.thr, largest=options.largest,
        holes=options.fill_holes, remove_small=options.remove_small, zooms_mm=volume.zooms_mm)
    timings["segment_s"] = time.monotonic() - started

    rows = metrics.per_slice(mask, volume.affine, volume.zooms_mm)
    summary = metrics.summary(mask, volume.affine, volume.zooms_mm, rows)
    flags = metrics.quality_flags(mask, volume.affine, rows, summary)
    for item in flags:
        log.warning("%s: %s", run.name, item["message"])
    write_outputs(run, context, Segmented(volume, mask, seg.foreground_probability, steps, summary, rows,
                                          flags, timings))


@dataclass
class Segmented:
    """What :func:`process_run` computed for one input, ready to be written."""

    volume: epi.EpiVolume
    mask: np.ndarray
    probability: np.ndarray | None
    steps: list[str]
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    flags: list[dict[str, Any]]
    timings: dict[str, float]


def provenance(context: Context) -> dict[str, Any]:
    """Keys every sidecar of a run shares: who made it, with which software versions."""
    return {
        "GeneratedBy": [{"Name": "episeg-bids", "Version": __version__, "CodeURL": CODE_URL}],
        "PipelineVersions": context.versions,
    }


def mean_sidecar(run: layout.Run, volume: epi.EpiVolume, tr_s: float) -> dict[str, Any]:
    """Sidecar of the temporal mean (a ``_bold`` file: TaskName and RepetitionTime required)."""
    return {
        "Description": f"Temporal mean of {volume.n_volumes} volumes (NaN/Inf samples excluded), "
                       "stored as one volume (X, Y, Z, 1)",
        "Sources": [deriv.bids_uri(run.relpath)],
        "TaskName": run.metadata.get("TaskName", run.entities.get("task", "")),
        "RepetitionTime": tr_s,
        "SkullStripped": False,
        "VolumesAveraged": volume.n_volumes,
        "NonFiniteValues": volume.nonfinite,
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
    }


def mask_sidecar(run: layout.Run, context: Context, result: Segmented, sources: list[str],
                 figures: dict[str, str] | None) -> dict[str, Any]:
    """Sidecar of the mask: inputs, model, options, versions, metrics, flags, timing."""
    volume, options = result.volume, context.options
    demo = " (DEMO model: not the published EPISeg weights)" if context.spec.is_demo else ""
    return {
        "Description": "Spinal-cord mask by the EPISeg nnUNetv2 model, run as sct_deepseg sc_epi" + demo,
        "Type": "ROI",
        "Label": "SC",
        "Manual": False,
        "Sources": sources,
        "SpatialReference": deriv.bids_uri(run.relpath),
        "Model": context.spec.describe(),
        "Options": {**options.segmentation_options(), "device": context.device,
                    "save_probseg": options.save_probseg},
        "PostProcessing": result.steps,
        "Input": {
            "Path": run.relpath,
            "SHA256": model.sha256_file(run.path),
            "Kind": "4D run (temporal mean segmented)" if volume.is_mean_of_run else "3D mean EPI",
            "Shape": list(run.shape),
            "VoxelSizeMM": [round(z, 6) for z in volume.zooms_mm],
            "Orientation": "".join(nib.aff2axcodes(volume.affine)),
            "VolumesAveraged": volume.n_volumes,
            "NonFiniteValues": volume.nonfinite,
        },
        "Metrics": result.summary,
        "Flags": result.flags,
        "Figures": figures,
        "Notes": volume.notes,
        "RunTimeSeconds": {k: round(v, 3) for k, v in result.timings.items()},
        "Fingerprint": context.fingerprint,
        "DateProcessed": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def write_outputs(run: layout.Run, context: Context, result: Segmented) -> None:
    """Write mean, probseg, per-slice table and figures, then the mask and its sidecar (last:
    the sidecar marks a complete run)."""
    options, volume = context.options, result.volume
    outputs = deriv.run_outputs(options.output_dir, run.relpath)
    sources = [deriv.bids_uri(run.relpath)]
    if volume.is_mean_of_run:
        tr_s = run.metadata.get("RepetitionTime") or volume.repetition_time_s
        if not tr_s:
            volume.notes.append("RepetitionTime unknown (no sidecar value, none in the header): 1 s written")
        tr_s = float(tr_s or 1.0)
        deriv.write_nifti_atomic(volume.data[..., None], volume.affine, outputs.mean, dtype=np.float32,
                                 zooms=(*volume.zooms_mm, tr_s))
        deriv.write_json_atomic({**provenance(context), **mean_sidecar(run, volume, tr_s)},
                                deriv.RunOutputs.sidecar(outputs.mean))
        sources = ["bids::" + outputs.mean.relative_to(options.output_dir).as_posix(), *sources]
    if not options.save_probseg:  # a probability map of an earlier run would no longer match
        for stale in (outputs.probseg, deriv.RunOutputs.sidecar(outputs.probseg)):
            stale.unlink(missing_ok=True)
    elif result.probability is not None:
        deriv.write_nifti_atomic(result.probability, volume.affine, outputs.probseg, dtype=np.float32)
        deriv.write_json_atomic({
            **provenance(context),
            "Description": "Spinal-cord probability (1 - softmax of the background class), 0-1, "
                           "before post-processing",
            "Sources": sources, "SpatialReference": deriv.bids_uri(run.relpath), "Label": "SC",
            "Model": context.spec.describe(),
        }, deriv.RunOutputs.sidecar(outputs.probseg))
    mask_uri = "bids::" + outputs.mask.relative_to(options.output_dir).as_posix()
    deriv.write_tsv_atomic(result.rows, outputs.morph)
    deriv.write_json_atomic(morph_sidecar(mask_uri, result.summary["slice_axis"]), deriv.RunOutputs.sidecar(outputs.morph))
    try:
        figures = qc.write_run_figures(options.output_dir, outputs.mask, volume.data, result.mask, volume.affine,
                                       volume.zooms_mm, result.rows, flags=result.flags)
    except Exception as err:  # a figure must never cost the mask; the report rebuilds missing ones
        log.warning("%s: QC figures not written (%s: %s)", run.name, type(err).__name__, err)
        figures = None
    deriv.write_nifti_atomic(result.mask, volume.affine, outputs.mask, dtype=np.uint8)
    deriv.write_json_atomic({**provenance(context), **mask_sidecar(run, context, result, sources, figures)},
                            deriv.RunOutputs.sidecar(outputs.mask))


def write_crash_file(run: layout.Run, options: Options, error: BaseException) -> Path | None:
    """Traceback, input and options of a failed run under ``OUT/sub-<label>/log/``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = deriv.crash_file_path(options.output_dir, run.subject, run.name, stamp)
    text = "\n".join([
        f"episeg-bids {__version__} crash report, {stamp} UTC",
        f"input: {run.relpath}",
        f"path: {run.path}",
        f"error: {error}",
        "",
        "".join(traceback.format_exception(type(error), error, error.__traceback__)),
        "options:",
        json.dumps(options.as_dict(), indent=2, sort_keys=True),
        "",
    ])
    try:
        deriv.write_bytes_atomic(text.encode(), path)
    except OSError as err:
        log.error("cannot write crash file %s (%s)", path, err)
        return None
    return path


def participant(options: Options) -> Summary:
    """Segment every selected run; one failing run never stops the others.

    Raises
    ------
    EpisegError
        Before any run is processed: validation failed, nothing selected, no model, output
        folder not writable.
    """
    clock = time.monotonic()
    check_dataset(options)
    runs = select_runs(options)
    log.info("%d input(s) selected: %d 4D run(s), %d 3D mean(s), %d unusable", len(runs),
             sum(r.kind == "run" for r in runs), sum(r.kind == "mean" for r in runs),
             sum(r.kind == "invalid" for r in runs))
    spec = model.locate_model(options.model_dir)
    if spec.is_demo:
        log.warning("using the DEMO model %s: masks are for testing only; install the EPISeg "
                    "weights with 'episeg-bids install-model'", spec.trainer_folder)
    deriv.write_dataset_files(options.output_dir, options.bids_dir, container_info())
    context = Context(options, spec)
    summary = Summary()
    progress = Progress(len(runs))
    for run in runs:
        started = time.monotonic()
        outputs = deriv.run_outputs(options.output_dir, run.relpath)
        if not options.overwrite and run.kind != "invalid" and is_complete(outputs, run, context):
            summary.results.append(RunResult(run, "skipped", message="outputs complete"))
            progress.step(run.name, "skipped (complete)")
            continue
        try:
            process_run(run, context)
        except Exception as error:  # one bad run must not stop the others
            crash = write_crash_file(run, options, error)
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            if not isinstance(error, EpisegError):
                message = f"{type(error).__name__}: {message}"
            log.error("%s: %s", run.relpath, message)
            summary.results.append(RunResult(run, "failed", time.monotonic() - started, message, crash))
            progress.step(run.name, "FAILED")
            continue
        summary.results.append(RunResult(run, "done", time.monotonic() - started))
        progress.step(run.name, "done")
    write_qc_pages(options.output_dir, sorted({r.run.subject for r in summary.results}))
    summary.seconds = time.monotonic() - clock
    return summary


def write_qc_pages(output_dir: Path, subjects: list[str]) -> None:
    """The subject pages of this job and the dataset report, rebuilt from every result on disk;
    a failure is logged, never fatal."""
    try:
        for subject in subjects:
            qc.write_subject_page(output_dir, subject)
        log.info("QC report: %s", qc.write_dataset_report(output_dir))
    except Exception as err:  # the masks are written; a report problem must not fail the run
        log.warning("QC pages not written (%s: %s)", type(err).__name__, err)
