"""Analytic EPI-like phantoms of the cervical neck, defined as fields in world RAS+ mm.

The anatomy follows a curved centreline ``c(z)`` along S. In the local cross-section frame
``(u, v) = (x - cx(z), y - cy(z))`` (u: left-right, v: anterior-posterior, mm) it holds, from inside
out: the cord (an irregular ellipse about 7-9 mm AP x 10-13 mm LR), a bright CSF ring, a dark
bony/ligamentous canal wall, the vertebral body (with brighter discs) anterior to the canal, the
trachea, bright vessels, textured muscle and fat inside the neck ellipse, and air outside. Contrast
is T2*-weighted EPI-like: CSF brightest, cord 35-75 % of CSF, bone darkest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: Extent of the texture grids, mm, centred on the origin: (LR, AP, SI).
_TEXTURE_EXTENT_MM = np.array([200.0, 200.0, 480.0])
_TEXTURE_STEP_MM = 4.0


@dataclass(frozen=True)
class PhantomParams:
    """Random anatomy and contrast of one phantom (all lengths in mm, intensities relative to CSF=1)."""

    cord_half_lr: float
    cord_half_ap: float
    cord_angle: float
    cord_harmonics: np.ndarray  # (4, 2): cos/sin amplitudes of boundary harmonics 2..5
    csf_pad_lr: float
    csf_pad_ant: float
    csf_pad_post: float
    wall_mm: float
    body_half_lr: float
    body_half_ap: float
    body_shift_ap: float
    vertebra_shift_ap: float
    vertebra_half: tuple[float, float]
    disc_period: float
    disc_phase: float
    trachea_ap: float
    trachea_r: float
    vessels: np.ndarray  # (n, 3): u, v, radius
    centreline: np.ndarray  # (2, 3): amplitude, period, phase for x and y
    enlargement: tuple[float, float, float]  # amplitude, period, phase of cord size along z
    contrast: dict
    texture: np.ndarray  # (T, U, V) smooth random field, axes (LR, AP, SI) on a 4 mm grid
    fibres: np.ndarray  # same grid, elongated along SI (muscle fibres)


def random_phantom(rng: np.random.Generator) -> PhantomParams:
    """Draw a random cervical phantom.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    params : PhantomParams
        Anatomy, contrast and texture fields.
    """
    shape = tuple(int(v) for v in _TEXTURE_EXTENT_MM / _TEXTURE_STEP_MM)
    texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    texture /= texture.std() + 1e-8
    fibres = ndimage.gaussian_filter(rng.standard_normal(shape), (0.7, 0.7, 4.0))
    fibres /= fibres.std() + 1e-8
    n_vessels = int(rng.integers(2, 6))
    vessels = np.column_stack([
        rng.choice([-1, 1], n_vessels) * rng.uniform(9, 30, n_vessels),
        rng.uniform(5, 35, n_vessels),
        rng.uniform(1.5, 4.0, n_vessels),
    ])
    csf = 1.0
    contrast = {
        "cord": rng.uniform(0.35, 0.75) * csf,
        "csf": csf,
        "wall": rng.uniform(0.05, 0.3),
        "muscle": rng.uniform(0.12, 0.45),
        "fat": rng.uniform(0.08, 0.6),  # usually fat-saturated in EPI
        "vertebra": rng.uniform(0.1, 0.45),
        "disc": rng.uniform(0.3, 0.8),
        "vessel": rng.uniform(0.6, 1.4),
        "air": rng.uniform(0.0, 0.03),
        "texture": rng.uniform(0.08, 0.3),
        "fat_fraction": rng.uniform(0.05, 0.35),
        "gm": rng.uniform(-0.12, 0.12),
    }
    return PhantomParams(
        cord_half_lr=rng.uniform(5.0, 6.5), cord_half_ap=rng.uniform(3.5, 4.5),
        cord_angle=rng.uniform(-0.2, 0.2), cord_harmonics=rng.normal(0, 0.03, (4, 2)),
        csf_pad_lr=rng.uniform(1.5, 4.5), csf_pad_ant=rng.uniform(0.8, 3.0), csf_pad_post=rng.uniform(1.5, 4.5),
        wall_mm=rng.uniform(2.0, 6.0),
        body_half_lr=rng.uniform(42, 70), body_half_ap=rng.uniform(38, 58), body_shift_ap=rng.uniform(10, 30),
        vertebra_shift_ap=rng.uniform(15, 22), vertebra_half=(rng.uniform(8, 12), rng.uniform(6.5, 9.5)),
        disc_period=rng.uniform(14, 19), disc_phase=rng.uniform(0, 1),
        trachea_ap=rng.uniform(36, 50), trachea_r=rng.uniform(6, 10),
        vessels=vessels,
        centreline=np.array([[rng.uniform(0, 4), rng.uniform(150, 400), rng.uniform(0, 2 * np.pi)],
                             [rng.uniform(0, 10), rng.uniform(200, 500), rng.uniform(0, 2 * np.pi)]]),
        enlargement=(rng.uniform(0, 0.1), rng.uniform(80, 200), rng.uniform(0, 2 * np.pi)),
        contrast=contrast, texture=texture, fibres=fibres,
    )


def centreline_mm(p: PhantomParams, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cord centre (x, y) in world mm at heights ``z`` (mm)."""
    (ax, lx, phx), (ay, ly, phy) = p.centreline
    return ax * np.sin(2 * np.pi * z / lx + phx), ay * np.sin(2 * np.pi * z / ly + phy)


def _sample_grid(grid: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Linear interpolation of a texture grid at world points (N, 3) mm; (N,) values."""
    coords = (pts + _TEXTURE_EXTENT_MM / 2) / _TEXTURE_STEP_MM
    return ndimage.map_coordinates(grid, coords.T, order=1, mode="mirror")


def _ellipse_radius(u: np.ndarray, v: np.ndarray, half_lr: float, half_ap: float) -> np.ndarray:
    """Normalised elliptical radius (1 on the boundary)."""
    return np.sqrt((u / half_lr) ** 2 + (v / half_ap) ** 2)


def cord_inside(p: PhantomParams, u: np.ndarray, v: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Boolean cord indicator at local cross-section coordinates (mm)."""
    amp, per, ph = p.enlargement
    scale = 1.0 + amp * np.sin(2 * np.pi * z / per + ph)
    c, s = np.cos(p.cord_angle), np.sin(p.cord_angle)
    ur, vr = c * u + s * v, -s * u + c * v
    theta = np.arctan2(vr, ur)
    wobble = 1.0 + sum(p.cord_harmonics[k, 0] * np.cos((k + 2) * theta)
                       + p.cord_harmonics[k, 1] * np.sin((k + 2) * theta) for k in range(4))
    return _ellipse_radius(ur, vr, p.cord_half_lr * scale, p.cord_half_ap * scale) <= wobble


def _canal_radius(p: PhantomParams, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Normalised radius of the CSF-filled canal, off-centred posteriorly (v < 0 is posterior)."""
    centre_v = (p.csf_pad_ant - p.csf_pad_post) / 2
    half_ap = p.cord_half_ap + (p.csf_pad_ant + p.csf_pad_post) / 2
    return _ellipse_radius(u, v - centre_v, p.cord_half_lr + p.csf_pad_lr, half_ap)


def phantom_field(p: PhantomParams, pts: np.ndarray) -> np.ndarray:
    """Evaluate intensity and cord indicator at world points.

    Parameters
    ----------
    p : PhantomParams
        The phantom.
    pts : (N, 3) ndarray
        World RAS+ mm.

    Returns
    -------
    values : (N, 2) ndarray
        Column 0: noiseless EPI-like intensity (CSF ~ 1); column 1: 1 inside the cord else 0.
    """
    x, y, z = pts.T
    cx, cy = centreline_mm(p, z)
    u, v = x - cx, y - cy
    k = p.contrast
    tex = _sample_grid(p.texture, pts)
    fib = _sample_grid(p.fibres, pts)

    img = np.full(u.shape, k["air"])
    body = _ellipse_radius(u, v - p.body_shift_ap, p.body_half_lr, p.body_half_ap) <= 1
    tissue = k["muscle"] * (1 + k["texture"] * fib)
    fat = (tex > np.quantile(p.texture, 1 - k["fat_fraction"])) | (
        _ellipse_radius(u, v - p.body_shift_ap, p.body_half_lr, p.body_half_ap) > 0.9)
    tissue = np.where(fat, k["fat"] * (1 + 0.5 * k["texture"] * tex), tissue)
    img = np.where(body, tissue, img)

    disc = np.abs(((z / p.disc_period + p.disc_phase) % 1.0) - 0.5) < 0.15
    vert = _ellipse_radius(u, v - p.vertebra_shift_ap, *p.vertebra_half) <= 1
    img = np.where(vert, np.where(disc, k["disc"], k["vertebra"]) * (1 + 0.3 * k["texture"] * tex), img)
    trachea = _ellipse_radius(u, v - p.trachea_ap, p.trachea_r, p.trachea_r * 0.8) <= 1
    img = np.where(trachea, k["air"], img)
    for vu, vv, vr in p.vessels:
        img = np.where((u - vu) ** 2 + (v - vv) ** 2 <= vr ** 2, k["vessel"], img)

    canal_r = _canal_radius(p, u, v)
    wall_scale = 1 + p.wall_mm / (p.cord_half_lr + p.csf_pad_lr)
    img = np.where(canal_r <= wall_scale, k["wall"] * (1 + 0.5 * k["texture"] * tex), img)
    img = np.where(canal_r <= 1, k["csf"] * (1 + 0.05 * tex), img)
    cord = cord_inside(p, u, v, z)
    gm = 1 + k["gm"] * np.exp(-(u ** 2 + v ** 2) / 8.0)
    img = np.where(cord, k["cord"] * gm * (1 + 0.05 * tex), img)
    return np.column_stack([img, cord.astype(float)])


def cord_point_mm(p: PhantomParams, z_mm: float) -> np.ndarray:
    """(3,) world RAS+ mm of the cord centre at height ``z_mm``."""
    cx, cy = centreline_mm(p, np.array([z_mm]))
    return np.array([cx[0], cy[0], z_mm])
