"""Slice-wise motion correction of a 4D EPI run, in the spirit of ``sct_fmri_moco``.

Pure functions on arrays: no file I/O. Arrays are in on-disk voxel order, ``(X, Y, Z)`` or
``(X, Y, Z, T)``; ``slice_axis`` is the voxel axis closest to superior–inferior (chosen by the
caller from the affine). Each slice is moved rigidly *in its own plane* by a translation; its two
in-plane voxel axes are called ``a`` and ``b`` in increasing axis order (for ``slice_axis=2``:
``a`` = i = X, ``b`` = j = Y).

Sign convention of the shifts (voxels or mm)
    ``shift[t, s] = (da, db)`` means the anatomy of slice ``s`` in volume ``t`` is displaced by
    ``+da`` along ``a`` and ``+db`` along ``b`` (towards increasing voxel index) relative to the
    reference position. The corrected volume samples the input at ``x + shift``:
    ``corrected_t(x) = volume_t(x + shift[t])``. The reference position is that of the first group
    of volumes (``volumes 0 .. group_size-1``), as ``sct_fmri_moco``'s default target (group 0).

Algorithm (``sct_fmri_moco`` estimates slice-wise Tx, Ty with ANTs, polynomially regularised along
z, on groups of volumes, inside a mask; we do the same steps with our own numpy/scipy code):

1. Consecutive volumes are averaged in groups of ``group_size`` to raise the SNR.
2. Robust first pass: each slice's group means are registered to their temporal median (over at
   most 25 evenly spread groups; integer search of the normalised cross-correlation, then
   Gauss–Newton); the reference is the mean of the aligned group means; the groups are
   registered again to it.
3. Every volume is registered to that reference, starting from its group's estimate.
4. Registration: least squares with an intensity gain and offset, restricted to ``roi``, on the
   cubic B-spline interpolant of the volume (``scipy.ndimage.spline_filter`` coefficients), both
   images smoothed by a 0.5-voxel Gaussian (removes most of the interpolation bias), sub-voxel by
   Gauss–Newton. All candidate lags of a slice come from one FFT cross-correlation per volume
   (the spline prefilter and the smoothing act on the templates), so iterations cost almost
   nothing. Shifts are searched within ``max_shift_mm`` per axis.
5. Regularisation along the slice axis: per volume, the slice shifts minimise
   ``sum_s |p_s - p^_s|^2_(Lambda_s) + sum_s |p_(s+1) - p_s|^2 / tau^2`` where ``Lambda_s`` is the
   information of slice ``s``'s estimate (zero for a slice without ROI). Well-determined slices
   keep their estimate; weak or empty slices follow their neighbours.
6. The mean is the finite-weighted temporal mean of the volumes resampled with cubic B-splines
   (identical to ``scipy.ndimage.shift(order=3, mode='nearest')`` away from the field-of-view edge),
   computed as one matrix product per slice.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy
from scipy import fft as sfft
from scipy import ndimage

#: Default options of :func:`motion_correct` (recorded in ``MotionCorrection.parameters``).
DEFAULTS: dict[str, Any] = {
    "group_size": 3,
    "max_shift_mm": 6.0,
    "per_volume": True,
    "z_smoothness_mm_per_mm": 0.1,
    "max_iterations": 30,
    "tolerance_voxels": 1e-3,
    "smoothing_voxels": 0.5,
}

_TAPS = np.arange(-1, 3)  # cubic B-spline support around floor(x): -1, 0, 1, 2
_MARGIN = 8               # voxels around the ROI beyond the search range: taps and filter tails


@dataclass
class MotionCorrection:
    """Result of :func:`motion_correct`.

    Attributes
    ----------
    mean : (X, Y, Z) float32 ndarray
        Motion-corrected temporal mean, on-disk voxel order, on the input grid; a voxel's mean is
        over its valid (``finite``) samples, 0 where it has none.
    shifts_mm : (T, S, 2) float ndarray
        Per volume ``t`` and slice ``s`` (``S`` = size along ``slice_axis``), the in-plane
        translation in mm along the two in-plane voxel axes in increasing axis order. Positive:
        the anatomy moved towards increasing voxel index relative to the reference (module doc).
    framewise_displacement_mm : (T,) float ndarray
        ``FD[t]`` = mean over the ROI's slices of ``|shift[t, s] - shift[t-1, s]|`` (Euclidean,
        mm); ``FD[0] = 0``.
    reference : str
        How the reference was made, for the sidecar.
    parameters : dict
        Everything needed to reproduce the result (options, library versions, method).
    """

    mean: np.ndarray
    shifts_mm: np.ndarray
    framewise_displacement_mm: np.ndarray
    reference: str
    parameters: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- public functions


def motion_correct(
    volumes: np.ndarray,
    zooms_mm: tuple[float, float, float],
    slice_axis: int,
    *,
    roi: np.ndarray | None = None,
    finite: np.ndarray | None = None,
    **options: Any,
) -> MotionCorrection:
    """Slice-wise in-plane translation correction of a 4D run and its corrected mean.

    Parameters
    ----------
    volumes : (X, Y, Z, T) float32 ndarray
        The run, on-disk voxel order; invalid samples already set to 0 (see ``finite``).
    zooms_mm : (3,) tuple of float
        Voxel size along X, Y, Z in mm.
    slice_axis : {0, 1, 2}
        Voxel axis closest to superior–inferior; slices are registered in the other two axes.
    roi : (X, Y, Z) bool ndarray, optional, keyword-only
        Voxels whose intensities drive the registration (e.g. :func:`cord_cylinder`). A slice
        with no ROI voxel gets its shifts from its neighbours. Default: every voxel.
    finite : (X, Y, Z, T) bool ndarray, optional, keyword-only
        Valid samples; invalid ones are ignored by the mean and imputed (voxel's mean) for the
        registration. Default: all valid.
    **options
        Keyword-only, defaults in :data:`DEFAULTS`: ``group_size`` (volumes averaged per group,
        int >= 1), ``max_shift_mm`` (search range per in-plane axis, mm), ``per_volume`` (refine
        every volume from its group's estimate; False applies the group's shifts to its
        volumes, as ``sct_fmri_moco -g``), ``z_smoothness_mm_per_mm`` (prior SD of the change of
        shift between adjacent slices per mm of slice spacing; 0 or None: no regularisation),
        ``smoothing_voxels`` (in-plane Gaussian SD applied to reference and volumes for the
        estimation only, not to the mean; it removes most of the interpolation bias of sub-voxel
        least squares), ``max_iterations``, ``tolerance_voxels`` (Gauss–Newton stop).

    Returns
    -------
    MotionCorrection

    Raises
    ------
    ValueError
        For a non-4D ``volumes``, a bad ``slice_axis``, ``roi``/``finite`` of another shape, an
        ``roi`` without any voxel, or an unknown option.
    """
    opts = _check_options(options)
    _check_inputs(volumes, zooms_mm, slice_axis, roi, finite)
    with _one_blas_thread():
        return _motion_correct(volumes, zooms_mm, slice_axis, roi, finite, opts)


def _one_blas_thread():
    """Context limiting BLAS to one thread (threadpoolctl, when installed).

    The matrix products here are small: a second BLAS thread gains little on an idle machine,
    and multi-threaded OpenBLAS runs 2-3× slower when the cores are shared (measured: 2.8 s
    against 1.0 s for a 128×128×24×200 run on 2 busy cores).
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with nnunetv2's dependencies
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _motion_correct(volumes, zooms_mm, slice_axis, roi, finite, opts) -> MotionCorrection:
    """:func:`motion_correct` on checked inputs."""
    data = np.moveaxis(volumes, slice_axis, 2)                      # (A, B, S, T) view
    valid = None if finite is None else np.moveaxis(finite, slice_axis, 2)
    region = None if roi is None else np.moveaxis(np.asarray(roi, bool), slice_axis, 2)
    plane_mm = tuple(float(z) for i, z in enumerate(zooms_mm) if i != slice_axis)
    n_t, n_s = data.shape[3], data.shape[2]
    groups = _group_index(n_t, opts["group_size"])
    search = tuple(max(1, math.ceil(opts["max_shift_mm"] / z)) for z in plane_mm)

    shifts_vox = np.zeros((n_t, n_s, 2))
    information = np.zeros((n_s, 2, 2))                              # per slice, mm^-2
    for s in range(n_s):
        roi_s = np.ones(data.shape[:2], bool) if region is None else region[:, :, s]
        if not roi_s.any():
            continue
        shifts_vox[:, s], info_vox = _register_slice(data, valid, s, roi_s, groups, search, opts)
        scale = np.diag(1.0 / np.asarray(plane_mm))
        information[s] = scale @ info_vox @ scale

    shifts_mm = shifts_vox * np.asarray(plane_mm)
    spacing_mm = float(zooms_mm[slice_axis])
    shifts_mm = regularise_along_slices(shifts_mm, information,
                                        _tau_mm(opts["z_smoothness_mm_per_mm"], spacing_mm))
    shifts_mm -= shifts_mm[groups == 0].mean(axis=0)                # reference = first group
    mean = _corrected_mean(data, valid, shifts_mm / np.asarray(plane_mm))
    used = information[:, 0, 0] > 0
    return MotionCorrection(
        mean=np.ascontiguousarray(np.moveaxis(mean, 2, slice_axis)),
        shifts_mm=shifts_mm,
        framewise_displacement_mm=framewise_displacement(shifts_mm, slices=used if used.any() else None),
        reference=_describe_reference(n_t, opts["group_size"], groups),
        parameters=_parameters(opts, roi is not None, search, plane_mm, spacing_mm),
    )


def cord_cylinder(
    mask: np.ndarray, zooms_mm: tuple[float, float, float], slice_axis: int, *, diameter_mm: float = 35.0
) -> np.ndarray:
    """Region of interest for :func:`motion_correct`: a cylinder around the cord along the slices.

    Parameters
    ----------
    mask : (X, Y, Z) ndarray
        Cord mask (nonzero = cord), on-disk voxel order.
    zooms_mm : (3,) tuple of float
        Voxel size along X, Y, Z in mm.
    slice_axis : {0, 1, 2}
        Voxel axis closest to superior–inferior.
    diameter_mm : float, keyword-only
        Diameter of the disc in each slice, in mm (in-plane distances in mm, so anisotropic
        pixels give an elliptic disc in voxels).

    Returns
    -------
    roi : (X, Y, Z) bool ndarray
        In each slice, a disc centred on the mask's centroid in that slice; slices without cord
        take a centre linearly interpolated between the nearest cord slices (the nearest one's
        centre beyond the first and last). The whole volume when ``mask`` is empty.

    Examples
    --------
    >>> mask = np.zeros((9, 9, 3), bool); mask[4, 4, 0] = mask[6, 4, 2] = True
    >>> roi = cord_cylinder(mask, (1.0, 1.0, 5.0), 2, diameter_mm=1.0)
    >>> [np.argwhere(roi[:, :, s])[0].tolist() for s in range(3)]   # slice 1: halfway, x = 5
    [[4, 4], [5, 4], [6, 4]]
    """
    mask = np.moveaxis(np.asarray(mask) != 0, slice_axis, 2)
    if not mask.any():
        return np.ones(np.moveaxis(mask, 2, slice_axis).shape, bool)
    plane_mm = [float(z) for i, z in enumerate(zooms_mm) if i != slice_axis]
    has_cord = mask.any(axis=(0, 1))
    cord_slices = np.flatnonzero(has_cord)
    centres = np.array([ndimage.center_of_mass(mask[:, :, s]) for s in cord_slices])
    every = np.arange(mask.shape[2])
    centre_a = np.interp(every, cord_slices, centres[:, 0])
    centre_b = np.interp(every, cord_slices, centres[:, 1])
    grid_a, grid_b = np.meshgrid(np.arange(mask.shape[0]), np.arange(mask.shape[1]), indexing="ij")
    dist2 = (((grid_a[..., None] - centre_a) * plane_mm[0]) ** 2
             + ((grid_b[..., None] - centre_b) * plane_mm[1]) ** 2)
    return np.moveaxis(dist2 <= (diameter_mm / 2.0) ** 2, 2, slice_axis)


def temporal_snr(volumes: np.ndarray, roi: np.ndarray) -> float:
    """Mean over the ROI of the voxel-wise temporal SNR (temporal mean / temporal SD).

    Parameters
    ----------
    volumes : (X, Y, Z, T) ndarray
        A run (raw or motion-corrected), on-disk voxel order.
    roi : (X, Y, Z) bool ndarray
        Voxels to average over, e.g. the cord mask.

    Returns
    -------
    float
        Mean of ``mean_t / std_t`` (population SD, ``ddof=0``) over the ROI voxels whose SD is
        positive; NaN if there is none.

    Examples
    --------
    >>> run = np.array([9.0, 11.0, 9.0, 11.0]).reshape(1, 1, 1, 4)   # mean 10, SD 1
    >>> temporal_snr(run, np.ones((1, 1, 1), bool))
    10.0
    """
    series = np.asarray(volumes)[np.asarray(roi, bool)].astype(np.float64)   # (N, T)
    sd = series.std(axis=1)
    keep = sd > 0
    if not keep.any():
        return float("nan")
    return float(np.mean(series[keep].mean(axis=1) / sd[keep]))


def framewise_displacement(shifts_mm: np.ndarray, *, slices: np.ndarray | None = None) -> np.ndarray:
    """Framewise displacement from slice-wise shifts.

    Parameters
    ----------
    shifts_mm : (T, S, 2) ndarray
        In-plane shifts in mm (see :class:`MotionCorrection`).
    slices : (S,) bool ndarray, optional, keyword-only
        Slices to average over (e.g. those with an ROI); default all.

    Returns
    -------
    fd_mm : (T,) float ndarray
        ``fd[t]`` = mean over ``slices`` of the Euclidean norm of ``shift[t] - shift[t-1]`` in
        mm; ``fd[0] = 0``.

    Examples
    --------
    >>> shifts = np.zeros((3, 2, 2)); shifts[1:, :, 0] = 3.0; shifts[2, :, 1] = 4.0
    >>> framewise_displacement(shifts)
    array([0., 3., 4.])
    """
    shifts_mm = np.asarray(shifts_mm, float)
    chosen = shifts_mm if slices is None else shifts_mm[:, np.asarray(slices, bool)]
    steps = np.linalg.norm(np.diff(chosen, axis=0), axis=2).mean(axis=1)
    return np.concatenate([[0.0], steps])


def motion_table(shifts_mm: np.ndarray, framewise_displacement_mm: np.ndarray, *, slice_axis: int = 2,
                 slices: np.ndarray | None = None) -> list[dict]:
    """The motion table, one row per volume (a BIDS ``_timeseries.tsv``).

    Parameters
    ----------
    shifts_mm : (T, S, 2) ndarray
        From :class:`MotionCorrection`.
    framewise_displacement_mm : (T,) ndarray
        From :class:`MotionCorrection`.
    slice_axis : {0, 1, 2}, keyword-only
        Names the in-plane columns after the voxel axes (i, j, k = X, Y, Z).
    slices : (S,) bool ndarray, optional, keyword-only
        Slices the summary columns average over (those with a registration ROI); default all.

    Returns
    -------
    rows : list of dict
        Columns (lengths in mm, rounded to 1e-4 mm; signs as in :class:`MotionCorrection`, +
        towards increasing voxel index): ``volume`` (0-based), ``framewise_displacement_mm``,
        ``mean_translation_<a>_mm`` and ``mean_translation_<b>_mm`` (mean over ``slices``),
        ``max_displacement_mm`` (largest in-plane displacement from the reference over
        ``slices``), then ``translation_<a>_slice<NN>_mm`` and ``translation_<b>_slice<NN>_mm``
        for every slice (NN = voxel index along ``slice_axis``).

    Examples
    --------
    >>> rows = motion_table(np.array([[[0.0, 0.0]], [[0.3, -0.4]]]), np.array([0.0, 0.5]))
    >>> rows[1]
    {'volume': 1, 'framewise_displacement_mm': 0.5, 'mean_translation_i_mm': 0.3, 'mean_translation_j_mm': -0.4, 'max_displacement_mm': 0.5, 'translation_i_slice00_mm': 0.3, 'translation_j_slice00_mm': -0.4}
    """
    a, b = [("ijk")[axis] for axis in range(3) if axis != slice_axis]
    shifts_mm = np.asarray(shifts_mm, float)
    chosen = np.ones(shifts_mm.shape[1], bool) if slices is None else np.asarray(slices, bool)
    width = max(2, len(str(shifts_mm.shape[1] - 1)))
    rows = []
    for t, volume in enumerate(shifts_mm):
        inside = volume[chosen] if chosen.any() else volume
        row = {"volume": t, "framewise_displacement_mm": round(float(framewise_displacement_mm[t]), 4),
               f"mean_translation_{a}_mm": round(float(inside[:, 0].mean()), 4),
               f"mean_translation_{b}_mm": round(float(inside[:, 1].mean()), 4),
               "max_displacement_mm": round(float(np.hypot(inside[:, 0], inside[:, 1]).max()), 4)}
        for s, (da, db) in enumerate(volume):
            row[f"translation_{a}_slice{s:0{width}d}_mm"] = round(float(da), 4)
            row[f"translation_{b}_slice{s:0{width}d}_mm"] = round(float(db), 4)
        rows.append(row)
    return rows


#: Framewise displacement above which a volume counts as a high-motion volume, in mm.
HIGH_MOTION_FD_MM = 0.5
#: The ``motion`` flag: more than this share of high-motion volumes ...
HIGH_MOTION_SHARE = 0.1
#: ... or an in-plane displacement from the reference larger than this, in mm (about two EPI voxels).
LARGE_DISPLACEMENT_MM = 2.0

FLAG_LEGEND = {
    "motion": (f"Large motion in a 4D run (slice-wise motion correction): more than {HIGH_MOTION_SHARE:.0%} of the "
               f"volumes with a framewise displacement above {HIGH_MOTION_FD_MM:g} mm, or a displacement from the "
               f"reference above {LARGE_DISPLACEMENT_MM:g} mm. The motion was corrected, but check the motion plot and "
               "the moco mean: through-plane motion is not corrected."),
}


def motion_summary(result: MotionCorrection, *, slices: np.ndarray | None = None) -> dict[str, Any]:
    """Framewise displacement and displacement figures of a motion correction, for the sidecar.

    ``slices`` (bool, per slice) restricts the displacement to the slices with a registration ROI.
    """
    shifts = np.asarray(result.shifts_mm, float)
    chosen = np.ones(shifts.shape[1], bool) if slices is None else np.asarray(slices, bool)
    displacement = np.hypot(shifts[:, chosen, 0], shifts[:, chosen, 1]) if chosen.any() else np.zeros(1)
    fd = np.asarray(result.framewise_displacement_mm, float)
    return {
        "Volumes": int(shifts.shape[0]),
        "FramewiseDisplacementMeanMM": round(float(fd[1:].mean()) if fd.size > 1 else 0.0, 4),
        "FramewiseDisplacementMaxMM": round(float(fd.max()), 4),
        "MaxDisplacementMM": round(float(displacement.max()), 4),
        "HighMotionVolumes": int((fd > HIGH_MOTION_FD_MM).sum()),
        "ThresholdMM": HIGH_MOTION_FD_MM,
    }


def motion_flags(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``motion`` quality flag when the motion is large (rule in :data:`FLAG_LEGEND`)."""
    share = summary["HighMotionVolumes"] / max(summary["Volumes"], 1)
    if share <= HIGH_MOTION_SHARE and summary["MaxDisplacementMM"] <= LARGE_DISPLACEMENT_MM:
        return []
    return [{"code": "motion", "slices": [],
             "message": (f"large motion: {summary['HighMotionVolumes']} of {summary['Volumes']} volumes with framewise "
                         f"displacement above {summary['ThresholdMM']:g} mm, largest displacement "
                         f"{summary['MaxDisplacementMM']:.2f} mm (corrected in-plane; check the motion plot)")}]


def apply_shifts(
    volumes: np.ndarray, shifts_mm: np.ndarray, zooms_mm: tuple[float, float, float], slice_axis: int
) -> np.ndarray:
    """Motion-corrected run: every slice of every volume resampled with its own shift.

    Reference resampler for QC and tests: one ``scipy.ndimage.shift(order=3, mode='nearest')``
    per slice and volume (slow for long runs; :func:`motion_correct` computes the mean without it).

    Parameters
    ----------
    volumes : (X, Y, Z, T) ndarray
        The run, on-disk voxel order.
    shifts_mm : (T, S, 2) ndarray
        As in :class:`MotionCorrection`.
    zooms_mm, slice_axis
        As in :func:`motion_correct`.

    Returns
    -------
    corrected : (X, Y, Z, T) float32 ndarray
        ``corrected[..., t]`` sampled at ``x + shift[t, s]`` in each slice ``s``.
    """
    plane_mm = np.array([float(z) for i, z in enumerate(zooms_mm) if i != slice_axis])
    data = np.moveaxis(np.asarray(volumes, np.float32), slice_axis, 2)
    out = np.empty(data.shape, np.float32)
    for t in range(data.shape[3]):
        for s in range(data.shape[2]):
            out[:, :, s, t] = ndimage.shift(data[:, :, s, t], -shifts_mm[t, s] / plane_mm,
                                            order=3, mode="nearest")
    return np.moveaxis(out, 2, slice_axis)


def regularise_along_slices(
    shifts_mm: np.ndarray, information: np.ndarray, tau_mm: float | None
) -> np.ndarray:
    """Smooth slice-wise shift estimates along the slice axis where they are uncertain.

    For each volume, solves ``min_p sum_s (p_s - q_s)' L_s (p_s - q_s) + sum_s |p_(s+1) - p_s|^2 / tau^2``
    (a Gaussian prior on the change between adjacent slices, SD ``tau_mm``).

    Parameters
    ----------
    shifts_mm : (T, S, 2) ndarray
        Estimates ``q``, mm.
    information : (S, 2, 2) ndarray
        ``L_s``, inverse covariance of slice ``s``'s estimate in mm^-2; zeros for a slice
        without an estimate.
    tau_mm : float or None
        Prior SD in mm; None or 0 returns the estimates unchanged (slices without information
        then keep 0).

    Returns
    -------
    (T, S, 2) ndarray
        Regularised shifts in mm.
    """
    n_s = shifts_mm.shape[1]
    if not tau_mm or n_s < 2:
        return shifts_mm.copy()
    chain = np.diag(np.r_[1.0, 2.0 * np.ones(n_s - 2), 1.0]) - np.eye(n_s, k=1) - np.eye(n_s, k=-1)
    system = np.kron(chain, np.eye(2)) / tau_mm**2
    for s in range(n_s):
        system[2 * s:2 * s + 2, 2 * s:2 * s + 2] += information[s]
    system += np.eye(2 * n_s) * 1e-9 * (1.0 / tau_mm**2)      # pins the mean when nothing is known
    rhs = np.einsum("sij,tsj->tsi", information, shifts_mm).reshape(len(shifts_mm), -1)
    return np.linalg.solve(system, rhs.T).T.reshape(shifts_mm.shape)


# --------------------------------------------------------------------------- input checks


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown motion_correct option(s) {unknown}; known: {sorted(DEFAULTS)}")
    opts = {**DEFAULTS, **options}
    if int(opts["group_size"]) < 1:
        raise ValueError(f"group_size {opts['group_size']} must be >= 1")
    opts["group_size"] = int(opts["group_size"])
    return opts


def _check_inputs(volumes, zooms_mm, slice_axis, roi, finite) -> None:
    if volumes.ndim != 4:
        raise ValueError(f"volumes has shape {volumes.shape}; expected a 4D (X, Y, Z, T) run")
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis {slice_axis} must be 0, 1 or 2")
    if len(zooms_mm) < 3 or min(float(z) for z in zooms_mm[:3]) <= 0:
        raise ValueError(f"zooms_mm {tuple(zooms_mm)} must hold 3 positive voxel sizes in mm")
    if roi is not None:
        if np.shape(roi) != volumes.shape[:3]:
            raise ValueError(f"roi shape {np.shape(roi)} differs from the volumes' {volumes.shape[:3]}")
        if not np.any(roi):
            raise ValueError("roi has no voxel; pass roi=None to register whole slices")
    if finite is not None and np.shape(finite) != volumes.shape:
        raise ValueError(f"finite shape {np.shape(finite)} differs from the volumes' {volumes.shape}")


def _tau_mm(z_smoothness: float | None, spacing_mm: float) -> float | None:
    return None if not z_smoothness else float(z_smoothness) * spacing_mm


# --------------------------------------------------------------------------- one slice


def _group_index(n_t: int, group_size: int) -> np.ndarray:
    """Group of each volume: consecutive blocks of ``group_size`` (the last one may be shorter)."""
    return np.arange(n_t) // group_size


def _register_slice(data, valid, s, roi_s, groups, search, opts):
    """Shifts ``(T, 2)`` in voxels of slice ``s`` and the information ``(2, 2)`` (voxel^-2) of one
    estimate; zeros when the slice has no usable ROI voxel."""
    patch, weight = _patch(data, valid, s, roi_s, search)
    if not weight.any():
        return np.zeros((len(groups), 2)), np.zeros((2, 2))
    group_means = _group_means(patch, groups)
    groups_moving = _Moving(group_means)
    reference = np.median(group_means[_spread(len(group_means), 25)], axis=0)
    start = _coarse_search(reference, weight, groups_moving, group_means, search)
    group_shifts, _ = _gauss_newton(reference, weight, groups_moving, start, search, opts)
    reference = _shifted_sum(group_means, group_shifts) / len(group_means)
    group_shifts, information = _gauss_newton(reference, weight, groups_moving, group_shifts, search, opts)
    noise_var = _noise_variance(patch, weight) / opts["group_size"]     # of a group mean
    if opts["per_volume"] and opts["group_size"] > 1:
        shifts, information = _gauss_newton(reference, weight, _Moving(patch), group_shifts[groups],
                                            search, opts, reach=3)
        noise_var *= opts["group_size"]
    else:
        shifts = group_shifts[groups]
    return shifts, information / noise_var


def _spread(n: int, at_most: int) -> np.ndarray:
    """At most ``at_most`` indices of ``range(n)``, evenly spread (all of them if n is small)."""
    return np.unique(np.linspace(0, n - 1, min(n, at_most)).round().astype(int))


def _patch(data, valid, s, roi_s, search):
    """Slice ``s`` of every volume around the ROI, and the registration weight on it.

    Parameters
    ----------
    data : (A, B, S, T) ndarray
    valid : (A, B, S, T) bool ndarray or None
    s : int
    roi_s : (A, B) bool ndarray
    search : (2,) int
        Search range in voxels along A and B.

    Returns
    -------
    patch : (T, h, w) float32 ndarray
        The ROI's bounding box plus a margin of ``search + 8`` voxels (edge-padded beyond the
        slice); invalid samples replaced by the voxel's mean over its valid samples.
    weight : (h, w) float64 ndarray
        1 on ROI voxels at least ``search`` voxels inside the slice (so that ``x + shift`` stays
        in the image), else 0.
    """
    margin = (search[0] + _MARGIN, search[1] + _MARGIN)
    rows, cols = np.flatnonzero(roi_s.any(axis=1)), np.flatnonzero(roi_s.any(axis=0))
    size_a, size_b = roi_s.shape
    a0, a1 = rows[0] - margin[0], rows[-1] + 1 + margin[0]
    b0, b1 = cols[0] - margin[1], cols[-1] + 1 + margin[1]
    inner = (slice(max(a0, 0), min(a1, size_a)), slice(max(b0, 0), min(b1, size_b)))
    block = np.moveaxis(data[inner[0], inner[1], s, :], 2, 0).astype(np.float32)
    if valid is not None:
        ok = np.moveaxis(valid[inner[0], inner[1], s, :], 2, 0)
        if not ok.all():
            counts = ok.sum(axis=0)
            fill = np.divide((block * ok).sum(axis=0), counts, out=np.zeros(block.shape[1:], np.float32),
                             where=counts > 0)
            block = np.where(ok, block, fill)
    pad = ((max(0, -a0), max(0, a1 - size_a)), (max(0, -b0), max(0, b1 - size_b)))
    patch = np.pad(block, ((0, 0),) + pad, mode="edge")
    usable = np.zeros(roi_s.shape, bool)
    usable[search[0]:size_a - search[0], search[1]:size_b - search[1]] = True
    weight = np.pad(roi_s[inner] & usable[inner], pad).astype(np.float64)
    return patch, weight


def _group_means(patch: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Mean of each group of consecutive volumes: ``(K, h, w)`` float32."""
    averaging = np.zeros((groups[-1] + 1, len(groups)), np.float32)
    averaging[groups, np.arange(len(groups))] = 1.0
    averaging /= averaging.sum(axis=1, keepdims=True)
    return (averaging @ patch.reshape(len(patch), -1)).reshape((len(averaging),) + patch.shape[1:])


def _noise_variance(patch: np.ndarray, weight: np.ndarray) -> float:
    """Variance of one volume's noise in the ROI, from successive differences (median over the
    ROI, robust to jumps), floored at 1e-8 of the mean squared signal (noise-free data)."""
    inside = patch[:, weight > 0].astype(np.float64)
    floor = 1e-8 * float(np.mean(inside**2)) + 1e-30
    if len(patch) < 2:
        return floor
    return max(float(np.median(np.mean(np.diff(inside, axis=0) ** 2, axis=0)) / 2.0), floor)


# --------------------------------------------------------------------------- registration core


def bspline_weights(frac: np.ndarray) -> np.ndarray:
    """Cubic B-spline weights of the taps ``floor(x) + (-1, 0, 1, 2)`` for ``frac = x - floor(x)``.

    Returns
    -------
    (..., 4) ndarray
        Non-negative, summing to 1.

    Examples
    --------
    >>> bspline_weights(np.array([0.0])) * 6   # an integer position: 1/6, 4/6, 1/6, 0
    array([[1., 4., 1., 0.]])
    """
    f = np.asarray(frac, float)[..., None]
    return np.concatenate([(1 - f) ** 3, 3 * f**3 - 6 * f**2 + 4, -3 * f**3 + 3 * f**2 + 3 * f + 1, f**3],
                          axis=-1) / 6.0


def _spline_coefficients(image: np.ndarray) -> np.ndarray:
    """Cubic B-spline coefficients of a 2D image (scipy.ndimage's prefilter, mirror boundary)."""
    return ndimage.spline_filter(image.astype(np.float64), order=3, mode="mirror")


def _templates(reference: np.ndarray, weight: np.ndarray, sigma: float = 0.0):
    """Correlation templates of the Gauss–Newton fit and its 4×4 normal matrix.

    Linearised model of a volume resampled at ``x + p + dp``: ``V(x + p) + grad(R) . dp = gain * R
    + offset``, ``R`` the reference smoothed by a Gaussian of SD ``sigma`` voxels. The templates
    are ``w * (dR/da, dR/db, R, 1)`` passed through the B-spline prefilter and the same Gaussian,
    so that correlating them with a raw volume gives sums over its smoothed cubic-spline
    interpolant.

    Returns
    -------
    templates : (4, h, w) float64 ndarray
    normal : (4, 4) float64 ndarray
        ``X' W X`` with ``X = (dR/da, dR/db, -R, -1)``.
    """
    reference = reference.astype(np.float64)
    if sigma:
        reference = ndimage.gaussian_filter(reference, sigma, mode="nearest")
    coef = _spline_coefficients(reference)
    grad_a = (np.roll(coef, -1, 0) - np.roll(coef, 1, 0)) / 2.0    # exact derivative of the spline
    grad_b = (np.roll(coef, -1, 1) - np.roll(coef, 1, 1)) / 2.0
    basis = np.stack([grad_a, grad_b, reference, np.ones_like(weight)])
    signed = basis * np.array([1.0, 1.0, -1.0, -1.0])[:, None, None]
    normal = np.einsum("ihw,jhw,hw->ij", signed, signed, weight)
    filtered = np.stack([ndimage.spline_filter(weight * b, order=3, mode="mirror") for b in basis])
    if sigma:
        filtered = ndimage.gaussian_filter(filtered, (0, sigma, sigma), mode="constant")
    return filtered, normal


class _Moving:
    """Fourier transforms of a stack of patches ``(T, h, w)``, zero-padded to fast FFT sizes,
    computed once and correlated with several templates."""

    def __init__(self, stack: np.ndarray):
        self.shape = tuple(sfft.next_fast_len(n, real=True) for n in stack.shape[1:])
        spectrum = sfft.rfft2(stack.astype(np.float32), s=self.shape)           # (T, H, W//2+1)
        self.spectrum = np.ascontiguousarray(np.moveaxis(spectrum, 1, 0))       # (H, T, W//2+1)

    def tables(self, templates: np.ndarray, centres: np.ndarray, half_width: tuple[int, int]) -> np.ndarray:
        """Correlations of each patch with each template at integer lags around a centre.

        ``table[t, j, W_a + da, W_b + db] = sum_x templates[j](x) * stack[t](x + c_t + d)`` for
        ``|da| <= W_a``, ``|db| <= W_b``, ``c_t = centres[t]`` (int): float64 ``(T, J, 2 W_a + 1,
        2 W_b + 1)``. Only these lags of the inverse transform are computed, as two matrix products
        (a partial inverse DFT, the centre as a phase ramp); the patch margin keeps the circular
        correlation from wrapping.
        """
        (h, w), n_t, n_j = self.shape, self.spectrum.shape[1], len(templates)
        wr = self.spectrum.shape[2]
        ka, kb = np.arange(h), np.arange(wr)
        ramp_a = np.exp(2j * np.pi * np.outer(ka, centres[:, 0]) / h).astype(np.complex64)   # (h, T)
        ramp_b = np.exp(2j * np.pi * np.outer(centres[:, 1], kb) / w).astype(np.complex64)   # (T, wr)
        moving = self.spectrum * ramp_a[:, :, None] * ramp_b[None]
        spec_t = np.conj(sfft.rfft2(templates.astype(np.float32), s=self.shape))
        product = moving[:, :, None] * np.moveaxis(spec_t, 1, 0)[:, None]        # (h, T, J, wr)
        da, db = np.arange(-half_width[0], half_width[0] + 1), np.arange(-half_width[1], half_width[1] + 1)
        inv_a = (np.exp(2j * np.pi * np.outer(da, ka) / h) / h).astype(np.complex64)
        fold = np.where((kb == 0) | ((w % 2 == 0) & (kb == w // 2)), 1.0, 2.0)
        inv_b = (fold[:, None] * np.exp(2j * np.pi * np.outer(kb, db) / w) / w).astype(np.complex64)
        rows = inv_a @ product.reshape(h, -1)                                   # (2Wa+1, T*J*wr)
        rows = np.moveaxis(rows.reshape(len(da), n_t, n_j, wr), 0, 2)           # (T, J, 2Wa+1, wr)
        return (rows @ inv_b).real.astype(np.float64)


def _interpolated_sums(tables: np.ndarray, offsets: np.ndarray, half_width: tuple[int, int]) -> np.ndarray:
    """Sums ``sum_x template_j(x) * volume_t(x + c_t + offsets_t)`` at sub-voxel offsets from the
    tables' centres, on the volumes' cubic B-spline interpolant: ``(T, J)``."""
    base = np.floor(offsets).astype(int)
    wa, wb = bspline_weights(offsets[:, 0] - base[:, 0]), bspline_weights(offsets[:, 1] - base[:, 1])
    ia = base[:, 0, None] + _TAPS + half_width[0]
    ib = base[:, 1, None] + _TAPS + half_width[1]
    t = np.arange(len(offsets))[:, None, None]
    values = tables[t, :, ia[:, :, None], ib[:, None, :]]                # (T, 4, 4, J)
    return np.einsum("ti,tj,tijk->tk", wa, wb, values)


def _gauss_newton(reference, weight, moving: _Moving, start, search, opts, *, reach: int = 2):
    """Shifts (T, 2) in voxels minimising ``sum w (volume_t(x + p) - gain R - offset)^2``, within
    ``reach`` voxels of the rounded ``start`` and ``search`` of 0, and the 2×2 information matrix
    (per unit noise variance) of one estimate."""
    filtered, normal = _templates(reference, weight, float(opts["smoothing_voxels"]))
    limit = np.asarray(search, float)
    start = np.clip(np.asarray(start, float), -limit, limit)
    centres = np.round(start).astype(int)
    half_width = (reach + 2, reach + 2)
    tables = moving.tables(filtered, centres, half_width)
    solve = np.linalg.inv(normal + np.eye(4) * 1e-12 * np.trace(normal))
    low = np.maximum(centres - reach, -limit)
    high = np.minimum(centres + reach - 1e-6, limit)
    shifts = np.clip(start, low, high)
    signs = np.array([-1.0, -1.0, 1.0, 1.0])
    for _ in range(int(opts["max_iterations"])):
        rhs = _interpolated_sums(tables, shifts - centres, half_width) * signs
        step = np.clip((rhs @ solve.T)[:, :2], -1.0, 1.0)
        shifts = np.clip(shifts + step, low, high)
        if np.abs(step).max() < opts["tolerance_voxels"]:
            break
    schur = normal[:2, :2] - normal[:2, 2:] @ np.linalg.pinv(normal[2:, 2:]) @ normal[2:, :2]
    return shifts, schur


def _coarse_search(reference, weight, moving: _Moving, stack, search) -> np.ndarray:
    """Integer shifts (T, 2) maximising the ROI-weighted normalised cross-correlation."""
    lag = tuple(search)
    zero = np.zeros((len(stack), 2), int)
    ref = reference.astype(np.float64)
    centred = weight * (ref - (weight * ref).sum() / weight.sum())
    tables = moving.tables(np.stack([centred, weight]), zero, lag)
    squares = _Moving(stack.astype(np.float32) ** 2).tables(weight[None], zero, lag)[:, 0]
    variance = squares - tables[:, 1] ** 2 / weight.sum()
    score = tables[:, 0] / np.sqrt(np.maximum(variance, 1e-12 * np.abs(squares).max() + 1e-30))
    best = score.reshape(len(score), -1).argmax(axis=1)
    ia, ib = np.unravel_index(best, score.shape[1:])
    return np.stack([ia - lag[0], ib - lag[1]], axis=1).astype(float)


# --------------------------------------------------------------------------- resampling


def _offset_matrix(shifts: np.ndarray):
    """Cubic B-spline taps of every shift, gathered by integer offset.

    Returns ``matrix`` (O, T) of weights and ``offsets`` (O, 2) int such that
    ``sum_t image_t(x + shifts[t]) = sum_k sum_t matrix[k, t] * image_t(x + offsets[k])`` on the
    B-spline coefficients of the images.
    """
    n_t = len(shifts)
    base = np.floor(shifts).astype(int)
    wa, wb = bspline_weights(shifts[:, 0] - base[:, 0]), bspline_weights(shifts[:, 1] - base[:, 1])
    oa = np.broadcast_to((base[:, 0, None] + _TAPS)[:, :, None], (n_t, 4, 4)).ravel()
    ob = np.broadcast_to((base[:, 1, None] + _TAPS)[:, None, :], (n_t, 4, 4)).ravel()
    offsets, inverse = np.unique(np.stack([oa, ob], axis=1), axis=0, return_inverse=True)
    matrix = np.zeros((len(offsets), n_t))
    taps = (wa[:, :, None] * wb[:, None, :]).ravel()
    np.add.at(matrix, (inverse.ravel(), np.repeat(np.arange(n_t), 16)), taps)
    return matrix, offsets


def _shifted_sum(stack: np.ndarray, shifts: np.ndarray, *, time_last: bool = False) -> np.ndarray:
    """``sum_t stack[t](x + shifts[t])`` with cubic B-splines and 'nearest' edges, ``(A, B)`` float64.

    Equal to summing ``scipy.ndimage.shift(stack[t], -shifts[t], order=3, mode='nearest')``
    away from the field-of-view edge: the B-spline prefilter is linear and shift-invariant, so it
    is applied once to the sum; the taps of every volume are gathered by integer offset and summed
    over time with one matrix product.

    Parameters
    ----------
    stack : (T, A, B) ndarray, or (A, B, T) when ``time_last`` (may be a strided view)
    shifts : (T, 2) ndarray
        Voxels along A and B.
    """
    size = stack.shape[:2] if time_last else stack.shape[1:]
    matrix, offsets = _offset_matrix(shifts)
    if time_last:
        flat = stack.reshape(size[0] * size[1], -1)                                # view when possible
        partial = np.ascontiguousarray((flat @ matrix.T.astype(flat.dtype)).T)
    else:
        partial = matrix.astype(stack.dtype) @ stack.reshape(len(stack), -1)
    partial = partial.reshape((len(offsets),) + tuple(size))
    reach = int(np.abs(offsets).max())
    padded = np.pad(partial, ((0, 0), (reach, reach), (reach, reach)), mode="edge")
    total = np.zeros(size, np.float64)
    for k, (da, db) in enumerate(offsets + reach):
        total += padded[k, da:da + size[0], db:db + size[1]]
    return ndimage.spline_filter(total, order=3, mode="nearest")


def _corrected_mean(data: np.ndarray, valid: np.ndarray | None, shifts_vox: np.ndarray) -> np.ndarray:
    """Finite-weighted mean of the resampled volumes, ``(A, B, S)`` float32."""
    mean = np.zeros(data.shape[:3], np.float32)
    for s in range(data.shape[2]):
        block = data[:, :, s, :]                                                   # (A, B, T) view
        if not np.issubdtype(block.dtype, np.floating):
            block = block.astype(np.float32)
        if valid is None or valid[:, :, s, :].all():
            mean[:, :, s] = _shifted_sum(block, shifts_vox[:, s], time_last=True) / block.shape[2]
            continue
        ok = valid[:, :, s, :].astype(np.float32)
        numerator = _shifted_sum(block * ok, shifts_vox[:, s], time_last=True)
        weight = _shifted_sum(ok, shifts_vox[:, s], time_last=True)
        mean[:, :, s] = np.divide(numerator, weight, out=np.zeros_like(numerator), where=weight > 0.5)
    return mean


# --------------------------------------------------------------------------- provenance


def _describe_reference(n_t: int, group_size: int, groups: np.ndarray) -> str:
    n_groups = int(groups[-1]) + 1
    last = min(group_size, n_t) - 1
    return (
        f"per slice: temporal median of the {n_groups} means of {group_size} consecutive volumes, "
        f"replaced by the mean of those group means once aligned to it; shifts are relative to the "
        f"first group (volumes 0-{last})"
    )


def _parameters(opts, has_roi, search, plane_mm, spacing_mm) -> dict[str, Any]:
    tau = _tau_mm(opts["z_smoothness_mm_per_mm"], spacing_mm)
    return {
        "Method": "slice-wise in-plane translation (episeg_bids.moco)",
        "GroupSize": opts["group_size"],
        "PerVolumeRefinement": bool(opts["per_volume"]),
        "RegistrationMask": "roi (cylinder around the cord)" if has_roi else "whole slice",
        "MaxShiftMM": float(opts["max_shift_mm"]),
        "SearchRangeVoxels": [int(v) for v in search],
        "InPlaneVoxelSizeMM": [float(z) for z in plane_mm],
        "Metric": "least squares with intensity gain and offset (ROI-weighted)",
        "Optimizer": "integer normalised cross-correlation search, then Gauss-Newton",
        "EstimationSmoothingSigmaVoxels": float(opts["smoothing_voxels"]),
        "MaxIterations": int(opts["max_iterations"]),
        "ToleranceVoxels": float(opts["tolerance_voxels"]),
        "Interpolation": "cubic B-spline (scipy.ndimage spline prefilter), nearest at edges",
        "SliceRegularisation": (
            {"PriorSDBetweenAdjacentSlicesMM": tau, "SliceSpacingMM": spacing_mm} if tau else None
        ),
        "Libraries": {"numpy": np.__version__, "scipy": scipy.__version__},
    }
