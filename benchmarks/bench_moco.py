#!/usr/bin/env python3
"""Speed of slice-wise motion correction against segmenting the mean, on the same run and machine.

Builds a 128x128x24xT run (default T = 200) from the real Leipzig moco-mean EPI (tests/data):
every slice of every volume moved by a known in-plane shift (slow drift, two sudden jumps,
slice-to-slice variation, 0-3 mm; Fourier interpolation), an intensity fluctuation and Gaussian
noise. Then, in one process:

- ``episeg_bids.moco.motion_correct`` on the run (ROI: 35 mm cylinder around the manual mask),
  its wall time and its peak Python-allocated memory (tracemalloc; the run itself not counted);
- ``episeg_bids.segment.segment_volume`` on the moco mean with an EPISeg-size network (built by
  ``benchmarks/episeg_size_model.py``: 6 stages, 32-320 features, patch 24x128x128, random
  weights), model loaded once beforehand, ``threads`` torch threads;

and prints both times, their ratio (goal: <= 1) and the shift error against the truth.

    .venv/bin/python benchmarks/bench_moco.py [--volumes 200] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))                      # this checkout's episeg_bids, not an installed one
sys.path.insert(0, str(REPO / "benchmarks"))

from episeg_bids import moco  # noqa: E402
from episeg_size_model import build_episeg_size_model  # noqa: E402

FUNC = REPO / "tests/data/ds-example/sub-leipzigR01/func"
IMAGE = FUNC / "sub-leipzigR01_task-rest_rec-MoCoMean_bold.nii.gz"
MASK = (REPO / "tests/data/ds-example/derivatives/label/sub-leipzigR01/func"
        / "sub-leipzigR01_task-rest_desc-spinalcordmask.nii.gz")


def synthetic_shifts_mm(n_t: int, n_s: int, rng: np.random.Generator) -> np.ndarray:
    """(T, S, 2) shifts in mm: drift + two jumps, scaled per slice, plus jitter; |shift| <= 3 mm."""
    t = np.linspace(0.0, 1.0, n_t)[:, None]
    course = t * np.array([1.0, 0.6]) + 0.2 * np.sin(2 * np.pi * 1.5 * t)
    for when in rng.choice(np.arange(n_t // 5, n_t), size=2, replace=False):
        course[when:] += rng.uniform(-1.2, 1.2, size=2)
    shifts = course[:, None, :] * np.linspace(0.6, 1.3, n_s)[None, :, None]
    shifts += 0.05 * rng.normal(size=shifts.shape)
    norm = np.linalg.norm(shifts, axis=2, keepdims=True)
    return shifts * np.minimum(1.0, 3.0 / np.maximum(norm, 1e-9))


def synthetic_run(mean: np.ndarray, shifts_vox: np.ndarray, rng: np.random.Generator, noise_sd: float):
    """(X, Y, Z, T) float32: ``mean`` with slice ``s`` of volume ``t`` moved by ``+shifts_vox[t, s]``
    (``run_t(x + shift) = mean(x)``, Fourier interpolation on a mirror-padded slice), noise added."""
    pad = 16
    padded = np.pad(mean.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    spectrum = np.fft.fft2(padded, axes=(0, 1))
    freq_a = np.fft.fftfreq(padded.shape[0])[:, None]
    freq_b = np.fft.fftfreq(padded.shape[1])[None, :]
    run = np.empty(mean.shape + (len(shifts_vox),), np.float32)
    for t, shifts in enumerate(shifts_vox):
        gain = 1.0 + 0.01 * np.sin(2 * np.pi * t / 40.0)
        for s, (da, db) in enumerate(shifts):
            ramp = np.exp(-2j * np.pi * (freq_a * da + freq_b * db))
            moved = np.fft.ifft2(spectrum[:, :, s] * ramp).real[pad:-pad, pad:-pad]
            run[:, :, s, t] = gain * moved + rng.normal(scale=noise_sd, size=moved.shape)
    return run


def timed(function, repeats: int) -> tuple[object, float]:
    """Result of the last call and the median wall time in seconds."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return result, float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from episeg_bids import model, segment

    img, mask_img = nib.load(IMAGE), nib.load(MASK)
    mean = img.get_fdata(dtype=np.float32)
    mask = np.asarray(mask_img.dataobj) > 0
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    rng = np.random.default_rng(0)
    truth_mm = synthetic_shifts_mm(args.volumes, mean.shape[2], rng)
    noise_sd = float(mean[mask].mean()) / 30.0
    started = time.perf_counter()
    run = synthetic_run(mean, truth_mm / np.array(zooms[:2]), rng, noise_sd)
    print(f"run: {run.shape} float32 ({run.nbytes / 2**20:.0f} MB), built in "
          f"{time.perf_counter() - started:.1f} s; tSNR in the cord (motion included) "
          f"{moco.temporal_snr(run, mask):.1f}")
    roi = moco.cord_cylinder(mask, zooms, 2)

    moco.motion_correct(run[..., :12], zooms, 2, roi=roi)            # warm-up (imports, caches)
    result, moco_s = timed(lambda: moco.motion_correct(run, zooms, 2, roi=roi), args.repeats)
    tracemalloc.start()
    moco.motion_correct(run, zooms, 2, roi=roi)
    moco_peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    group = result.parameters["GroupSize"]
    expected = truth_mm - truth_mm[:group].mean(axis=0)
    rms = float(np.sqrt(np.mean(np.sum((result.shifts_mm - expected) ** 2, axis=2))))

    with tempfile.TemporaryDirectory() as tmp:
        build_episeg_size_model(Path(tmp))
        started = time.perf_counter()
        predictor = model.load_predictor(model.locate_model(tmp), device="cpu", threads=args.threads)
        load_s = time.perf_counter() - started
        segment_once = lambda: segment.segment_volume(predictor, result.mean, img.affine, zooms)  # noqa: E731
        segment_once()                                               # warm-up
        _, segment_s = timed(segment_once, args.repeats)

    print(f"moco ({args.volumes} volumes, 24 slices, 35 mm ROI): {moco_s:6.2f} s (median of {args.repeats}), "
          f"peak {moco_peak_mb:.0f} MB above the run; shift RMS error {rms:.3f} mm")
    print(f"segmentation of the mean, EPISeg-size network, {args.threads} threads: {segment_s:6.2f} s "
          f"(median of {args.repeats}; model load {load_s:.1f} s, not counted)")
    print(f"ratio moco / segmentation: {moco_s / segment_s:5.2f}  (goal <= 1)")


if __name__ == "__main__":
    main()
