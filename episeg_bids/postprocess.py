"""Post-processing of a cord mask with the semantics and order of ``sct_deepseg`` (SCT 7.x).

Order (REFERENCE §2 step 6), all in the input's own voxel order:

1. ``threshold``: keep voxels ``> thr`` of the foreground probability;
2. ``keep_largest_component``: 6-connectivity, whole volume;
3. ``fill_holes``: 3×3×3 all-ones structure;
4. ``remove_small_objects``: components smaller than N voxels dropped, 18-connectivity.

Arrays are ``(X, Y, Z)``; functions return new arrays and never modify their input.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .errors import UsageError


def threshold(probability: np.ndarray, thr: float) -> np.ndarray:
    """Binary mask of the voxels whose value is strictly greater than ``thr``.

    Examples
    --------
    >>> threshold(np.array([0.2, 0.5, 0.7]), 0.5)
    array([0, 0, 1], dtype=uint8)
    """
    return (np.asarray(probability) > thr).astype(np.uint8)


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep only the largest connected component (6-connectivity, face neighbours).

    Values below 0.001 count as background, as in SCT. An empty mask is returned unchanged.
    Ties keep the component with the lowest label (first in C order).
    """
    binary = np.asarray(mask) >= 0.001
    labels, n = ndimage.label(binary)
    if n <= 1:
        return binary.astype(np.uint8)
    sizes = np.bincount(labels.ravel())[1:]
    return (labels == int(np.argmax(sizes)) + 1).astype(np.uint8)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed background with ``binary_fill_holes`` and a 3×3×3 all-ones structure."""
    return ndimage.binary_fill_holes(np.asarray(mask) > 0, structure=np.ones((3, 3, 3))).astype(np.uint8)


def remove_small_objects(mask: np.ndarray, *, min_voxels: int) -> np.ndarray:
    """Drop connected components (18-connectivity) with fewer than ``min_voxels`` voxels.

    Examples
    --------
    A 2-voxel component survives ``min_voxels=2`` but not ``min_voxels=3``:

    >>> m = np.zeros((4, 1, 1), np.uint8); m[:2] = 1
    >>> int(remove_small_objects(m, min_voxels=3).sum())
    0
    """
    binary = np.asarray(mask) > 0
    labels, n = ndimage.label(binary, structure=ndimage.generate_binary_structure(3, 2))
    if n == 0:
        return binary.astype(np.uint8)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels].astype(np.uint8)


def parse_size(text: str) -> tuple[float, str]:
    """Parse ``--remove-small``: ``'20'`` or ``'20vox'`` → ``(20, 'vox')``, ``'15mm3'`` → ``(15, 'mm3')``.

    Raises
    ------
    UsageError
        If the text is not a non-negative number with an optional ``vox``/``mm3`` unit.
    """
    value = text.strip().lower()
    unit = "vox"
    for suffix in ("mm3", "vox"):
        if value.endswith(suffix):
            value, unit = value[: -len(suffix)], suffix
            break
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"--remove-small {text!r}: expected a size such as 20, 20vox or 15mm3") from None
    if number < 0:
        raise UsageError(f"--remove-small {text!r}: the size must not be negative")
    return number, unit


def size_in_voxels(size: float, unit: str, zooms_mm: tuple[float, float, float]) -> int:
    """A size in ``'vox'`` or ``'mm3'`` as a voxel count; mm³ → ``round(size / voxel volume)`` as SCT."""
    if unit == "mm3":
        return int(round(size / float(np.prod(zooms_mm[:3]))))
    return int(round(size))


def postprocess(
    mask: np.ndarray,
    *,
    probability: np.ndarray | None = None,
    thr: float | None = None,
    largest: bool = False,
    holes: bool = False,
    remove_small: tuple[float, str] | None = None,
    zooms_mm: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> tuple[np.ndarray, list[str]]:
    """Apply the chosen steps in SCT's order.

    Parameters
    ----------
    mask : (X, Y, Z) ndarray
        The argmax mask.
    probability : (X, Y, Z) ndarray, optional
        Foreground probability; required when ``thr`` is given (the threshold replaces argmax).
    thr, largest, holes, remove_small
        ``--thr``, ``--largest``, ``--fill-holes``, ``--remove-small`` (value, unit).
    zooms_mm : (3,) tuple of float
        Voxel size in mm, to convert an mm³ size.

    Returns
    -------
    mask : (X, Y, Z) uint8 ndarray
    steps : list of str
        What was applied, in order, for the sidecar.
    """
    out = (np.asarray(mask) > 0).astype(np.uint8)
    steps: list[str] = []
    if thr is not None:
        if probability is None:
            raise ValueError("thr needs the foreground probability")
        out = threshold(probability, thr)
        steps.append(f"threshold probability > {thr}")
    if largest:
        out = keep_largest_component(out)
        steps.append("keep largest component (6-connectivity)")
    if holes:
        out = fill_holes(out)
        steps.append("fill holes (3x3x3 structure)")
    if remove_small is not None:
        n = size_in_voxels(remove_small[0], remove_small[1], zooms_mm)
        out = remove_small_objects(out, min_voxels=n)
        steps.append(f"remove objects < {n} voxels (18-connectivity)")
    return out, steps
