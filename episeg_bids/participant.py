"""The participant level: the only place that knows the order of the stages.

validate → discover (``layout``) → locate the model → for each input, in three overlapping
stages (:mod:`episeg_bids.overlap`: the next input is read and the previous one written while the
network works):

1. open (reader thread): lock the input, name its outputs (``derivatives``), skip it when they are
   complete and up to date, read the volume to segment (``epi``);
2. segment (this thread, which owns the network): ``moco`` (4D runs) → ``segment`` (predictor
   built once) → ``postprocess``; nothing else, so the network never waits for the rest;
3. measure and write (writer thread): ``metrics``, ``confidence`` and the quality flags, then the
   ``derivatives`` files and ``qc`` figures, the mask sidecar last; and a subject's QC page once
   its last input is written.

Everything that can fail for one input happens inside that input's isolation: a failing input
gets a crash file and an error line, and the others go on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import platform
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from . import __version__
from . import derivatives as deriv
from . import confidence, cpus, epi, layout, metrics, moco, model, postprocess, qc, segment, validate
from .atomic import json_text, locked, write_json_atomic, write_tsv_atomic
from .derivatives import printable
from .errors import InputImageError, NothingSelected
from .options import Options
from .overlap import Stop, Work, run_overlapped
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
        """Closing summary for the log: counts, time, then one line per failed input."""
        head = (f"episeg-bids: {self.count('done')} done, {self.count('skipped')} skipped, "
                f"{self.count('failed')} failed in {self.seconds:.0f} s")
        return [head] + [f"FAILED {printable(r.run.relpath)}"
                         + (f" (crash file {printable(str(r.crash_file))})" if r.crash_file else "")
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
    tag = (os.environ.get("EPISEG_CONTAINER_TAG") or os.environ.get("APPTAINER_CONTAINER")
           or os.environ.get("SINGULARITY_CONTAINER") or "")
    return {"Type": kind, "Tag": tag}


def discover(options: Options, *, refresh: bool = False) -> layout.Discovery:
    """The inputs selected by the labels and the filter file (the same for both levels)."""
    return layout.discover(
        options.bids_dir, options.work_dir, layout.load_filters(options.bids_filter_file),
        subjects=list(options.participant_labels) if options.participant_labels else None,
        sessions=list(options.session_labels) if options.session_labels else None,
        tasks=list(options.task_labels) if options.task_labels else None,
        refresh=refresh,
    )


def select_runs(options: Options) -> list[layout.Run]:
    """Discover the inputs to process.

    Raises
    ------
    NothingSelected
        When nothing is selected (exit code 18).
    """
    found = discover(options, refresh=options.overwrite)
    for label in found.missing_subjects:
        log.warning("participant %s is not in %s", label, options.bids_dir)
    if not found.runs:
        raise NothingSelected(
            f"no 4D _bold run or 3D mean EPI in {options.bids_dir} matches the participant/session/"
            "task labels and the filters; check them (and the filter file's entities)"
        )
    return found.runs


def network_threads(omp_nthreads: int | None, nprocs: int | None, available) -> int:
    """CPU threads of the network: ``--omp-nthreads``, else ``--nprocs``, else every CPU this
    process may use (``available()``), never more than ``--nprocs``.

    Examples
    --------
    >>> network_threads(None, None, lambda: 8), network_threads(4, None, lambda: 8), network_threads(4, 2, lambda: 8)
    (8, 4, 2)
    """
    threads = omp_nthreads or nprocs or available()
    return max(1, min(threads, nprocs) if nprocs else threads)


class Context:
    """What every input shares: options, model, device, threads, versions, the predictor (built
    on first use, so a dataset whose inputs are all up to date never loads the network)."""

    def __init__(self, options: Options, spec: model.ModelSpec):
        self.options = options
        self.spec = spec
        self.device = model.select_device(options.device)
        self.threads = network_threads(options.omp_nthreads, options.nprocs, cpus.available_cpus)
        self.orientation = model.image_orientation(spec)
        self.versions = software_versions()
        self.model_description = spec.describe()
        self._predictor = None

    @property
    def predictor(self):
        if self._predictor is None:
            started = time.monotonic()
            self._predictor = model.load_predictor(self.spec, device=self.device, tta=self.options.tta,
                                                   threads=self.threads)
            log.info("model %s loaded on %s (%d CPU thread(s)) in %.1f s%s", self.spec.trainer_folder.name,
                     self.device, self.threads, time.monotonic() - started,
                     " (DEMO model, not EPISeg)" if self.spec.is_demo else "")
        return self._predictor

    def recorded_options(self) -> dict[str, Any]:
        """The options a mask sidecar records (those that can change an output, and the device)."""
        return {**self.options.segmentation_options(), "device": self.device,
                "save_probseg": self.options.save_probseg}


# --- which inputs need work -------------------------------------------------------------------

def input_identity(run: layout.Run, record: deriv.RunRecord | None) -> dict[str, Any]:
    """Path, size, modification time and SHA-256 of an input. The checksum recorded with earlier
    outputs is reused while size and modification time are unchanged; otherwise it is computed."""
    stat = run.path.stat()
    identity = {"Path": run.relpath, "SizeBytes": stat.st_size, "MTimeNs": stat.st_mtime_ns}
    if record is not None:
        old = record.inputs
        if (old.get("SizeBytes"), old.get("MTimeNs")) == (stat.st_size, stat.st_mtime_ns) and old.get("SHA256"):
            return {**identity, "SHA256": old["SHA256"]}
    return {**identity, "SHA256": model.sha256_file(run.path)}


def run_fingerprint(context: Context, run: layout.Run, input_sha256: str) -> str:
    """Hash of everything a run's outputs depend on: the output format, the model's checksums, the
    options that change them, the input's checksum and its sidecar metadata."""
    payload = json_text({
        "format": deriv.FORMAT_VERSION, "model": context.spec.checkpoint_sha256,
        "options": context.options.segmentation_options(), "probseg": context.options.save_probseg,
        "input": input_sha256, "metadata": run.metadata,
    })
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def is_up_to_date(record: deriv.RunRecord | None, fingerprint: str) -> bool:
    """True when the input's outputs are all on disk and were made from this input, with this
    model and these options."""
    return record is not None and record.fingerprint == fingerprint and record.complete


# --- one input ----------------------------------------------------------------------------------

@dataclass
class InputState:
    """What the stages know about one input; the input's lock is held until it is written."""

    outputs: deriv.RunOutputs
    identity: dict[str, Any]
    fingerprint: str
    lock: ExitStack
    started: float
    previous_outputs: set[str] = field(default_factory=set)
    volume: epi.EpiVolume | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Segmented:
    """What was computed for one input, ready to be written."""

    run: layout.Run
    outputs: deriv.RunOutputs
    identity: dict[str, Any]
    fingerprint: str
    volume: epi.EpiVolume
    mask: np.ndarray
    probability: np.ndarray | None
    steps: list[str]
    timings: dict[str, float]
    motion: moco.MotionCorrection | None = None
    motion_slices: np.ndarray | None = None
    previous_outputs: set[str] = field(default_factory=set)
    # filled by measure_input (writer thread)
    summary: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    flags: list[dict[str, Any]] = field(default_factory=list)
    labels: tuple[np.ndarray, int] | None = None
    components: list[dict[str, Any]] | None = None


def open_input(run: layout.Run, context: Context) -> InputState:
    """Stage 1 (reader thread): take the input's lock, name its outputs, stop when they are up to
    date (:class:`~episeg_bids.overlap.Stop`), else read the volume to segment."""
    options = context.options
    started = time.monotonic()
    lock = ExitStack()
    lock.enter_context(locked(deriv.lock_path(options.output_dir, run.relpath)))
    try:
        if run.kind == "invalid":
            raise InputImageError(run.problem or f"{printable(run.path.name)} cannot be segmented")
        outputs = deriv.run_outputs(options.output_dir, run.relpath)
        deriv.remove_run_temporaries(options.output_dir, outputs)
        record = deriv.record_of(options.output_dir, outputs)
        identity = input_identity(run, record)
        fingerprint = run_fingerprint(context, run, identity["SHA256"])
        if not options.overwrite and is_up_to_date(record, fingerprint):
            lock.close()
            raise Stop(RunResult(run, "skipped", message="outputs complete"))
        if record is not None and record.fingerprint != fingerprint:
            log.info("%s: outputs were made from another input, model or options; recomputing", printable(run.name))
        previous = ({rel for kind, rel in record.outputs.items() if not kind.startswith("mask")}
                    if record is not None else set())
        state = InputState(outputs, identity, fingerprint, lock, started, previous)
        state.volume = epi.read_volume(run.path, max_bytes=options.max_image_bytes,
                                       keep_volumes=run.kind == "run" and options.moco == "slicewise")
        state.timings["read_s"] = time.monotonic() - started
        return state
    except BaseException:
        lock.close()
        raise


def segment_input(run: layout.Run, state: InputState, context: Context) -> Segmented:
    """Stage 2 (the calling thread, which owns the network): motion correction, segment,
    post-process; the measures are taken by the writer thread (:func:`measure_input`)."""
    options, volume = context.options, state.volume
    motion = motion_slices = None
    try:
        if volume.volumes is not None:
            motion, motion_slices = correct_motion(run, volume, state.timings, context)
        started = time.monotonic()
        seg = segment.segment_volume(  # the probability is always kept: the confidence score needs it
            context.predictor, volume.data, volume.affine, volume.zooms_mm,
            orientation=context.orientation, probabilities=True)
        mask, steps = postprocess.postprocess(
            seg.mask, probability=seg.foreground_probability, thr=options.thr, largest=options.largest,
            holes=options.fill_holes, remove_small=options.remove_small, zooms_mm=volume.zooms_mm)
        state.timings["segment_s"] = time.monotonic() - started
    except BaseException:
        state.lock.close()
        raise
    return Segmented(run, state.outputs, state.identity, state.fingerprint, volume, mask, seg.foreground_probability,
                     steps, state.timings, motion, motion_slices, state.previous_outputs)


def measure_input(result: Segmented) -> None:
    """Stage 3, first half (writer thread): per-slice rows, summary, confidence, components and
    quality flags of the mask, into ``result``; one warning line per flag."""
    volume, mask = result.volume, result.mask
    started = time.monotonic()
    rows = metrics.per_slice(mask, volume.affine, volume.zooms_mm)
    labels = metrics.label_components(mask)
    summary = metrics.summary(mask, volume.affine, volume.zooms_mm, rows, n_components=labels[1])
    certainty = confidence.confidence_score(result.probability, mask, slice_axis=metrics.slice_axis(volume.affine))
    add_confidence(summary, rows, certainty)
    components = metrics.describe_components(mask, volume.affine, volume.zooms_mm, labels=labels)
    flags = list(volume.flags) + metrics.quality_flags(mask, volume.affine, rows, summary, zooms_mm=volume.zooms_mm,
                                                       components=components)
    if result.motion is not None:
        flags += moco.motion_flags(moco.motion_summary(result.motion, slices=result.motion_slices))
    for item in flags:
        log.warning("%s: %s", printable(result.run.name), item["message"])
    result.rows, result.summary, result.flags = rows, summary, flags
    result.labels, result.components = labels, components
    result.timings["measure_s"] = time.monotonic() - started


#: The confidence figures kept in the mask sidecar's ``Metrics`` (see :mod:`episeg_bids.confidence`).
CONFIDENCE_KEYS = {"confidence": "confidence", "confidence_volume": "confidence_volume",
                   "confidence_worst_slice": "confidence_worst_slice", "worst_slice": "confidence_worst_slice_index",
                   "probability_mass_voxels": "probability_mass_voxels",
                   "expected_false_positive_voxels": "expected_false_positive_voxels",
                   "expected_false_negative_voxels": "expected_false_negative_voxels"}


def add_confidence(summary: dict[str, Any], rows: list[dict[str, Any]], certainty: dict[str, Any]) -> None:
    """Put the confidence score in the metrics summary and each slice's value in its per-slice row."""
    for key, name in CONFIDENCE_KEYS.items():
        summary[name] = certainty.get(key)
    by_slice = {item["slice"]: item["confidence"] for item in certainty.get("per_slice", [])}
    for row in rows:
        row["confidence"] = by_slice.get(row["slice"])


#: Diameter of the cylinder around the cord that motion is estimated in, in mm (sct_fmri_moco's
#: default mask is a 35 mm cylinder around the centreline).
MOCO_ROI_DIAMETER_MM = 35.0


def correct_motion(run: layout.Run, volume: epi.EpiVolume, timings: dict[str, float],
                   context: Context) -> tuple[moco.MotionCorrection, np.ndarray]:
    """Two passes, as SCT's documented path (``sct_fmri_moco``, then ``sct_deepseg`` on the moco
    mean): segment the plain mean, estimate slice-wise motion in a cylinder around that cord, and
    put the motion-corrected mean in ``volume.data`` (the whole run is then released). Returns the
    correction and the slices that had a registration ROI."""
    started = time.monotonic()
    first = segment.segment_volume(context.predictor, volume.data, volume.affine, volume.zooms_mm,
                                   orientation=context.orientation)
    axis = metrics.slice_axis(volume.affine)
    roi = moco.cord_cylinder(first.mask, volume.zooms_mm, axis, diameter_mm=MOCO_ROI_DIAMETER_MM)
    result = moco.motion_correct(volume.volumes, volume.zooms_mm, axis, roi=roi, finite=volume.finite)
    volume.data, volume.volumes, volume.finite = result.mean, None, None
    slices = np.moveaxis(first.mask > 0, axis, 0).reshape(first.mask.shape[axis], -1).any(axis=1)
    summary = moco.motion_summary(result, slices=slices if slices.any() else None)
    timings["moco_s"] = time.monotonic() - started
    log.info("%s: motion corrected (%d volumes; framewise displacement mean %.2f mm, max %.2f mm) in %.1f s",
             printable(run.name), summary["Volumes"], summary["FramewiseDisplacementMeanMM"],
             summary["FramewiseDisplacementMaxMM"], timings["moco_s"])
    return result, (slices if slices.any() else None)


def write_input(state: InputState, result: Segmented, context: Context) -> RunResult:
    """Stage 3 (writer thread): measure, write the outputs, then release the input's lock."""
    try:
        measure_input(result)
        started = time.monotonic()
        write_outputs(result, context)
        result.timings["write_s"] = time.monotonic() - started
    finally:
        state.lock.close()
    message = ""
    if result.motion is not None:
        fd = result.motion.framewise_displacement_mm
        message = f"moco: {fd.size} volumes, FD max {float(fd.max()):.2f} mm"
    return RunResult(result.run, "done", time.monotonic() - state.started, message)


def repetition_time(run: layout.Run, volume: epi.EpiVolume) -> tuple[float | None, list[str]]:
    """The repetition time in seconds: the sidecar's (BIDS), else the header's; and notes on what
    was found (a disagreement, an unusable value)."""
    notes = []
    value = run.metadata.get("RepetitionTime")
    sidecar_tr = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if value is not None and (sidecar_tr is None or not math.isfinite(sidecar_tr) or sidecar_tr <= 0):
        notes.append(f"RepetitionTime {value!r} in the sidecar is not a positive number: ignored")
        sidecar_tr = None
    header_tr = volume.repetition_time_s
    if sidecar_tr and header_tr and abs(sidecar_tr - header_tr) > 1e-3 * sidecar_tr:
        notes.append(f"RepetitionTime {sidecar_tr:g} s in the sidecar, {header_tr:g} s in the NIfTI header: "
                     "the sidecar's is used (BIDS)")
    return sidecar_tr or header_tr, notes


def write_outputs(result: Segmented, context: Context) -> None:
    """Write mean, probseg, per-slice table and figures, then the mask and its sidecar (last:
    the sidecar marks a complete run)."""
    options, volume, run, outputs = context.options, result.volume, result.run, result.outputs
    out = options.output_dir
    raw_uri = deriv.bids_uri(run.relpath)
    sources = [raw_uri]
    listed: dict[str, str] = {"morph": outputs.morph.relative_to(out).as_posix(),
                              "morph_sidecar": deriv.sidecar_of(outputs.morph).relative_to(out).as_posix()}
    notes = list(volume.notes)
    tr_s, tr_notes = (repetition_time(run, volume) if volume.is_mean_of_run else (None, []))
    notes += tr_notes
    task_name = run.metadata.get("TaskName") if isinstance(run.metadata.get("TaskName"), str) else None
    written = [outputs.mask, outputs.morph]
    if volume.is_mean_of_run:
        if not tr_s:
            notes.append("RepetitionTime unknown (no usable sidecar value, none in the header): not recorded")
        mean = outputs.mocomean if result.motion is not None else outputs.mean
        deriv.write_nifti_atomic(volume.data, mean, dtype=np.float32, geometry=volume.header, affine=volume.affine)
        write_json_atomic(deriv.mean_sidecar(source_uri=raw_uri, task_name=task_name or run.entities.get("task", ""),
                                             tr_s=tr_s, n_volumes=volume.n_volumes, nonfinite=volume.nonfinite,
                                             versions=context.versions, motion_corrected=result.motion is not None),
                          deriv.sidecar_of(mean))
        sources = [deriv.output_uri(out, mean), raw_uri]
        listed.update(mean=mean.relative_to(out).as_posix(),
                      mean_sidecar=deriv.sidecar_of(mean).relative_to(out).as_posix())
        written.append(mean)
    if result.motion is not None:
        axis = result.summary["slice_axis"]
        write_tsv_atomic(moco.motion_table(result.motion.shifts_mm, result.motion.framewise_displacement_mm,
                                           slice_axis=axis, slices=result.motion_slices), outputs.motion)
        write_json_atomic(deriv.motion_sidecar(source_uri=raw_uri, slice_axis=axis,
                                               n_slices=result.motion.shifts_mm.shape[1],
                                               reference=result.motion.reference, versions=context.versions),
                          deriv.sidecar_of(outputs.motion))
        listed.update(motion=outputs.motion.relative_to(out).as_posix(),
                      motion_sidecar=deriv.sidecar_of(outputs.motion).relative_to(out).as_posix())
        written.append(outputs.motion)
    if options.save_probseg and result.probability is not None:
        deriv.write_nifti_atomic(result.probability, outputs.probseg, dtype=np.float32, geometry=volume.header,
                                 affine=volume.affine)
        write_json_atomic(deriv.probseg_sidecar(sources=sources, spatial_reference=raw_uri,
                                                model=context.model_description, versions=context.versions),
                          deriv.sidecar_of(outputs.probseg))
        listed.update(probseg=outputs.probseg.relative_to(out).as_posix(),
                      probseg_sidecar=deriv.sidecar_of(outputs.probseg).relative_to(out).as_posix())
        written.append(outputs.probseg)
    keep = {p.relative_to(out).as_posix() for p in written} | {deriv.sidecar_of(p).relative_to(out).as_posix()
                                                               for p in written}
    for rel in result.previous_outputs - keep:  # what an earlier run of this input wrote and this one does not
        (out / rel).unlink(missing_ok=True)
    for stale in set(outputs.files()) - set(written):  # made with other options: they would no longer match
        for path in (stale, deriv.sidecar_of(stale)):
            path.unlink(missing_ok=True)
    mask_uri = deriv.output_uri(out, outputs.mask)
    write_tsv_atomic(result.rows, outputs.morph)
    write_json_atomic(deriv.morph_sidecar(mask_uri, result.summary["slice_axis"]), deriv.sidecar_of(outputs.morph))
    try:
        figures = qc.write_run_figures(out, outputs.mask, volume.data, result.mask, volume.affine,
                                       volume.zooms_mm, result.rows, flags=result.flags, labels=result.labels,
                                       components=result.components)
    except Exception as err:  # a figure must never cost the mask; the report rebuilds missing ones
        log.warning("%s: QC figures not written (%s: %s)", printable(run.name), type(err).__name__, err)
        figures = None
    deriv.write_nifti_atomic(result.mask, outputs.mask, dtype=np.uint8, geometry=volume.header, affine=volume.affine)
    inputs = {
        **result.identity,
        "Kind": ("3D mean EPI" if not volume.is_mean_of_run else "4D run (motion-corrected temporal mean segmented)"
                 if result.motion is not None else "4D run (temporal mean segmented)"),
        "Shape": list(run.shape),
        "VoxelSizeMM": [round(z, 6) for z in volume.zooms_mm],
        "Orientation": "".join(nib.aff2axcodes(volume.affine)),
        "VolumesAveraged": volume.n_volumes,
        "NonFiniteValues": volume.nonfinite,
        "TaskName": task_name,
        "RepetitionTime": tr_s,
    }
    sidecar = deriv.mask_sidecar(
        sources=sources, spatial_reference=raw_uri, model=context.model_description, is_demo=context.spec.is_demo,
        options=context.recorded_options(), post_processing=result.steps, inputs=inputs, metrics=result.summary,
        flags=result.flags, notes=notes, timings=result.timings, fingerprint=result.fingerprint, outputs=listed,
        versions=context.versions)
    sidecar["Figures"] = figures
    if result.motion is not None:
        sidecar["Motion"] = {
            "Method": "slice-wise in-plane translation, two passes (plain mean -> cord mask -> "
                      f"{MOCO_ROI_DIAMETER_MM:g} mm cylinder -> motion-corrected mean -> final mask)",
            "Reference": result.motion.reference, "Parameters": result.motion.parameters,
            **moco.motion_summary(result.motion, slices=result.motion_slices)}
    sidecar["Predictor"] = model.describe_predictor(context.predictor)
    write_json_atomic(sidecar, deriv.sidecar_of(outputs.mask))


def failed_result(run: layout.Run, error: BaseException, context: Context) -> RunResult:
    """A failed input: its crash file and its one error line (naming the file and the fix)."""
    options = context.options
    message = printable(deriv.error_line(error))
    crash = None
    try:
        crash = deriv.write_crash_file(options.output_dir, subject=run.entities.get("subject"), name=run.name,
                                       relpath=run.relpath, path=run.path, error=error, options=options.as_dict())
    except OSError as err:
        log.error("cannot write a crash file for %s (%s)", printable(run.relpath), err)
    # our messages name the file; anything else gets the input's path in front
    log.error("%s", message if printable(run.path.name) in message else f"{printable(run.relpath)}: {message}")
    return RunResult(run, "failed", message=message, crash_file=crash)


def process_inputs(runs: list[layout.Run], context: Context, pages_written: set[str]) -> list[RunResult]:
    """Every input through the three stages, reading input k+1 and writing input k-1 while the
    network works on input k (:func:`episeg_bids.overlap.run_overlapped`); results, progress and
    log lines come in input order. The writer thread also writes a subject's QC page once the
    subject's last input is written, and adds the subject to ``pages_written``."""
    results: list[RunResult] = []
    progress = Progress(len(runs))
    last_of_subject = {subject_of(run): run.relpath for run in runs}
    measured: dict[str, list[dict[str, Any]]] = {}   # this subject's component tables, by mask path

    def write(run: layout.Run, both: tuple[InputState, Segmented]) -> RunResult:
        segmented = both[1]
        result = write_input(both[0], segmented, context)
        out = context.options.output_dir
        if result.status == "done" and segmented.components is not None:
            measured[segmented.outputs.mask.relative_to(out).as_posix()] = segmented.components
        subject = subject_of(run)
        if last_of_subject[subject] == run.relpath:
            write_subject_pages(out, [subject], measured=measured)
            pages_written.add(subject)
            measured.clear()
        return result

    def finish(work: Work) -> None:
        run = work.item
        if work.error is not None:
            result = failed_result(run, work.error, context)
        else:
            result = work.state
        results.append(result)
        status = {"skipped": "skipped (complete)", "failed": "FAILED"}.get(result.status, result.status)
        progress.step(printable(run.name), f"{status} ({result.message})" if result.status == "done" and result.message
                      else status)

    run_overlapped(runs, prepare=lambda run, _: open_input(run, context),
                   compute=lambda run, state: (state, segment_input(run, state, context)),
                   write=write, finish=finish)
    return results


def subject_of(run: layout.Run) -> str:
    """The participant label of an input (``''`` when it has none)."""
    return str(run.entities.get("subject", ""))


def participant(options: Options) -> Summary:
    """Segment every selected input; one failing input never stops the others.

    Raises
    ------
    EpisegError
        Before any input is processed: validation failed, nothing selected, no model, output
        folder not writable.
    """
    clock = time.monotonic()
    if options.skip_bids_validation:
        log.info("BIDS validation skipped (--skip-bids-validation)")
    else:
        validate.check_dataset(options.bids_dir)
    runs = select_runs(options)
    log.info("%d input(s) selected: %d 4D run(s), %d 3D mean(s), %d unusable", len(runs),
             sum(r.kind == "run" for r in runs), sum(r.kind == "mean" for r in runs),
             sum(r.kind == "invalid" for r in runs))
    spec = model.locate_model(options.model_dir)
    if spec.is_demo:
        log.warning("using the DEMO model %s: masks are for testing only; install the EPISeg "
                    "weights with 'episeg-bids install-model'", spec.trainer_folder)
    deriv.write_dataset_files(options.output_dir, options.bids_dir, container_info(),
                              model_name=spec.trainer_folder.name, is_demo=spec.is_demo)
    context = Context(options, spec)
    pages_written: set[str] = set()
    summary = Summary(process_inputs(runs, context, pages_written))
    # subjects whose last input was skipped or failed: their pages are rebuilt here
    write_subject_pages(options.output_dir, sorted({subject_of(r.run) for r in summary.results} - pages_written))
    write_dataset_report(options.output_dir)
    summary.seconds = time.monotonic() - clock
    return summary


def write_subject_pages(output_dir: Path, subjects: list[str],
                        measured: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """The QC pages of these subjects, rebuilt from every result on disk (``measured``: component
    tables already at hand, see :func:`episeg_bids.qc.collect_runs`); a failure is logged, never
    fatal."""
    for subject in subjects:
        try:
            qc.write_subject_page(output_dir, subject, measured=measured)
        except Exception as err:  # the masks are written; a report problem must not fail the run
            log.warning("QC page of sub-%s not written (%s: %s)", printable(subject), type(err).__name__, err)


def write_dataset_report(output_dir: Path) -> None:
    """The dataset report (``qc/index.html``), rebuilt from every result on disk; a failure is
    logged, never fatal."""
    try:
        log.info("QC report: %s", qc.write_dataset_report(output_dir))
    except Exception as err:
        log.warning("QC report not written (%s: %s)", type(err).__name__, err)
