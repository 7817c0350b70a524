"""Measure the demo model: Dice on held-out phantoms and on the held-out real run, CPU time, size.

The held-out real run (``tests/data/heldout_sct_example_data_r20161128``, SCT example data, a
different subject and site) is never used for training or tuning; only here.
"""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np

from .cases import phantom_case
from .dataset import EVAL_PHANTOM_SEED_OFFSET
from .inference import segment


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two binary arrays of the same shape (1.0 if both are empty)."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    if a.shape != b.shape:
        raise ValueError(f"shapes {a.shape} and {b.shape} differ")
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2 * np.logical_and(a, b).sum() / denom)


def temporal_mean(run_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Mean over time of a 4D run, computed in float64.

    Returns
    -------
    mean : (X, Y, Z) ndarray, float32
        On-disk voxel order.
    affine : (4, 4) ndarray
        Voxel -> scanner RAS+ mm.
    """
    img = nib.load(str(run_path))
    data = np.asarray(img.dataobj, dtype=np.float64)
    mean = data.mean(axis=3) if data.ndim == 4 else data
    return mean.astype(np.float32), img.affine


def timed_segment(predictor, data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, float]:
    """:func:`~demo_model.inference.segment` and its wall time in seconds."""
    t0 = time.perf_counter()
    mask = segment(predictor, data, affine)
    return mask, time.perf_counter() - t0


def evaluate_phantoms(predictor, *, n: int, seed: int) -> dict:
    """Dice on ``n`` phantoms drawn with seeds disjoint from training (``seed + 900000 + i``).

    Each phantom is stored in a random axis order, so the RAS+ round trip is exercised too.
    """
    scores, times, shapes = [], [], []
    for i in range(n):
        case = phantom_case(seed + EVAL_PHANTOM_SEED_OFFSET + i)
        pred, seconds = timed_segment(predictor, case.image, case.affine)
        scores.append(dice(pred, case.mask))
        times.append(seconds)
        shapes.append(list(case.image.shape))
    return {"n": n, "seeds": [seed + EVAL_PHANTOM_SEED_OFFSET, seed + EVAL_PHANTOM_SEED_OFFSET + n - 1],
            "dice": [round(s, 4) for s in scores], "dice_mean": round(float(np.mean(scores)), 4),
            "dice_median": round(float(np.median(scores)), 4), "dice_min": round(float(np.min(scores)), 4),
            "seconds": [round(t, 3) for t in times], "shapes": shapes}


def evaluate_real_run(predictor, run_path: Path, mask_path: Path) -> dict:
    """Dice of the prediction on the run's temporal mean against its manual mask."""
    mean, affine = temporal_mean(run_path)
    truth = np.asarray(nib.load(str(mask_path)).dataobj) > 0
    pred, seconds = timed_segment(predictor, mean, affine)
    per_slice = [round(dice(pred[:, :, k], truth[:, :, k]), 4) for k in range(truth.shape[2])]
    return {"image": str(run_path), "mask": str(mask_path), "shape": list(mean.shape),
            "dice": round(dice(pred, truth), 4), "dice_per_slice": per_slice,
            "predicted_voxels": int((pred > 0).sum()), "true_voxels": int(truth.sum()),
            "seconds": round(seconds, 3)}


def inference_time(predictor, data: np.ndarray, affine: np.ndarray, *, repeats: int = 5) -> dict:
    """Median CPU wall time (s) of one ``segment`` call with the model already loaded."""
    segment(predictor, data, affine)  # warm-up
    times = [timed_segment(predictor, data, affine)[1] for _ in range(repeats)]
    return {"shape": list(data.shape), "repeats": repeats, "median_seconds": round(float(np.median(times)), 3),
            "max_seconds": round(float(np.max(times)), 3)}


def artefact_sizes(model_dir: Path) -> dict:
    """Sizes in bytes of the shipped files under ``model_dir`` and their total."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    sizes = {p.relative_to(model_dir).as_posix(): p.stat().st_size for p in files}
    return {"files": sizes, "total_bytes": int(sum(sizes.values()))}
