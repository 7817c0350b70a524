"""How certain the network was of a mask, from the foreground probability it already computes.

The score is the **Dice the network expects**, slice by slice. If every voxel ``v`` were cord
with the network's foreground probability ``p_v`` (independently), the expected overlap of the
mask ``M`` with that cord would be ``Σ_M p`` voxels and the expected cord size ``Σ p`` voxels,
so the Dice the network expects its own mask to reach is (a first-order estimate)::

    E[Dice] = 2 Σ_{v ∈ M} p_v / (|M| + Σ_v p_v)

It is 1 for a crisp probability (``p`` = 0 or 1 everywhere, mask = argmax), falls as probability
near 0.5 spreads along the mask's border or as probability mass lies outside the mask, and
needs no threshold, band width or voxel size: both terms are counts of voxels, the ratio is
unit-free. Written with the expected errors ``FP = Σ_M (1 - p)`` and ``FN = Σ_{not M} p``
(in voxels): ``E[Dice] = 2 (|M| - FP) / (2 |M| - FP + FN)``.

``confidence`` is the mean of ``E[Dice]`` over the slices that hold cord (a mask voxel, or at
least :data:`MIN_SLICE_MASS_VOXELS` of probability), so every slice weighs the same and one
failed slice costs ``1 / n_slices`` of the score whatever its size; ``confidence_volume`` is
``E[Dice]`` over the whole volume and ``confidence_worst_slice`` the lowest slice. Why this
mix (``benchmarks/bench_confidence.py``: the held-out real run and 12 held-out phantoms, each
clean and degraded by noise, blur, cropping, bias, ghosting, slice dropout; 184 segmentations
with the demo model), Spearman rank correlation with the true Dice / with the true worst-slice
Dice: slice mean 0.82 / 0.83, volume 0.85 / 0.73, worst slice 0.69 / 0.85, and issue 12's
"share of border voxels with 0.2 < p < 0.8" 0.53 / 0.37. The slice mean is the only one good
at both: the volume value hardly moves when one small slice fails, the minimum is noisy.

An **empty mask scores 0**: finding no cord is never a confident result for a spinal-cord run,
so such runs come first in a review sorted by confidence. ``probability_mass_voxels`` tells
"the network saw something and drew nothing" (mass > 0) from "it saw nothing" (mass ≈ 0).

The score ranks runs; it is not a calibrated Dice. nnUNet's probabilities are over-confident:
with the demo model, clean images score 0.956-0.979 for a true Dice of 0.84-0.94. Mask voxels
the probability does not support (e.g. after ``--fill-holes``) and probability the mask leaves
out (``--largest``, ``--remove-small``) both lower the score. A confidently wrong mask
(probability near 1 on the wrong structure) scores high: in the benchmark, strong ghosting or
bias gave Dice 0.6 at 0.96 on one phantom. The QC flags, not this score, cover that.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: A slice without mask voxels counts for the score only if the network put at least this much
#: foreground probability in it (in voxels, ``Σ p``): stray probability well below one voxel is
#: rounding noise, one voxel's worth is cord the network saw and did not draw.
MIN_SLICE_MASS_VOXELS = 1.0

#: One-line meaning of the score, for sidecars and TSV data dictionaries.
DESCRIPTION = ("Mean over slices holding cord of the Dice the network expects of its own mask "
               "(2 * sum of foreground probability inside the mask / (mask voxels + sum of "
               "foreground probability)); 0 for an empty mask; 1 = fully certain. Ranks runs "
               "for review; not a calibrated Dice.")

_DECIMALS = 4


def _check(probability: np.ndarray, mask: np.ndarray, slice_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(probability as float64, mask as bool)``; raises ValueError naming the clash."""
    probability, mask = np.asarray(probability), np.asarray(mask)
    if probability.ndim != 3 or probability.shape != mask.shape:
        raise ValueError(f"probability shape {probability.shape} and mask shape {mask.shape} must be "
                         "the same 3D (X, Y, Z) grid; pass Segmentation.foreground_probability with "
                         "its own mask")
    if slice_axis not in (0, 1, 2):
        raise ValueError(f"slice_axis {slice_axis!r} is not 0, 1 or 2; use metrics.slice_axis(affine)")
    probability = probability.astype(np.float64, copy=False)
    if not np.isfinite(probability).all():
        raise ValueError(f"foreground probability has {int((~np.isfinite(probability)).sum())} NaN/Inf "
                         "voxels; expected values in [0, 1]")
    low, high = (probability.min(), probability.max()) if probability.size else (0.0, 0.0)
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(f"foreground probability spans [{low:g}, {high:g}]; expected [0, 1] "
                         "(pass 1 - P(background), not logits)")
    return np.clip(probability, 0.0, 1.0), mask > 0


def expected_dice(inside_mass: np.ndarray, mask_voxels: np.ndarray, total_mass: np.ndarray) -> np.ndarray:
    """``2 Σ_M p / (|M| + Σ p)``, elementwise, 0 where the mask is empty.

    Parameters
    ----------
    inside_mass : ndarray
        ``Σ_M p``: foreground probability summed over mask voxels, in voxels.
    mask_voxels : ndarray
        ``|M|``: mask voxel count.
    total_mass : ndarray
        ``Σ p``: foreground probability summed over the region, in voxels.

    Returns
    -------
    ndarray
        In [0, 1]; 0 where ``mask_voxels`` is 0 (see the module notes on empty masks).

    Examples
    --------
    A mask of 4 voxels at p = 1, and one voxel of p = 0.5 outside it: ``2·4 / (4 + 4.5)``.

    >>> float(expected_dice(np.array(4.0), np.array(4), np.array(4.5)))
    0.9411764705882353
    >>> float(expected_dice(np.array(0.0), np.array(0), np.array(3.0)))
    0.0
    """
    inside_mass, mask_voxels, total_mass = np.broadcast_arrays(
        np.asarray(inside_mass, float), np.asarray(mask_voxels, float), np.asarray(total_mass, float))
    out = np.zeros(inside_mass.shape)
    has_mask = mask_voxels > 0
    out[has_mask] = 2.0 * inside_mass[has_mask] / (mask_voxels[has_mask] + total_mass[has_mask])
    return np.clip(out, 0.0, 1.0)


def confidence_score(probability: np.ndarray, mask: np.ndarray, *, slice_axis: int = 2) -> dict[str, Any]:
    """Per-run confidence of a mask from the network's foreground probability.

    Parameters
    ----------
    probability : (X, Y, Z) ndarray
        Foreground probability ``1 - P(background)`` in [0, 1] on the mask's grid
        (:attr:`episeg_bids.segment.Segmentation.foreground_probability`), on-disk voxel order.
    mask : (X, Y, Z) ndarray
        The mask written for the run (after any post-processing), nonzero = cord.
    slice_axis : int, keyword-only
        Voxel axis of the slices, the one closest to superior–inferior
        (:func:`episeg_bids.metrics.slice_axis` of the affine).

    Returns
    -------
    dict
        Plain JSON-ready values, scores rounded to 4 decimals, masses to 2:

        ``confidence`` : float in [0, 1]
            Mean of the per-slice expected Dice over the assessed slices; 0 when none is
            assessed (empty mask and no slice with ``MIN_SLICE_MASS_VOXELS`` of probability).
            Higher = more certain; sort ascending to review the least certain runs first.
        ``confidence_volume`` : float in [0, 1]
            Expected Dice over the whole volume (0 for an empty mask).
        ``confidence_worst_slice`` : float in [0, 1]
            Lowest per-slice expected Dice (0 when no slice is assessed).
        ``worst_slice`` : int or None
            Index of that slice along ``slice_axis`` (the first one on ties), None when no
            slice is assessed.
        ``slices_assessed`` : int
            Slices with a mask voxel or at least ``MIN_SLICE_MASS_VOXELS`` of probability.
        ``mask_voxels`` : int
            ``|M|``.
        ``probability_mass_voxels`` : float
            ``Σ p`` over the volume, in voxels (the cord size the network expects).
        ``expected_false_positive_voxels`` : float
            ``Σ_M (1 - p)``: mask voxels the network doubts, in voxels.
        ``expected_false_negative_voxels`` : float
            ``Σ_{not M} p``: probability outside the mask, in voxels.
        ``empty`` : bool
            The mask has no voxel.
        ``per_slice`` : list of dict
            One row per slice along ``slice_axis``: ``slice`` (voxel index), ``confidence``
            (expected Dice of that slice; None when not assessed), ``mask_voxels``,
            ``probability_mass_voxels``.

    Raises
    ------
    ValueError
        Shapes differ or are not 3D; ``slice_axis`` not 0–2; probability not finite or
        outside [0, 1].

    Examples
    --------
    Two slices of a 2×2 cord: slice 0 crisp, slice 1 drawn but with p = 0.5 in the mask.

    >>> p = np.zeros((4, 4, 2)); m = np.zeros((4, 4, 2), np.uint8)
    >>> m[1:3, 1:3, :] = 1
    >>> p[1:3, 1:3, 0] = 1.0; p[1:3, 1:3, 1] = 0.5
    >>> s = confidence_score(p, m)
    >>> s["confidence"], s["confidence_worst_slice"], s["worst_slice"]  # (1 + 2·2/(4+2)) / 2
    (0.8333, 0.6667, 1)
    >>> s["expected_false_positive_voxels"], s["confidence_volume"]      # 2·6 / (8 + 6)
    (2.0, 0.8571)
    """
    probability, mask = _check(probability, mask, slice_axis)
    p = np.moveaxis(probability, slice_axis, 0)
    m = np.moveaxis(mask, slice_axis, 0)
    inside = np.where(m, p, 0.0).sum(axis=(1, 2))
    voxels = m.sum(axis=(1, 2))
    mass = p.sum(axis=(1, 2))
    per_slice_score = expected_dice(inside, voxels, mass)
    assessed = (voxels > 0) | (mass >= MIN_SLICE_MASS_VOXELS)
    n_assessed = int(assessed.sum())
    worst = int(np.flatnonzero(assessed)[np.argmin(per_slice_score[assessed])]) if n_assessed else None
    total_voxels, total_inside, total_mass = int(voxels.sum()), float(inside.sum()), float(mass.sum())
    return {
        "confidence": round(float(per_slice_score[assessed].mean()) if n_assessed else 0.0, _DECIMALS),
        "confidence_volume": round(float(expected_dice(total_inside, total_voxels, total_mass)), _DECIMALS),
        "confidence_worst_slice": round(float(per_slice_score[worst]) if n_assessed else 0.0, _DECIMALS),
        "worst_slice": worst,
        "slices_assessed": n_assessed,
        "mask_voxels": total_voxels,
        "probability_mass_voxels": round(total_mass, 2),
        "expected_false_positive_voxels": round(total_voxels - total_inside, 2),
        "expected_false_negative_voxels": round(total_mass - total_inside, 2),
        "empty": total_voxels == 0,
        "per_slice": [
            {"slice": k,
             "confidence": round(float(per_slice_score[k]), _DECIMALS) if assessed[k] else None,
             "mask_voxels": int(voxels[k]),
             "probability_mass_voxels": round(float(mass[k]), 2)}
            for k in range(p.shape[0])
        ],
    }
