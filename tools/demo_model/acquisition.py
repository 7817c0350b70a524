"""Random axial EPI acquisition grids and partial-volume sampling through them.

World coordinates are scanner RAS+ in mm. An :class:`Acquisition` has its voxel axes in
"acquisition order" ``(I, J, K)``: I ~ readout (left-right), J ~ phase encoding (anterior-posterior),
K ~ slice (inferior-superior), each tilted by a small rotation. Sampling a field through it averages
sub-samples across the slice thickness and the in-plane pixel, which simulates partial-volume effects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.spatial.transform import Rotation

#: A field maps world points ``(N, 3)`` in RAS+ mm to values ``(N, C)``.
Field = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Acquisition:
    """An axial acquisition grid.

    Attributes
    ----------
    shape : tuple of 3 int
        ``(nI, nJ, nK)`` voxels in acquisition order.
    pixel_mm : tuple of 2 float
        In-plane voxel size (readout, phase) in mm.
    slice_spacing_mm : float
        Distance between slice centres in mm (the NIfTI zoom).
    slice_thickness_mm : float
        Excited thickness in mm (<= spacing; smaller means a slice gap).
    rotation : (3, 3) ndarray
        Columns are the unit vectors of the I, J, K axes in world RAS+.
    center_mm : (3,) ndarray
        World RAS+ position of the grid centre.
    """

    shape: tuple[int, int, int]
    pixel_mm: tuple[float, float]
    slice_spacing_mm: float
    slice_thickness_mm: float
    rotation: np.ndarray
    center_mm: np.ndarray

    @property
    def zooms_mm(self) -> np.ndarray:
        """(3,) ndarray: voxel sizes ``(pI, pJ, spacingK)`` in mm."""
        return np.array([*self.pixel_mm, self.slice_spacing_mm])

    @property
    def affine(self) -> np.ndarray:
        """(4, 4) ndarray: voxel (I, J, K) -> world RAS+ mm."""
        aff = np.eye(4)
        aff[:3, :3] = self.rotation * self.zooms_mm
        aff[:3, 3] = self.center_mm - aff[:3, :3] @ ((np.array(self.shape) - 1) / 2)
        return aff


def _slice_spacing_and_thickness(rng: np.random.Generator) -> tuple[float, float]:
    """Draw slice spacing and thickness (mm): mostly 3-6 mm contiguous, some thick or gapped up to 17 mm."""
    kind = rng.random()
    if kind < 0.6:
        spacing = rng.uniform(3.0, 6.0)
        return spacing, spacing
    spacing = rng.uniform(6.0, 12.0) if kind < 0.82 else rng.uniform(12.0, 17.0)
    thickness = spacing if rng.random() < 0.4 else rng.uniform(3.0, 6.0)
    return spacing, thickness


def _n_slices(rng: np.random.Generator, spacing_mm: float, max_extent_mm: float) -> int:
    """Draw a slice count: 10-30 usually, 5-6 sometimes, bounded by the available extent."""
    n = int(rng.integers(5, 7)) if rng.random() < 0.2 else int(rng.integers(10, 31))
    return int(max(3, min(n, max_extent_mm // spacing_mm)))


def _fov_mm(rng: np.random.Generator) -> tuple[float, float]:
    """Draw the (LR, AP) field of view in mm; 30 % of the time a narrow anterior-posterior one."""
    fov_lr = rng.uniform(48.0, 140.0)
    if rng.random() < 0.3:
        return fov_lr, rng.uniform(36.0, 60.0)
    return fov_lr, float(np.clip(fov_lr * rng.uniform(0.75, 1.1), 40.0, 140.0))


def random_acquisition(
    rng: np.random.Generator,
    cord_mm: np.ndarray,
    *,
    max_extent_mm: float = 400.0,
    max_tilt_deg: float = 12.0,
    max_inplane_deg: float = 20.0,
) -> Acquisition:
    """Draw a random axial EPI acquisition that contains the cord.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness (seeded by the caller).
    cord_mm : (3,) ndarray
        World RAS+ mm position of a cord point; the grid is centred near it, never so far that the
        cord leaves the field of view.
    max_extent_mm : float, keyword-only
        Longest allowed slab (nK * spacing) in mm, e.g. the extent of the source image.
    max_tilt_deg, max_inplane_deg : float, keyword-only
        Bounds of the slab tilt (about R and A) and in-plane rotation (about S), degrees.

    Returns
    -------
    acquisition : Acquisition
        In-plane pixels 0.8-2.5 mm, slices 3-17 mm, 5-30 slices, FOV 36-140 mm.
    """
    pixel = float(np.exp(rng.uniform(np.log(0.8), np.log(2.5))))
    pixel_j = pixel if rng.random() < 0.8 else float(np.clip(pixel * rng.uniform(0.8, 1.25), 0.8, 2.5))
    spacing, thickness = _slice_spacing_and_thickness(rng)
    n_k = _n_slices(rng, spacing, max_extent_mm)
    fov_lr, fov_ap = _fov_mm(rng)
    shape = (max(24, round(fov_lr / pixel)), max(24, round(fov_ap / pixel_j)), n_k)
    angles = [rng.uniform(-max_tilt_deg, max_tilt_deg), rng.uniform(-max_tilt_deg, max_tilt_deg),
              rng.uniform(-max_inplane_deg, max_inplane_deg)]
    rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    margin = np.array([shape[0] * pixel / 2 - 10.0, shape[1] * pixel_j / 2 - 9.0, 0.0])
    margin = np.clip(margin, 0.0, None)
    offset = rng.uniform(-1.0, 1.0, 3) * margin * np.array([0.6, 0.6, 0.0])
    offset[2] = rng.uniform(-0.3, 0.3) * n_k * spacing
    center = np.asarray(cord_mm, dtype=float) + rotation @ offset
    return Acquisition(shape, (pixel, pixel_j), spacing, thickness, rotation, center)


def subsample_offsets(acq: Acquisition, *, inplane: int = 2, max_slice: int = 8) -> np.ndarray:
    """Sub-voxel sample offsets for partial-volume averaging.

    Parameters
    ----------
    acq : Acquisition
        The grid.
    inplane : int, keyword-only
        Sub-samples per in-plane axis (1 = centre only).
    max_slice : int, keyword-only
        Largest number of sub-samples across the slice thickness (one per ~1.5 mm).

    Returns
    -------
    offsets : (M, 3) ndarray
        Offsets in voxel units of (I, J, K); K offsets span the slice thickness, not the spacing.
    """
    n_k = int(np.clip(np.ceil(acq.slice_thickness_mm / 1.5), 1, max_slice))
    k = ((np.arange(n_k) + 0.5) / n_k - 0.5) * acq.slice_thickness_mm / acq.slice_spacing_mm
    ij = (np.arange(inplane) + 0.5) / inplane - 0.5
    grid = np.meshgrid(ij, ij, k, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1)


def sample_field(acq: Acquisition, field: Field, n_channels: int, *, inplane: int = 2) -> np.ndarray:
    """Acquire a field on the grid with box-profile partial-volume averaging.

    Parameters
    ----------
    acq : Acquisition
        The grid.
    field : callable
        ``field(points)`` with points ``(N, 3)`` world RAS+ mm, returning ``(N, n_channels)``.
    n_channels : int
        Number of values per point (e.g. 2: intensity and cord indicator).
    inplane : int, keyword-only
        In-plane sub-samples per axis.

    Returns
    -------
    values : (nI, nJ, nK, n_channels) ndarray, float32
        Acquisition (I, J, K) voxel order; each voxel the mean of its sub-samples.
    """
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in acq.shape], indexing="ij"), -1)
    idx = idx.reshape(-1, 3)
    aff = acq.affine
    total = np.zeros((idx.shape[0], n_channels), dtype=np.float64)
    offsets = subsample_offsets(acq, inplane=inplane)
    for off in offsets:
        pts = (idx + off) @ aff[:3, :3].T + aff[:3, 3]
        total += field(pts)
    return (total / len(offsets)).reshape(*acq.shape, n_channels).astype(np.float32)


def random_storage_order(
    data: np.ndarray, affine: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Store an acquisition-order volume in a random axis order and flips, like scanners do.

    Parameters
    ----------
    data : (nI, nJ, nK, ...) ndarray
        Acquisition (I, J, K) voxel order; trailing axes are kept.
    affine : (4, 4) ndarray
        Voxel (I, J, K) -> world RAS+ mm.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    data_disk : (X, Y, Z, ...) ndarray
        On-disk voxel order (a permutation/flip of I, J, K).
    affine_disk : (4, 4) ndarray
        Voxel -> world RAS+ mm for ``data_disk``; describes the same voxels in space.
    """
    perm = rng.permutation(3)
    flips = rng.random(3) < 0.5
    out = np.transpose(data, list(perm) + list(range(3, data.ndim)))
    aff = np.eye(4)
    aff[:3, :3] = affine[:3, :3][:, perm]
    aff[:3, 3] = affine[:3, 3]
    for ax in range(3):
        if flips[ax]:
            out = np.flip(out, axis=ax)
            n = out.shape[ax]
            aff[:3, 3] = aff[:3, 3] + aff[:3, ax] * (n - 1)
            aff[:3, ax] = -aff[:3, ax]
    return np.ascontiguousarray(out), aff
