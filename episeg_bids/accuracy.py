"""Agreement of a predicted cord mask with a manual (ground-truth) mask on the same grid.

Everything is computed on the voxel grid of both masks (they must share shape and affine), with
distances in millimetres from the voxel sizes. Slices are taken along the axis closest to
superior–inferior (:func:`episeg_bids.metrics.slice_axis`). Manual masks sometimes cover only the
slices a site analysed, so every measure is given twice: on all slices, and on the slices that
both masks cover.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from .metrics import slice_axis


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    """Dice coefficient ``2|A∩B| / (|A|+|B|)``; None when both masks are empty.

    Examples
    --------
    >>> dice(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0]))
    0.5
    """
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = int(a.sum() + b.sum())
    return None if total == 0 else 2.0 * int((a & b).sum()) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of the mask with at least one face neighbour outside it (or on the array border)."""
    eroded = ndimage.binary_erosion(mask, border_value=0)
    return mask & ~eroded


def hd95_mm(a: np.ndarray, b: np.ndarray, zooms_mm: tuple[float, float, float]) -> float | None:
    """Symmetric 95th-percentile Hausdorff distance between the mask surfaces, in mm.

    The larger of the two directed 95th percentiles (surface of A to surface of B and back),
    distances between voxel centres with anisotropic voxel sizes. None when a mask is empty.
    """
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    if not a.any() or not b.any():
        return None
    surface_a, surface_b = _surface(a), _surface(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=zooms_mm)
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=zooms_mm)
    return float(max(np.percentile(to_b[surface_a], 95), np.percentile(to_a[surface_b], 95)))


def per_slice_dice(pred: np.ndarray, truth: np.ndarray, axis: int) -> list[dict[str, Any]]:
    """Dice on every slice along ``axis`` where either mask has voxels."""
    p = np.moveaxis(np.asarray(pred) > 0, axis, 0)
    t = np.moveaxis(np.asarray(truth) > 0, axis, 0)
    rows = []
    for index in range(p.shape[0]):
        if p[index].any() or t[index].any():
            rows.append({"slice": index, "dice": round(dice(p[index], t[index]), 4),
                         "voxels_pred": int(p[index].sum()), "voxels_truth": int(t[index].sum())})
    return rows


def _restrict_to_common_slices(pred: np.ndarray, truth: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, int]:
    p = np.moveaxis(np.asarray(pred) > 0, axis, 0)
    t = np.moveaxis(np.asarray(truth) > 0, axis, 0)
    both = p.any(axis=(1, 2)) & t.any(axis=(1, 2))
    keep = both[:, None, None]
    return np.moveaxis(p & keep, 0, axis), np.moveaxis(t & keep, 0, axis), int(both.sum())


def compare(pred: np.ndarray, truth: np.ndarray, affine: np.ndarray, zooms_mm: tuple[float, float, float]) -> dict[str, Any]:
    """All agreement measures of ``pred`` against ``truth``.

    Parameters
    ----------
    pred, truth : (X, Y, Z) ndarray
        Binary masks on the same grid, on-disk voxel order.
    affine : (4, 4) ndarray
        Voxel → scanner RAS+ mm (for the slice axis).
    zooms_mm : (3,) tuple of float
        Voxel size in mm.

    Returns
    -------
    dict
        ``dice``, ``hd95_mm``, ``volume_pred_mm3``, ``volume_truth_mm3``, ``volume_diff_mm3``
        (pred − truth), ``volume_diff_percent``; the same with suffix ``_common`` on the slices
        both cover (``common_slices`` of them); ``per_slice`` rows.
    """
    axis = slice_axis(affine)
    voxel_mm3 = float(np.prod(zooms_mm[:3]))

    def measures(p: np.ndarray, t: np.ndarray, suffix: str) -> dict[str, Any]:
        vp, vt = float(np.sum(p > 0)) * voxel_mm3, float(np.sum(t > 0)) * voxel_mm3
        d, h = dice(p, t), hd95_mm(p, t, zooms_mm)
        return {
            f"dice{suffix}": None if d is None else round(d, 4),
            f"hd95_mm{suffix}": None if h is None else round(h, 3),
            f"volume_pred_mm3{suffix}": round(vp, 3),
            f"volume_truth_mm3{suffix}": round(vt, 3),
            f"volume_diff_mm3{suffix}": round(vp - vt, 3),
            f"volume_diff_percent{suffix}": round(100.0 * (vp - vt) / vt, 2) if vt else None,
        }

    common_pred, common_truth, n_common = _restrict_to_common_slices(pred, truth, axis)
    return {
        **measures(pred, truth, ""),
        **measures(common_pred, common_truth, "_common"),
        "common_slices": n_common,
        "per_slice": per_slice_dice(pred, truth, axis),
    }
