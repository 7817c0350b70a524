"""Whole training/evaluation cases: an image and mask stored as a scanner would store them.

A case is produced from one integer seed, so any case can be regenerated on its own and in any
process. Both kinds end in a random on-disk axis order and flips (see
:func:`~demo_model.acquisition.random_storage_order`).
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from .acquisition import random_acquisition, random_storage_order, sample_field
from .artefacts import apply_random_artefacts
from .augment import SourceImage, augmented_view
from .phantoms import cord_point_mm, phantom_field, random_phantom


@dataclass(frozen=True)
class Case:
    """An image and its cord mask as stored on disk.

    Attributes
    ----------
    image : (X, Y, Z) ndarray, float32
        On-disk voxel order.
    mask : (X, Y, Z) ndarray, uint8
        Binary cord mask, same grid.
    affine : (4, 4) ndarray
        Voxel -> world RAS+ mm.
    """

    image: np.ndarray
    mask: np.ndarray
    affine: np.ndarray

    def to_nifti(self) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
        """The image (float32) and mask (uint8) as NIfTI images with qform and sform set."""
        imgs = []
        for data, dtype in ((self.image, np.float32), (self.mask, np.uint8)):
            im = nib.Nifti1Image(data.astype(dtype), self.affine)
            im.set_qform(self.affine, code=1)
            im.set_sform(self.affine, code=1)
            imgs.append(im)
        return imgs[0], imgs[1]


def _stored(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, rng: np.random.Generator) -> Case:
    """Put acquisition-order arrays into a random on-disk order."""
    both, aff = random_storage_order(np.stack([image, mask.astype(np.float32)], -1), affine, rng)
    return Case(both[..., 0].astype(np.float32), (both[..., 1] > 0.5).astype(np.uint8), aff)


def phantom_case(seed: int) -> Case:
    """Synthetic EPI-like phantom case from ``seed`` (see :mod:`demo_model.phantoms`)."""
    rng = np.random.default_rng(seed)
    params = random_phantom(rng)
    cord = cord_point_mm(params, rng.uniform(-150, 150))
    acq = random_acquisition(rng, cord)
    values = sample_field(acq, lambda pts: phantom_field(params, pts), 2)
    centre_vox = nib.affines.apply_affine(np.linalg.inv(acq.affine), cord)
    image = apply_random_artefacts(values[..., 0], rng, centre_vox, acq.zooms_mm)
    return _stored(image, values[..., 1] > 0.5, acq.affine, rng)


def real_view_case(source: SourceImage, seed: int) -> Case:
    """Augmented re-acquisition of a real image from ``seed`` (see :mod:`demo_model.augment`)."""
    rng = np.random.default_rng(seed)
    image, mask, acq = augmented_view(source, rng)
    return _stored(image, mask, acq.affine, rng)
