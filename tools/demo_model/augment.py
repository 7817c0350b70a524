"""Augmented re-acquisitions of a real EPI image and its manual cord mask.

The real image (the Leipzig moco mean) is treated as a continuous field in world RAS+ mm: it is
deformed (global/anisotropic scaling about the cord, smooth elastic displacement), then acquired
through a random :class:`~demo_model.acquisition.Acquisition` with partial-volume averaging, so
voxel size, slice thickness/gap, field of view, tilt and rotation all vary; EPI artefacts follow.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import nibabel as nib
import numpy as np
from scipy import ndimage

from .acquisition import Acquisition, Field, random_acquisition, sample_field
from .artefacts import apply_random_artefacts


@dataclass(frozen=True)
class SourceImage:
    """A real image and mask used as a continuous field.

    Attributes
    ----------
    image : (X, Y, Z) ndarray, float32
        On-disk voxel order.
    mask : (X, Y, Z) ndarray, float32
        Binary cord mask on the same grid.
    affine : (4, 4) ndarray
        Voxel -> world RAS+ mm.
    """

    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray

    @classmethod
    def load(cls, image_path: str, mask_path: str) -> "SourceImage":
        """Read a 3D image and its mask (same grid) from NIfTI files."""
        img = nib.load(image_path)
        msk = nib.load(mask_path)
        if img.shape != msk.shape or not np.allclose(img.affine, msk.affine, atol=1e-3):
            raise ValueError(f"{mask_path} grid {msk.shape} does not match {image_path} grid {img.shape}")
        return cls(np.asarray(img.dataobj, dtype=np.float32),
                   (np.asarray(msk.dataobj) > 0).astype(np.float32), img.affine)

    def cord_points_mm(self) -> np.ndarray:
        """(K, 3) world RAS+ mm of the mask's centre of mass on each slice (axis 2) holding cord."""
        pts = [np.r_[ndimage.center_of_mass(self.mask[:, :, k]), k]
               for k in range(self.mask.shape[2]) if self.mask[:, :, k].any()]
        return nib.affines.apply_affine(self.affine, np.array(pts))

    def z_range_mm(self) -> tuple[float, float]:
        """World S range (mm) covered by the image's slice centres."""
        corners = nib.affines.apply_affine(self.affine, [[0, 0, 0], [0, 0, self.image.shape[2] - 1]])
        return float(corners[:, 2].min()), float(corners[:, 2].max())


@dataclass(frozen=True)
class Deformation:
    """Scaling about ``centre_mm`` then a smooth displacement, mapping target -> source world mm."""

    centre_mm: np.ndarray
    scale: np.ndarray  # (3,) anatomy magnification along R, A, S
    grid_origin_mm: np.ndarray
    grid_step_mm: float
    displacement: np.ndarray  # (3, a, b, c) mm

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        """Map target world points (N, 3) mm to source world points (N, 3) mm."""
        src = self.centre_mm + (pts - self.centre_mm) / self.scale
        coords = ((src - self.grid_origin_mm) / self.grid_step_mm).T
        disp = np.stack([ndimage.map_coordinates(d, coords, order=1, mode="nearest")
                         for d in self.displacement], axis=1)
        return src + disp


def random_deformation(rng: np.random.Generator, source: SourceImage, centre_mm: np.ndarray) -> Deformation:
    """Draw a random anatomical deformation of ``source`` about ``centre_mm``.

    Scaling 0.82-1.22 overall with +-10 % in-plane anisotropy; elastic displacement with a 12-20 mm
    control grid and 0-2.5 mm amplitude.
    """
    overall = rng.uniform(0.82, 1.22)
    scale = overall * np.array([rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1), rng.uniform(0.9, 1.1)])
    step = rng.uniform(12.0, 20.0)
    corners = nib.affines.apply_affine(
        source.affine, np.array(np.meshgrid(*[[0, n - 1] for n in source.image.shape])).reshape(3, -1).T)
    lo, hi = corners.min(0) - 3 * step, corners.max(0) + 3 * step
    shape = tuple(int(v) for v in np.ceil((hi - lo) / step) + 1)
    amp = rng.uniform(0.0, 2.5)
    disp = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), 1.0) for _ in range(3)])
    disp *= amp / (disp.std() + 1e-8)
    disp[2] *= 0.5  # less deformation along the cord
    return Deformation(np.asarray(centre_mm, float), scale, lo, step, disp)


def source_field(source: SourceImage, deform: Deformation, background: float) -> Field:
    """Field returning (intensity, cord fraction) of the deformed source at world points.

    Parameters
    ----------
    source : SourceImage
        Real image and mask.
    deform : Deformation
        Target -> source world mapping.
    background : float
        Intensity returned outside the source's field of view (mask 0 there).

    Returns
    -------
    field : callable
        ``field(points)`` with points ``(N, 3)`` world RAS+ mm -> ``(N, 2)``: linear-interpolated
        intensity and cord fraction (partial-volume value in [0, 1]).
    """
    inv = np.linalg.inv(source.affine)

    def field(pts: np.ndarray) -> np.ndarray:
        vox = nib.affines.apply_affine(inv, deform(pts)).T
        img = ndimage.map_coordinates(source.image, vox, order=1, mode="constant", cval=background)
        msk = ndimage.map_coordinates(source.mask, vox, order=1, mode="constant", cval=0.0)
        return np.column_stack([img, msk])

    return field


def fit_slab(acq: Acquisition, z_lo_mm: float, z_hi_mm: float) -> Acquisition:
    """Shift an acquisition along its slice axis so its slab stays inside [z_lo, z_hi] mm (S)."""
    half = (acq.shape[2] - 1) / 2 * acq.slice_spacing_mm * abs(acq.rotation[2, 2])
    lo, hi = z_lo_mm + half, z_hi_mm - half
    z = acq.center_mm[2] if lo > hi else float(np.clip(acq.center_mm[2], lo, hi))
    k_axis = acq.rotation[:, 2]
    centre = acq.center_mm + k_axis * (z - acq.center_mm[2]) / k_axis[2]
    return replace(acq, center_mm=centre)


def augmented_view(source: SourceImage, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, Acquisition]:
    """One random re-acquisition of the real image.

    Parameters
    ----------
    source : SourceImage
        The real image and mask.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    image : (nI, nJ, nK) ndarray, float32
        Acquisition order, with EPI artefacts and arbitrary gain.
    mask : (nI, nJ, nK) ndarray, uint8
        Cord mask: partial-volume fraction > 0.5.
    acquisition : Acquisition
        The grid; ``acquisition.affine`` maps (I, J, K) to world RAS+ mm.
    """
    cord_pts = source.cord_points_mm()
    centre = cord_pts[rng.integers(len(cord_pts))]
    z_lo, z_hi = source.z_range_mm()
    acq = random_acquisition(rng, centre, max_extent_mm=(z_hi - z_lo) * 0.9)
    acq = fit_slab(acq, z_lo, z_hi)
    deform = random_deformation(rng, source, centre)
    background = float(np.percentile(source.image, 2))
    values = sample_field(acq, source_field(source, deform, background), 2)
    centre_vox = nib.affines.apply_affine(np.linalg.inv(acq.affine), centre)
    image = apply_random_artefacts(np.clip(values[..., 0], 0, None), rng, centre_vox, acq.zooms_mm)
    return image, (values[..., 1] > 0.5).astype(np.uint8), acq
