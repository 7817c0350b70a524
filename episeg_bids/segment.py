"""Segment one 3D EPI volume with an nnUNetv2 predictor exactly as ``sct_deepseg sc_epi`` does.

REFERENCE §2 (SCT 7.x), steps 2–5:

1. reorient the volume to the model's orientation (RAS+ unless ``dataset.json`` says otherwise)
   by axis permutation and flips only, no resampling;
2. ``array = data.transpose(2, 1, 0)[None].astype(float32)`` and ``spacing = zooms`` reversed,
   i.e. network order ``(channel, Z, Y, X)`` with spacing ``(pz, py, px)`` in mm;
3. ``predictor.predict_single_npy_array(array, {'spacing': spacing})`` → argmax label map;
4. transpose back and undo the reorientation, so the mask lies on the input's own grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform


@dataclass
class Segmentation:
    """Model output on the input grid.

    Attributes
    ----------
    mask : (X, Y, Z) uint8 ndarray
        1 where the argmax label is any foreground label, else 0; on-disk voxel order.
    foreground_probability : (X, Y, Z) float32 ndarray or None
        ``1 - P(background)`` in [0, 1] (the label's name does not matter), when asked for.
    """

    mask: np.ndarray
    foreground_probability: np.ndarray | None


def reorientation(affine: np.ndarray, target: tuple[str, str, str] = ("R", "A", "S")) -> np.ndarray:
    """Orientation transform from the image's voxel axes to ``target`` axis codes.

    Parameters
    ----------
    affine : (4, 4) ndarray
        Voxel → scanner RAS+ mm.
    target : tuple of 3 str
        nibabel axis codes, e.g. ``('R', 'A', 'S')`` for RAS+.

    Returns
    -------
    ornt : (3, 2) ndarray
        nibabel orientation array (output axis, flip) to use with ``apply_orientation``: only
        permutations and flips, so no voxel value changes.
    """
    return ornt_transform(io_orientation(affine), axcodes2ornt(target))


def to_network_input(data: np.ndarray, zooms_mm: tuple[float, float, float], ornt: np.ndarray):
    """Reorient an ``(X, Y, Z)`` volume and put it in nnUNet's ``(1, Z, Y, X)`` order.

    Returns
    -------
    array : (1, Z', Y', X') float32 ndarray
        Axes of the reoriented volume, reversed, with a leading channel axis.
    spacing : tuple of 3 float
        Voxel size in mm along ``Z', Y', X'`` (the reoriented zooms, reversed).
    """
    reoriented = apply_orientation(data, ornt)
    zooms_out = [0.0, 0.0, 0.0]
    for axis, (out_axis, _flip) in enumerate(ornt):
        zooms_out[int(out_axis)] = float(zooms_mm[axis])
    array = reoriented.transpose(2, 1, 0)[None].astype(np.float32)
    return array, tuple(zooms_out[::-1])


def from_network_output(volume: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_network_input` for a ``(Z', Y', X')`` array: back to ``(X, Y, Z)``."""
    inverse = np.zeros_like(ornt)
    for axis, (out_axis, flip) in enumerate(ornt):
        inverse[int(out_axis)] = (axis, flip)
    return apply_orientation(volume.transpose(2, 1, 0), inverse)


def segment_volume(
    predictor,
    data: np.ndarray,
    affine: np.ndarray,
    zooms_mm: tuple[float, float, float],
    *,
    orientation: tuple[str, str, str] = ("R", "A", "S"),
    probabilities: bool = False,
) -> Segmentation:
    """Run the loaded ``nnUNetPredictor`` on one volume, as SCT does, and map the result back.

    Parameters
    ----------
    predictor : nnunetv2.inference.predict_from_raw_data.nnUNetPredictor
        Already initialised (see :func:`episeg_bids.model.load_predictor`); reused across calls.
    data : (X, Y, Z) ndarray
        The volume in on-disk voxel order.
    affine : (4, 4) ndarray
        Voxel → scanner RAS+ mm.
    zooms_mm : (3,) tuple of float
        Voxel size along X, Y, Z in mm.
    orientation : tuple of 3 str
        The orientation the network expects (nibabel axis codes).
    probabilities : bool
        Also return the foreground probability (softmax), on the same grid.

    Returns
    -------
    Segmentation
        Mask (uint8, 0/1) and optional probability, ``(X, Y, Z)`` on the input's grid.
    """
    ornt = reorientation(affine, orientation)
    array, spacing = to_network_input(data, zooms_mm, ornt)
    result = predictor.predict_single_npy_array(
        array, {"spacing": list(spacing)}, None, None, probabilities
    )
    if probabilities:
        labels, softmax = result
        foreground = np.clip(1.0 - softmax[0], 0.0, 1.0).astype(np.float32)
        probability = np.ascontiguousarray(from_network_output(foreground, ornt))
    else:
        labels, probability = result, None
    mask = np.ascontiguousarray(from_network_output(np.asarray(labels) > 0, ornt)).astype(np.uint8)
    return Segmentation(mask=mask, foreground_probability=probability)
