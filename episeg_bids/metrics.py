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
            rows: list[dict[str, Any]] | None = None, n_components: int | None = None) -> dict[str, Any]:
    """Whole-mask metrics for the sidecar and the group table.

    ``rows`` are the :func:`per_slice` rows of the same mask, and ``n_components`` its number of
    components (:func:`label_components`), when the caller already has them.

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
        "components": count_components(mask) if n_components is None else int(n_components),
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
#: Smallest MAD used for the modified z-score, as a fraction of |median|. Without it the MAD
#: collapses when the central runs are close (8 runs of one real dataset: 3 flagged, one of them
#: the best run); healthy adult cord areas and volumes vary by about 10-15 % between people.
OUTLIER_MAD_FLOOR = 0.05

#: Components of a mask other than the main (largest) one that a reviewer should look at
#: (:func:`describe_components`, flag ``components``). A component is a *speck*, never flagged,
#: when it has fewer than :data:`COMPONENT_MIN_VOXELS` voxels or less than
#: :data:`COMPONENT_MIN_VOLUME_MM3` mm³: one or two stray voxels change no measure and are common
#: at the cord's border (a single 1×1×5 mm voxel is 5 mm³). Any other component is flagged when
#: at least :data:`COMPONENT_MIN_DISTANCE_MM` mm of background separate its voxels from the main
#: component's (distance between the voxels' edges, so thick slices do not push neighbours apart;
#: the cerebrospinal fluid around the cord is a few mm wide, so this is beyond the cord's border:
#: muscle, vertebra, vessels, the edge of the field of view), or when it holds at least
#: :data:`COMPONENT_LARGE_FRACTION` of the main component's volume wherever it is (a second piece
#: of cord: a broken or doubled cord). So a 20 mm³ blob 30 mm away is flagged; a speck, or a small
#: piece touching the cord, is not; every component is listed in the QC report whatever the rule.
COMPONENT_MIN_VOXELS = 2
COMPONENT_MIN_VOLUME_MM3 = 10.0
COMPONENT_MIN_DISTANCE_MM = 5.0
COMPONENT_LARGE_FRACTION = 0.2
#: Components listed by name in the ``components`` flag's message (all are in ``components``).
COMPONENTS_IN_MESSAGE = 3

#: The message of each automatic flag (one line, in sidecars and logs).
FLAG_TEXT = {
    "empty": "the mask is empty: no spinal cord was found",
    "gaps": "slices without cord inside the covered range",
    "area": f"cord area outside {PLAUSIBLE_AREA_MM2[0]:g}-{PLAUSIBLE_AREA_MM2[1]:g} mm² on some slices",
    "components": "mask components away from the cord worth a look",
    "edge": "the mask touches the in-plane edge of the field of view",
}

#: What each flag means for a reviewer, with its threshold (the QC report's legend). Flags raised
#: while reading the input (``geometry``, ``timing``) are explained in :data:`episeg_bids.epi.FLAG_LEGEND`.
FLAG_HELP = {
    "empty": "The mask is empty: the model found no spinal cord (wrong field of view, brain image, failed model).",
    "gaps": "Slices without cord between the first and the last slice with cord: the mask is interrupted.",
    "area": (f"A slice's cord area is outside {PLAUSIBLE_AREA_MM2[0]:g}–{PLAUSIBLE_AREA_MM2[1]:g} mm², the adult "
             "range (40–90 mm², Frostell et al. 2016; Kato et al. 2012) widened for EPI partial volume."),
    "components": (f"Parts of the mask apart from the cord (the largest component, 6-connectivity) that are worth a "
                   f"look: at least {COMPONENT_MIN_VOXELS} voxels and {COMPONENT_MIN_VOLUME_MM3:g} mm³, and either "
                   f"{COMPONENT_MIN_DISTANCE_MM:g} mm or more from the cord or at least "
                   f"{COMPONENT_LARGE_FRACTION:.0%} of its volume. Specks touching the cord are not flagged; every "
                   "component is listed with its slices under the run and drawn in the whole-field view (key w)."),
    "edge": "The mask touches the in-plane border of the field of view on the slices named: the cord may be cut off.",
}


def _zooms_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes in mm from the affine's column norms."""
    return tuple(float(z) for z in np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0))


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of the mask (6-connectivity), numbered by size.

    Parameters
    ----------
    mask : (X, Y, Z) ndarray
        Binary mask, on-disk voxel order.

    Returns
    -------
    labels : (X, Y, Z) int32 ndarray
        0 outside the mask; 1 for the largest component (the cord), 2 for the next largest...;
        components of equal size in the order of their first voxel (C order).
    n : int
        Number of components.

    Examples
    --------
    >>> labels, n = label_components(np.array([[[1, 0, 1, 1]]]))
    >>> labels.ravel().tolist(), n
    ([2, 0, 1, 1], 2)
    """
    raw, n = ndimage.label(np.asarray(mask) > 0)
    if n < 2:
        return raw.astype(np.int32), int(n)
    sizes = np.bincount(raw.ravel())[1:]
    first = np.full(n, raw.size)
    flat = raw.ravel()
    nonzero = np.flatnonzero(flat)
    np.minimum.at(first, flat[nonzero] - 1, nonzero)
    order = np.lexsort((first, -sizes))                    # largest first, then first voxel
    renumber = np.zeros(n + 1, np.int32)
    renumber[order + 1] = np.arange(1, n + 1, dtype=np.int32)
    return renumber[raw], int(n)


def _per_component(ufunc: np.ufunc, values: np.ndarray, owner: np.ndarray, n: int, start: float) -> np.ndarray:
    """``ufunc`` (np.minimum, np.maximum) of ``values`` over each component: ``owner[k]`` is the
    0-based component of ``values[k]``; (n,) array, ``start`` where a component has no value."""
    out = np.full(n, start, dtype=np.result_type(values, type(start)))
    ufunc.at(out, owner, values)
    return out


def describe_components(mask: np.ndarray, affine: np.ndarray, zooms_mm: tuple[float, float, float] | None = None,
                        *, labels: tuple[np.ndarray, int] | None = None) -> list[dict[str, Any]]:
    """Every connected component of the mask: where it is, how big, how far from the cord.

    Parameters
    ----------
    mask : (X, Y, Z) ndarray
        Binary mask, on-disk voxel order.
    affine : (4, 4) ndarray
        Voxel → scanner RAS+ mm.
    zooms_mm : (3,) tuple of float, optional
        Voxel size along X, Y, Z (default: the affine's column norms).
    labels : tuple, optional
        :func:`label_components` of the same mask, when the caller has it.

    Returns
    -------
    list of dict
        One per component, numbered as :func:`label_components` (``id`` 1 = the main, largest,
        component): ``voxels``, ``volume_mm3``, ``first_slice``/``last_slice`` (voxel index along
        :func:`slice_axis`; a 6-connected component covers every slice in between),
        ``centroid_mm`` ([x, y, z], scanner RAS+), ``distance_mm`` (shortest distance between its
        voxels and the main component's, voxel edge to voxel edge: 0 when they touch by an edge or
        a corner), ``speck`` and ``flagged`` (see :data:`COMPONENT_MIN_VOXELS` and the rule there).
    """
    zooms = tuple(float(z) for z in (zooms_mm if zooms_mm is not None else _zooms_of(affine))[:3])
    labelled, n = labels if labels is not None else label_components(mask)
    if n == 0:
        return []
    flat = labelled.ravel()
    where = np.flatnonzero(flat)                                      # mask voxels, C order
    owner = flat[where] - 1                                           # their component, 0-based
    ids = np.arange(1, n + 1)
    voxels = np.bincount(owner, minlength=n)
    coords = np.unravel_index(where, labelled.shape)                  # voxel indices, per axis
    centres = np.column_stack([np.bincount(owner, c, minlength=n) for c in coords]) / voxels[:, None]
    world = centres @ np.asarray(affine, float)[:3, :3].T + np.asarray(affine, float)[:3, 3]
    gaps = np.zeros(n)
    if n > 1:
        # distance from the main component's voxel boxes = distance of voxel centres to the main
        # component grown by one voxel in every direction (26-neighbourhood), with anisotropic voxels
        grown = ndimage.binary_dilation(labelled == 1, structure=np.ones((3, 3, 3), bool))
        distance = ndimage.distance_transform_edt(~grown, sampling=zooms)
        gaps = _per_component(np.minimum, distance.ravel()[where], owner, n, np.inf)
    along = coords[slice_axis(affine)]                                # each voxel's slice index
    first = _per_component(np.minimum, along, owner, n, labelled.shape[slice_axis(affine)])
    last = _per_component(np.maximum, along, owner, n, -1)
    volumes = voxels * float(np.prod(zooms))
    main_mm3 = float(volumes[0])
    specks = (voxels < COMPONENT_MIN_VOXELS) | (volumes < COMPONENT_MIN_VOLUME_MM3)
    flagged = ~specks & ((gaps >= COMPONENT_MIN_DISTANCE_MM) | (volumes >= COMPONENT_LARGE_FRACTION * main_mm3))
    flagged[0] = specks[0] = False                      # the main component is neither
    # one dict per component from plain Python lists: thousands of components (a failed model)
    # cost milliseconds, not a Python loop over NumPy scalars
    columns = zip(ids.tolist(), voxels.tolist(), np.round(volumes, 3).tolist(), first.tolist(), last.tolist(),
                  np.round(world, 2).tolist(), np.round(gaps, 2).tolist(), specks.tolist(), flagged.tolist())
    return [{"id": k, "main": k == 1, "voxels": v, "volume_mm3": vol, "first_slice": f, "last_slice": l,
             "centroid_mm": c, "distance_mm": g, "speck": sp, "flagged": fl}
            for k, v, vol, f, l, c, g, sp, fl in columns]


def slice_range(first: int, last: int) -> str:
    """``'7'`` or ``'7–9'``: a component's slices for messages and tables."""
    return str(first) if first == last else f"{first}–{last}"


def edge_slices(mask: np.ndarray, axis: int) -> list[int]:
    """Slices (index along ``axis``) whose mask has voxels on the in-plane border (first/last
    index of the two other axes)."""
    binary = np.moveaxis(np.asarray(mask) > 0, axis, 0)
    border = binary[:, 0, :].any(axis=1) | binary[:, -1, :].any(axis=1) | binary[:, :, 0].any(axis=1) \
        | binary[:, :, -1].any(axis=1)
    return np.flatnonzero(border).tolist()


def edge_contact(mask: np.ndarray, axis: int) -> bool:
    """True when the mask has voxels on the in-plane border (first/last index of the two axes
    other than the slice ``axis``)."""
    return bool(edge_slices(mask, axis))


def _component_words(item: dict[str, Any]) -> str:
    return (f"#{item['id']} on slice{'s' if item['first_slice'] != item['last_slice'] else ''} "
            f"{slice_range(item['first_slice'], item['last_slice'])} ({item['volume_mm3']:.4g} mm³, "
            f"{item['distance_mm']:.1f} mm from the cord)")


def quality_flags(mask: np.ndarray, affine: np.ndarray, rows: list[dict[str, Any]],
                  summary_: dict[str, Any], *, zooms_mm: tuple[float, float, float] | None = None,
                  components: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Automatic QC flags of one mask, each ``{'code', 'message', 'slices'}``.

    Codes: ``empty``, ``gaps`` (slices without cord between the first and last covered slice),
    ``area`` (a covered slice outside :data:`PLAUSIBLE_AREA_MM2`), ``components`` (components a
    reviewer should look at, rule at :data:`COMPONENT_MIN_VOXELS`; the flag also carries them as
    ``components``, the :func:`describe_components` entries) and ``edge`` (touches the in-plane
    field-of-view border). ``slices`` lists the slice indices concerned.

    Parameters
    ----------
    mask : (X, Y, Z) ndarray
        Binary mask, on-disk voxel order.
    affine : (4, 4) ndarray
        Voxel → scanner RAS+ mm.
    rows, summary_ :
        :func:`per_slice` and :func:`summary` of the same mask.
    zooms_mm : (3,) tuple of float, optional
        Voxel size along X, Y, Z (default: the affine's column norms).
    components : list of dict, optional
        :func:`describe_components` of the same mask, when the caller has it.
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
    if summary_.get("components", 2) > 1:
        if components is None:
            components = describe_components(mask, affine, zooms_mm)
        chosen = [c for c in components if c["flagged"]]
        if chosen:
            slices = sorted({s for c in chosen for s in range(c["first_slice"], c["last_slice"] + 1)})
            words = "; ".join(_component_words(c) for c in chosen[:COMPONENTS_IN_MESSAGE])
            more = len(chosen) - COMPONENTS_IN_MESSAGE
            item = flag("components", slices, f": {words}" + (f"; and {more} more" if more > 0 else ""))
            item["components"] = chosen
            flags.append(item)
    edge = edge_slices(mask, slice_axis(affine))
    if edge:
        flags.append(flag("edge", edge, f": slice{'s' if len(edge) > 1 else ''} {', '.join(map(str, edge))}"))
    return flags
