"""RAS+ reorientation and network axis order, exactly as SCT feeds nnUNetv2 (REFERENCE §2).

Two array conventions appear in this package:

* ``(X, Y, Z) on-disk order``: the NIfTI voxel order, axes given by the image affine;
* ``(Z, Y, X) network order``: the RAS+ array transposed with ``transpose(2, 1, 0)``, spacing
  reversed, which is what ``nnUNetPredictor.predict_single_npy_array`` receives.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

RAS = nib.orientations.axcodes2ornt(("R", "A", "S"))


def reorient_to_ras(
    data: np.ndarray, affine: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorient a 3D array to RAS+ by permutation and flips only.

    Parameters
    ----------
    data : (X, Y, Z) ndarray
        On-disk voxel order.
    affine : (4, 4) ndarray
        Voxel -> scanner RAS+ mm.

    Returns
    -------
    data_ras : (X', Y', Z') ndarray
        Same voxels, axes now pointing R, A, S (closest canonical, like ``nib.as_closest_canonical``).
    affine_ras : (4, 4) ndarray
        Voxel -> scanner RAS+ mm affine of ``data_ras``.
    source_ornt : (3, 2) ndarray
        nibabel orientation of the input axes; pass it to :func:`reorient_from_ras`.
    """
    source_ornt = nib.orientations.io_orientation(affine)
    transform = nib.orientations.ornt_transform(source_ornt, RAS)
    data_ras = nib.orientations.apply_orientation(data, transform)
    inv = nib.orientations.inv_ornt_aff(transform, data.shape)
    return data_ras, affine @ inv, source_ornt


def reorient_from_ras(data_ras: np.ndarray, source_ornt: np.ndarray) -> np.ndarray:
    """Undo :func:`reorient_to_ras` on an array of the RAS+ shape.

    Parameters
    ----------
    data_ras : (X', Y', Z') ndarray
        RAS+ voxel order.
    source_ornt : (3, 2) ndarray
        Orientation returned by :func:`reorient_to_ras`.

    Returns
    -------
    data : (X, Y, Z) ndarray
        Back in the original on-disk voxel order.
    """
    back = nib.orientations.ornt_transform(RAS, source_ornt)
    return nib.orientations.apply_orientation(data_ras, back)


def to_network_order(
    data_ras: np.ndarray, zooms_ras_mm: tuple[float, float, float]
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """RAS+ (X, Y, Z) array -> (Z, Y, X) network array, spacing reversed.

    Parameters
    ----------
    data_ras : (X, Y, Z) ndarray
        RAS+ voxel order.
    zooms_ras_mm : tuple of 3 float
        Voxel sizes of ``data_ras`` in mm, (px, py, pz).

    Returns
    -------
    array : (Z, Y, X) ndarray, float32
        ``data_ras.transpose(2, 1, 0)``.
    spacing_mm : tuple of 3 float
        (pz, py, px).
    """
    array = np.ascontiguousarray(data_ras.transpose(2, 1, 0), dtype=np.float32)
    spacing = tuple(float(z) for z in zooms_ras_mm[::-1])
    return array, spacing  # type: ignore[return-value]


def ras_zooms(affine_ras: np.ndarray) -> tuple[float, float, float]:
    """Voxel sizes in mm of a (possibly slightly oblique) RAS+ affine.

    Parameters
    ----------
    affine_ras : (4, 4) ndarray
        Voxel -> scanner RAS+ mm.

    Returns
    -------
    zooms_mm : tuple of 3 float
        Column norms of the 3x3 part, (px, py, pz).
    """
    return tuple(float(v) for v in np.sqrt((affine_ras[:3, :3] ** 2).sum(0)))  # type: ignore[return-value]
