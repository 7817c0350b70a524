"""Cord metrics of a binary mask, from arrays and the affine only.

"Slices" are taken along the voxel axis closest to the superior–inferior direction of the
scanner (from the affine, as ``nibabel.orientations.io_orientation`` picks it), so the metrics are
the same for an image stored as LAS, RAS or with permuted axes. The cross-sectional area of a
slice is its voxel count times the in-plane voxel area (product of the two other zooms); it is an
area in the image's slice plane, not corrected for the angle between cord and slice.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from nibabel.orientations import io_orientation
from scipy import ndimage


def slice_axis(affine: np.ndarray) -> int:
    """Voxel axis (0, 1 or 2) closest to the scanner's superior–inferior direction.

    Examples
    --------
    >>> slice_axis(np.diag([1, 1, 1, 1]))
    2
    >>> slice_axis(np.array([[0, 0, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]))
    1
    """
    ornt = io_orientation(affine)
    return int(np.flatnonzero(ornt[:, 0] == 2)[0])


def slice_area_mm2(zooms_mm: tuple[float, float, float], axis: int) -> float:
    """Area in mm² of one voxel's face in the slice plane orthogonal to ``axis``."""
    others = [z for i, z in enumerate(zooms_mm[:3]) if i != axis]
    return float(others[0] * others[1])


def count_components(mask: np.ndarray) -> int:
    """Connected components of the mask, 6-connectivity (as ``keep_largest_component``)."""
    return int(ndimage.label(np.asarray(mask) > 0)[1])


def per_slice(mask: np.ndarray, affine: np.ndarray, zooms_mm: tuple[float, float, float]) -> list[dict[str, Any]]:
    """One row per slice: index (original voxel index), voxels, area in mm², centroid in mm.

    Parameters
    ----------
    mask : (X, Y, Z) ndarray
        Binary mask, on-disk voxel order.
    affine : (4, 4) ndarray
        Voxel → scanner RAS+ mm.
    zooms_mm : (3,) tuple of float
        Voxel size along X, Y, Z.

    Returns
    -------
    rows : list of dict
        ``slice`` (index along :func:`slice_axis`), ``voxels``, ``area_mm2``, and
        ``centroid_x_mm``/``_y_mm``/``_z_mm`` (scanner RAS+ mm, None on an empty slice).
    """
    axis = slice_axis(affine)
    binary = np.moveaxis(np.asarray(mask) > 0, axis, 0)
    face = slice_area_mm2(zooms_mm, axis)
    rows = []
    for index, plane in enumerate(binary):
        voxels = int(plane.sum())
        centroid: list[float | None] = [None, None, None]
        if voxels:
            ij = np.argwhere(plane).mean(axis=0)
            ijk = np.insert(ij, axis, index)
            centroid = [round(float(c), 3) for c in affine[:3, :3] @ ijk + affine[:3, 3]]
        rows.append({
            "slice": index,
            "voxels": voxels,
            "area_mm2": round(voxels * face, 3),
            "centroid_x_mm": centroid[0],
            "centroid_y_mm": centroid[1],
            "centroid_z_mm": centroid[2],
        })
    return rows


def summary(mask: np.ndarray, affine: np.ndarray, zooms_mm: tuple[float, float, float],
            rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Whole-mask metrics for the sidecar and the group table.

    ``rows`` are the :func:`per_slice` rows of the same mask when the caller already has them.

    Returns
    -------
    dict
        ``voxels``, ``volume_mm3``, ``slice_axis``, ``n_slices``, ``slices_with_cord``,
        ``first_slice``/``last_slice`` with cord (None when empty), ``mean_area_mm2`` over the
        slices with cord, ``components`` (6-connectivity).
    """
    rows = per_slice(mask, affine, zooms_mm) if rows is None else rows
    covered = [r["slice"] for r in rows if r["voxels"]]
    voxels = int(sum(r["voxels"] for r in rows))
    areas = [r["area_mm2"] for r in rows if r["voxels"]]
    return {
        "voxels": voxels,
        "volume_mm3": round(voxels * float(np.prod(zooms_mm[:3])), 3),
        "slice_axis": slice_axis(affine),
        "n_slices": len(rows),
        "slices_with_cord": len(covered),
        "first_slice": covered[0] if covered else None,
        "last_slice": covered[-1] if covered else None,
        "mean_area_mm2": round(float(np.mean(areas)), 3) if areas else None,
        "components": count_components(mask),
    }


#: Plausible cord cross-sectional area of an adult human cord on one slice, in mm².
#: Healthy adult cords measure about 7-9 mm antero-posterior by 8-13 mm transverse from C1 to
#: the conus (Frostell et al. 2016, Front. Neurol. 7:238, segmental diameters), i.e. areas of
#: roughly 40-90 mm²; C2-C3 cross-sectional areas on MRI are 64-91 mm² (Kato et al. 2012,
#: AJNR 33:1213). The range is widened for EPI partial volume (1-2.5 mm voxels, thick slices,
#: slices oblique to the cord), so only clearly implausible slices are flagged.
PLAUSIBLE_AREA_MM2 = (20.0, 150.0)

#: |modified z| above this marks a group outlier (Iglewicz & Hoaglin 1993, modified z-score).
OUTLIER_Z = 3.5
#: Fewer runs than this give no outlier flags: the median absolute deviation is meaningless.
OUTLIER_MIN_RUNS = 5

#: The message of each automatic flag (one line, in sidecars and logs).
FLAG_TEXT = {
    "empty": "the mask is empty: no spinal cord was found",
    "gaps": "slices without cord inside the covered range",
    "area": f"cord area outside {PLAUSIBLE_AREA_MM2[0]:g}-{PLAUSIBLE_AREA_MM2[1]:g} mm² on some slices",
    "components": "the mask has more than one connected component",
    "edge": "the mask touches the in-plane edge of the field of view",
}

#: What each flag means for a reviewer, with its threshold (the QC report's legend). Flags raised
#: while reading the input (``geometry``, ``timing``) are explained in :data:`episeg_bids.epi.FLAG_LEGEND`.
FLAG_HELP = {
    "empty": "The mask is empty: the model found no spinal cord (wrong field of view, brain image, failed model).",
    "gaps": "Slices without cord between the first and the last slice with cord: the mask is interrupted.",
    "area": (f"A slice's cord area is outside {PLAUSIBLE_AREA_MM2[0]:g}–{PLAUSIBLE_AREA_MM2[1]:g} mm², the adult "
             "range (40–90 mm², Frostell et al. 2016; Kato et al. 2012) widened for EPI partial volume."),
    "components": "More than one connected component (6-connectivity): islands outside the cord or a broken cord.",
    "edge": "The mask touches the in-plane border of the field of view: the cord may be cut off.",
}


def edge_contact(mask: np.ndarray, axis: int) -> bool:
    """True when the mask has voxels on the in-plane border (first/last index of the two axes
    other than the slice ``axis``)."""
    binary = np.moveaxis(np.asarray(mask) > 0, axis, 0)
    return bool(binary[:, 0, :].any() or binary[:, -1, :].any() or binary[:, :, 0].any() or binary[:, :, -1].any())


def quality_flags(mask: np.ndarray, affine: np.ndarray, rows: list[dict[str, Any]],
                  summary_: dict[str, Any]) -> list[dict[str, Any]]:
    """Automatic QC flags of one mask, each ``{'code', 'message', 'slices'}``.

    Codes: ``empty``, ``gaps`` (slices without cord between the first and last covered slice),
    ``area`` (a covered slice outside :data:`PLAUSIBLE_AREA_MM2`), ``components`` (more than
    one, 6-connectivity) and ``edge`` (touches the in-plane field-of-view border). ``slices``
    lists the slice indices concerned (empty when the flag is about the whole mask).
    """
    def flag(code: str, slices: list[int] | None = None, detail: str = "") -> dict[str, Any]:
        return {"code": code, "message": FLAG_TEXT[code] + detail, "slices": slices or []}

    if summary_["voxels"] == 0:
        return [flag("empty")]
    flags = []
    first, last = summary_["first_slice"], summary_["last_slice"]
    gaps = [r["slice"] for r in rows if first < r["slice"] < last and r["voxels"] == 0]
    if gaps:
        flags.append(flag("gaps", gaps, f": {', '.join(map(str, gaps))}"))
    low, high = PLAUSIBLE_AREA_MM2
    odd = [r["slice"] for r in rows if r["voxels"] and not low <= r["area_mm2"] <= high]
    if odd:
        flags.append(flag("area", odd, f": slices {', '.join(map(str, odd))}"))
    if summary_["components"] > 1:
        flags.append(flag("components", detail=f" ({summary_['components']})"))
    if edge_contact(mask, slice_axis(affine)):
        flags.append(flag("edge"))
    return flags
