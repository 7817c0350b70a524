"""EPI intensity effects applied to an acquired volume.

All functions take ``img : (nI, nJ, nK) ndarray`` in acquisition order (I readout ~ LR, J phase
encoding ~ AP, K slice) with non-negative intensities, and return a new array of the same shape.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def _unit_grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Voxel coordinates scaled to [-1, 1] per axis (broadcastable open grids)."""
    return [np.linspace(-1, 1, n).reshape([-1 if a == i else 1 for a in range(len(shape))])
            for i, n in enumerate(shape)]


def bias_field(img: np.ndarray, rng: np.random.Generator, *, strength: float = 0.5) -> np.ndarray:
    """Multiply by a smooth coil-sensitivity-like shading (exp of a random quadratic, max ~ e^strength)."""
    gi, gj, gk = _unit_grid(img.shape)
    terms = [gi, gj, gk * 0.5, gi * gj, gi ** 2, gj ** 2]
    log_b = sum(rng.uniform(-1, 1) * t for t in terms) * strength / 2
    return img * np.exp(log_b)


def gamma(img: np.ndarray, rng: np.random.Generator, *, low: float = 0.7, high: float = 1.5) -> np.ndarray:
    """Non-linear contrast change ``(img / max) ** g * max`` with g drawn log-uniformly."""
    peak = float(np.percentile(img, 99.9)) + 1e-6
    g = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    return np.clip(img / peak, 0, None) ** g * peak


def nyquist_ghost(img: np.ndarray, rng: np.random.Generator, *, max_level: float = 0.12) -> np.ndarray:
    """Add an N/2 ghost: the image shifted by half the field of view along phase encoding (J)."""
    level = rng.uniform(0.02, max_level)
    return img + level * np.roll(img, img.shape[1] // 2, axis=1)


def dropout(img: np.ndarray, rng: np.random.Generator, centre_vox: np.ndarray,
            zooms_mm: np.ndarray) -> np.ndarray:
    """Susceptibility signal loss: a dark Gaussian blob near ``centre_vox`` on some slices.

    Parameters
    ----------
    img : (nI, nJ, nK) ndarray
        Acquisition order.
    rng : numpy.random.Generator
        Source of randomness.
    centre_vox : (3,) ndarray
        Approximate cord position in voxels (I, J, K).
    zooms_mm : (3,) ndarray
        Voxel sizes in mm.
    """
    sigma_mm = rng.uniform(5, 20)
    depth = rng.uniform(0.3, 0.8)
    c = np.asarray(centre_vox[:2]) + rng.normal(0, 8, 2) / zooms_mm[:2]
    gi = (np.arange(img.shape[0]) - c[0])[:, None] * zooms_mm[0]
    gj = (np.arange(img.shape[1]) - c[1])[None, :] * zooms_mm[1]
    blob = np.exp(-(gi ** 2 + gj ** 2) / (2 * sigma_mm ** 2))
    slices = rng.random(img.shape[2]) < rng.uniform(0.1, 0.6)
    factor = 1 - depth * blob[:, :, None] * slices[None, None, :]
    return img * factor


def rician_noise(img: np.ndarray, rng: np.random.Generator, *, low: float = 0.005,
                 high: float = 0.08) -> np.ndarray:
    """Magnitude (Rician) noise with sigma a random fraction of the 99th percentile."""
    sigma = rng.uniform(low, high) * float(np.percentile(img, 99))
    real = img + rng.normal(0, sigma, img.shape)
    imag = rng.normal(0, sigma, img.shape)
    return np.sqrt(real ** 2 + imag ** 2)


def slice_intensity_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scale each slice by a factor near 1 (interleaved/spin-history intensity differences)."""
    return img * rng.uniform(0.9, 1.1, img.shape[2])[None, None, :]


def inplane_blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Slight in-plane blur (T2* decay along phase encoding, motion-corrected averaging)."""
    return ndimage.gaussian_filter(img, (rng.uniform(0, 0.6), rng.uniform(0, 1.0), 0))


def apply_random_artefacts(img: np.ndarray, rng: np.random.Generator, centre_vox: np.ndarray,
                           zooms_mm: np.ndarray) -> np.ndarray:
    """Apply a random subset of EPI effects, then a random global gain.

    Parameters
    ----------
    img : (nI, nJ, nK) ndarray
        Noiseless acquired volume, acquisition order.
    rng : numpy.random.Generator
        Source of randomness.
    centre_vox : (3,) ndarray
        Cord position in voxels (I, J, K), for the dropout.
    zooms_mm : (3,) ndarray
        Voxel sizes in mm.

    Returns
    -------
    img : (nI, nJ, nK) ndarray, float32
        Positive intensities with an arbitrary scale (like scanner units).
    """
    if rng.random() < 0.5:
        img = inplane_blur(img, rng)
    if rng.random() < 0.8:
        img = bias_field(img, rng, strength=rng.uniform(0.2, 1.0))
    if rng.random() < 0.5:
        img = gamma(img, rng)
    if rng.random() < 0.5:
        img = nyquist_ghost(img, rng)
    if rng.random() < 0.3:
        img = dropout(img, rng, centre_vox, zooms_mm)
    if rng.random() < 0.4:
        img = slice_intensity_jitter(img, rng)
    img = rician_noise(img, rng)
    gain = float(np.exp(rng.uniform(np.log(50), np.log(3000))))
    return (img * gain / (np.percentile(img, 99) + 1e-6)).astype(np.float32)
