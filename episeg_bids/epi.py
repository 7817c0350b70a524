"""Load an EPI image and turn it into the one 3D volume that is segmented.

A 4D run ``(X, Y, Z, T)`` becomes its float32 temporal mean; a 3D mean EPI ``(X, Y, Z)`` (e.g.
ds005143's ``rec-MoCoMean_bold``) is used as is. Arrays are in on-disk voxel order; the affine
maps voxel indices to scanner RAS+ millimetres and is never changed here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputImageError

log = logging.getLogger(__name__)

#: Upper bound of one block of volumes read at a time by :func:`mean_volume`, in bytes.
BLOCK_BYTES = 16 * 2**20


@dataclass
class EpiVolume:
    """The 3D volume to segment and what was done to get it.

    Attributes
    ----------
    data : (X, Y, Z) float32 ndarray
        On-disk voxel order; non-finite input values already replaced (see ``nonfinite``).
    affine : (4, 4) ndarray
        Voxel → scanner RAS+ mm, the input's own.
    zooms_mm : (3,) tuple of float
        Voxel size along X, Y, Z in mm (from the header).
    n_volumes : int
        Volumes averaged (1 for a 3D input).
    nonfinite : int
        NaN/Inf values found in the input (all volumes), excluded from the mean.
    is_mean_of_run : bool
        True when ``data`` is the temporal mean of a 4D run computed here.
    notes : list of str
        Warnings a reader of the outputs should know (oblique affine, one-volume run, ...).
    """

    data: np.ndarray
    affine: np.ndarray
    zooms_mm: tuple[float, float, float]
    n_volumes: int
    nonfinite: int
    is_mean_of_run: bool
    repetition_time_s: float | None = None
    notes: list[str] = field(default_factory=list)


def load_image(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI image (header only, data stays on disk).

    Raises
    ------
    InputImageError
        If the file cannot be opened as NIfTI.
    """
    try:
        return nib.load(path)
    except Exception as err:  # nibabel raises several types for damaged files
        raise InputImageError(f"{path.name} cannot be read as NIfTI ({err}); check or re-export the file") from err


def image_kind(path: Path, shape: tuple[int, ...]) -> str:
    """``'run'`` for a 4D image with several volumes, ``'mean'`` for a 3D image.

    A 4D image of a single volume, or with trailing singleton axes, counts as 3D.

    Raises
    ------
    InputImageError
        For 2D images and images with more than 4 non-singleton dimensions.

    Examples
    --------
    >>> image_kind(Path('a_bold.nii.gz'), (64, 64, 20, 1))
    'mean'
    """
    dims = tuple(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims = dims[:-1]
    if len(dims) == 4:
        return "run"
    if len(dims) == 3:
        return "mean"
    raise InputImageError(
        f"{path.name} is {len(dims)}D {tuple(shape)}; expected a 3D mean EPI or a 4D run "
        "(exclude it with --bids-filter-file)"
    )


def _check_geometry(img: nib.Nifti1Image, notes: list[str]) -> None:
    zooms = img.header.get_zooms()[:3]
    if min(zooms) <= 0:
        raise InputImageError(f"voxel size {zooms} mm is not positive; fix the NIfTI header")
    axes = np.abs(img.affine[:3, :3] / np.linalg.norm(img.affine[:3, :3], axis=0))
    obliquity_deg = float(np.degrees(np.arccos(np.clip(axes.max(axis=0), -1, 1))).max())
    if obliquity_deg > 1.0:
        notes.append(
            f"oblique affine ({obliquity_deg:.1f} deg from the closest canonical axes): reoriented "
            "by permutation and flips only, as SCT does"
        )


def _nonfinite_to_zero(block: np.ndarray) -> int:
    """Set NaN/Inf values of ``block`` to 0 in place; return how many there were."""
    bad = ~np.isfinite(block)
    count = int(bad.sum())
    if count:
        block[bad] = 0
    return count


def mean_volume(img: nib.Nifti1Image, *, block_bytes: int = BLOCK_BYTES) -> tuple[np.ndarray, int]:
    """Temporal mean of a 4D run, as float32, skipping NaN/Inf samples.

    Volumes are read in blocks of at most ``block_bytes`` (as float32), so no float64 copy of
    the run is ever held; sums accumulate in a float64 ``(X, Y, Z)`` array.

    Parameters
    ----------
    img : Nifti1Image
        ``(X, Y, Z, T)`` run; trailing singleton axes are ignored.

    Returns
    -------
    mean : (X, Y, Z) float32 ndarray
        Mean over the finite samples of each voxel; 0 where a voxel has none.
    nonfinite : int
        Number of NaN/Inf samples excluded.
    """
    shape = img.shape[:4]
    n_volumes = shape[3]
    volume_bytes = int(np.prod(shape[:3])) * 4
    step = max(1, min(n_volumes, block_bytes // max(volume_bytes, 1)))
    total = np.zeros(shape[:3], dtype=np.float64)
    counts = np.zeros(shape[:3], dtype=np.int32)
    nonfinite = 0
    proxy = img.dataobj
    extra = (0,) * (len(img.shape) - 4)
    for start in range(0, n_volumes, step):
        stop = min(start + step, n_volumes)
        block = np.asarray(proxy[(slice(None),) * 3 + (slice(start, stop),) + extra], dtype=np.float32)
        finite = np.isfinite(block)
        nonfinite += int(block.size - finite.sum())
        block[~finite] = 0
        total += block.sum(axis=3, dtype=np.float64)
        counts += finite.sum(axis=3, dtype=np.int32)
    mean = np.divide(total, counts, out=np.zeros_like(total), where=counts > 0)
    return mean.astype(np.float32), nonfinite


def read_volume(path: Path) -> EpiVolume:
    """The volume to segment from ``path``: the temporal mean of a 4D run, or the 3D image.

    Raises
    ------
    InputImageError
        If the file is unreadable, truncated, 2D, or has a non-positive voxel size.
    """
    img = load_image(path)
    kind = image_kind(path, img.shape)
    notes: list[str] = []
    _check_geometry(img, notes)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    tr = _repetition_time(img)
    try:
        if kind == "run":
            data, nonfinite = mean_volume(img)
            n_volumes = img.shape[3]
            if n_volumes < 5:
                notes.append(f"only {n_volumes} volumes averaged: the mean is noisy")
        else:
            data = np.require(img.get_fdata(dtype=np.float32, caching="unchanged").reshape(img.shape[:3]),
                              requirements="W")
            nonfinite = _nonfinite_to_zero(data)
            n_volumes = 1
    except Exception as err:  # zlib, EOF and OS errors for truncated or corrupt files
        raise InputImageError(
            f"{path.name}: the image data cannot be read ({type(err).__name__}: {err}); the file is "
            "probably truncated or corrupt, re-copy or re-export it"
        ) from err
    if nonfinite:
        notes.append(f"{nonfinite} NaN/Inf values excluded from the input (set to 0 in a 3D input)")
        log.warning("%s: %d NaN/Inf values excluded", path.name, nonfinite)
    return EpiVolume(
        data=data,
        affine=img.affine.copy(),
        zooms_mm=zooms,  # type: ignore[arg-type]
        n_volumes=n_volumes,
        nonfinite=nonfinite,
        is_mean_of_run=kind == "run",
        repetition_time_s=tr,
        notes=notes,
    )


def _repetition_time(img: nib.Nifti1Image) -> float | None:
    """Repetition time in seconds from the NIfTI header (pixdim[4] and its time unit), if 4D."""
    if len(img.shape) < 4:
        return None
    tr = float(img.header.get_zooms()[3])
    unit = img.header.get_xyzt_units()[1]
    scale = {"sec": 1.0, "msec": 1e-3, "usec": 1e-6}.get(unit, 1.0)
    return tr * scale if tr > 0 else None
