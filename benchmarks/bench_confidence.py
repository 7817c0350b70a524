#!/usr/bin/env python3
"""Does a lower confidence score (episeg_bids.confidence) go with a lower Dice?

Images, all never used to train the demo model: the held-out real run (SCT example data, the
temporal mean of its 30 volumes, manual mask drawn on its moco mean) and the demo model's
held-out synthetic phantoms (``tools/demo_model``, seeds ``seed + 900000 + i`` exactly as
``tools/evaluate_demo_model.py`` draws them). Each is segmented as it is and as deliberately
degraded copies (degradations below, each at several levels; the real run also as the mean of
its first 1 and 3 volumes). For every segmentation: Dice and worst-slice Dice against the
reference mask, and the score under the chosen definition and the alternatives considered:

- ``confidence``          the chosen one: mean over slices of the Dice the network expects;
- ``volume``              the same expected Dice over the whole volume (``confidence_volume``);
- ``worst_slice``         the lowest slice's expected Dice (``confidence_worst_slice``);
- ``border_band``         issue 12's suggestion: 1 - share of the voxels within 1 voxel of the
                          mask border (in-plane) whose probability is in (0.2, 0.8);
- ``entropy_band``        1 - mean binary entropy (bits) of the probability within 2 voxels
                          (in-plane) of the mask.

Prints the Spearman rank correlation of each definition with Dice (all images; per degradation
type, each with the clean images), with the worst-slice Dice, a bootstrap 95 % interval over
images, and a table per degradation. The predictor is the real nnUNetv2 demo model, loaded once.

    .venv/bin/python benchmarks/bench_confidence.py [--n-phantoms 12] [--seed 20250107] [--tsv FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import io_orientation
from scipy import ndimage, stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))                      # this checkout's episeg_bids, not an installed one

from demo_model.cases import phantom_case  # noqa: E402
from demo_model.dataset import EVAL_PHANTOM_SEED_OFFSET  # noqa: E402
from evaluate_demo_model import DEFAULT_SEED, HELDOUT  # noqa: E402

from episeg_bids import accuracy, confidence, epi, metrics  # noqa: E402

DEFINITIONS = ("confidence", "volume", "worst_slice", "border_band", "entropy_band")


@dataclass(frozen=True)
class Image:
    """A reference image: ``data`` and ``truth`` (X, Y, Z) on-disk order, ``affine`` voxel → RAS+ mm."""

    name: str
    data: np.ndarray
    truth: np.ndarray
    affine: np.ndarray
    volumes: np.ndarray | None = None  # (X, Y, Z, T) for a 4D run


# --- degradations: (image, rng) -> (data, truth, affine) -------------------------------------

def _inplane(affine: np.ndarray) -> list[int]:
    axis = metrics.slice_axis(affine)
    return [a for a in range(3) if a != axis]


def rician_noise(img: Image, level: float, rng: np.random.Generator):
    """Magnitude noise, sigma = ``level`` × the image's 99th percentile."""
    sigma = level * float(np.percentile(img.data, 99))
    noisy = np.hypot(img.data + rng.normal(0, sigma, img.data.shape), rng.normal(0, sigma, img.data.shape))
    return noisy, img.truth, img.affine


def inplane_blur(img: Image, fwhm_mm: float, rng: np.random.Generator):
    """Gaussian blur in the slice plane, FWHM in mm."""
    zooms = nib.affines.voxel_sizes(img.affine)
    sigma = [fwhm_mm / 2.3548 / zooms[a] if a in _inplane(img.affine) else 0.0 for a in range(3)]
    return ndimage.gaussian_filter(img.data, sigma), img.truth, img.affine


def crop_fov(img: Image, fov_mm: float, rng: np.random.Generator):
    """Keep an in-plane square field of view of ``fov_mm`` around the reference cord's centre."""
    zooms = nib.affines.voxel_sizes(img.affine)
    centre = np.argwhere(img.truth).mean(axis=0)
    lo, window = np.zeros(3, int), [slice(None)] * 3
    for a in _inplane(img.affine):
        half = int(round(fov_mm / 2 / zooms[a]))
        lo[a] = int(np.clip(round(centre[a]) - half, 0, max(0, img.data.shape[a] - 2 * half)))
        window[a] = slice(lo[a], lo[a] + 2 * half)
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ lo + img.affine[:3, 3]
    return img.data[tuple(window)], img.truth[tuple(window)], affine


def bias_ramp(img: Image, per_10mm: float, rng: np.random.Generator):
    """Multiply by ``exp(per_10mm × d / 10 mm)``, ``d`` the distance from the cord along one in-plane axis."""
    axis = _inplane(img.affine)[0]
    d_mm = (np.arange(img.data.shape[axis]) - np.argwhere(img.truth).mean(axis=0)[axis]) \
        * nib.affines.voxel_sizes(img.affine)[axis]
    shape = [1, 1, 1]
    shape[axis] = -1
    return img.data * np.exp(per_10mm * d_mm / 10.0).reshape(shape), img.truth, img.affine


def nyquist_ghost(img: Image, level: float, rng: np.random.Generator):
    """Add the image shifted by half the field of view along the in-plane axis closest to A-P."""
    axis = int(np.flatnonzero(io_orientation(img.affine)[:, 0] == 1)[0])
    return img.data + level * np.roll(img.data, img.data.shape[axis] // 2, axis=axis), img.truth, img.affine


def slice_dropout(img: Image, factor: float, rng: np.random.Generator):
    """Multiply the middle slice of the reference cord by ``factor`` (signal loss in one slice)."""
    axis = metrics.slice_axis(img.affine)
    covered = np.flatnonzero(np.moveaxis(img.truth, axis, 0).any(axis=(1, 2)))
    data = img.data.copy()
    np.moveaxis(data, axis, 0)[covered[len(covered) // 2]] *= factor
    return data, img.truth, img.affine


def fewer_volumes(img: Image, n: float, rng: np.random.Generator):
    """Temporal mean of the first ``n`` volumes of a 4D run (less averaging: more noise)."""
    return img.volumes[..., : int(n)].mean(axis=3), img.truth, img.affine


Degradation = tuple[str, float, Callable]
DEGRADATIONS: list[Degradation] = [
    ("clean", 0, None),
    *[("noise", level, rician_noise) for level in (0.1, 0.2, 0.35)],
    *[("blur", fwhm, inplane_blur) for fwhm in (3.0, 5.0, 8.0)],
    *[("crop", fov, crop_fov) for fov in (40.0, 25.0)],
    *[("bias", s, bias_ramp) for s in (0.5, 1.0)],
    *[("ghost", level, nyquist_ghost) for level in (0.5, 1.0)],
    ("dropout", 0.05, slice_dropout),
]
REAL_ONLY: list[Degradation] = [("volumes", n, fewer_volumes) for n in (1, 3)]


# --- alternative definitions ------------------------------------------------------------------

def _inplane_structure(slice_axis: int) -> np.ndarray:
    """6-connected structure without neighbours across slices."""
    structure = ndimage.generate_binary_structure(3, 1)
    for k in (0, 2):
        index = [1, 1, 1]
        index[slice_axis] = k
        structure[tuple(index)] = False
    return structure


def border_band_score(p: np.ndarray, mask: np.ndarray, slice_axis: int) -> float:
    """1 - share of voxels within 1 voxel (in-plane) of the mask border with p in (0.2, 0.8)."""
    mask = mask > 0
    if not mask.any():
        return 0.0
    structure = _inplane_structure(slice_axis)
    band = ndimage.binary_dilation(mask, structure) & ~ndimage.binary_erosion(mask, structure)
    return 1.0 - float(((p > 0.2) & (p < 0.8) & band).sum() / band.sum())


def entropy_band_score(p: np.ndarray, mask: np.ndarray, slice_axis: int) -> float:
    """1 - mean binary entropy (bits) within 2 voxels (in-plane) of the mask."""
    mask = mask > 0
    if not mask.any():
        return 0.0
    band = ndimage.binary_dilation(mask, _inplane_structure(slice_axis), iterations=2)
    q = np.clip(p[band].astype(np.float64), 1e-9, 1 - 1e-9)
    return 1.0 - float(np.mean(-(q * np.log2(q) + (1 - q) * np.log2(1 - q))))


# --- the run --------------------------------------------------------------------------------

def load_images(n_phantoms: int, seed: int) -> list[Image]:
    """The held-out real run (its mean and volumes) and ``n_phantoms`` held-out phantoms."""
    run = epi.read_volume(HELDOUT / "fmri.nii.gz", keep_volumes=True)
    truth = np.asarray(nib.load(HELDOUT / "fmri_moco_mean_seg_modif.nii.gz").dataobj) > 0
    images = [Image("real", run.data.astype(np.float32), truth, run.affine, run.volumes)]
    for i in range(n_phantoms):
        case = phantom_case(seed + EVAL_PHANTOM_SEED_OFFSET + i)
        images.append(Image(f"phantom{i:02d}", case.image, case.mask > 0, case.affine))
    return images


def evaluate(predictor, images: list[Image], seed: int) -> list[dict]:
    """Segment every image and degraded copy; Dice, worst-slice Dice and every definition."""
    from episeg_bids import segment

    rows = []
    for i, img in enumerate(images):
        degradations = DEGRADATIONS + (REAL_ONLY if img.volumes is not None else [])
        for j, (kind, level, degrade) in enumerate(degradations):
            rng = np.random.default_rng([seed, i, j])
            data, truth, affine = (img.data, img.truth, img.affine) if degrade is None else degrade(img, level, rng)
            zooms = tuple(float(z) for z in nib.affines.voxel_sizes(affine))
            seg = segment.segment_volume(predictor, np.asarray(data, np.float32), affine, zooms, probabilities=True)
            axis = metrics.slice_axis(affine)
            p, mask = seg.foreground_probability, seg.mask
            score = confidence.confidence_score(p, mask, slice_axis=axis)
            slice_dice = [row["dice"] for row in accuracy.per_slice_dice(mask, truth, axis)]
            rows.append({
                "image": img.name, "kind": kind, "level": level,
                "dice": accuracy.dice(mask, truth) or 0.0, "worst_slice_dice": min(slice_dice),
                "confidence": score["confidence"], "volume": score["confidence_volume"],
                "worst_slice": score["confidence_worst_slice"],
                "border_band": border_band_score(p, mask, axis), "entropy_band": entropy_band_score(p, mask, axis),
                "empty": score["empty"],
            })
            print(f"  {img.name:10s} {kind:8s} {level:5g}  Dice {rows[-1]['dice']:.3f}  "
                  f"confidence {score['confidence']:.3f}", file=sys.stderr, flush=True)
    return rows


def spearman(rows: list[dict], key: str, target: str = "dice") -> float:
    """Spearman rank correlation of ``key`` with ``target`` over ``rows``."""
    return float(stats.spearmanr([r[key] for r in rows], [r[target] for r in rows])[0])


def bootstrap_interval(rows: list[dict], key: str, seed: int, draws: int = 1000) -> tuple[float, float]:
    """95 % interval of the Spearman correlation, resampling whole images (with their copies)."""
    rng = np.random.default_rng(seed)
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        by_image.setdefault(r["image"], []).append(r)
    names = sorted(by_image)
    values = []
    for _ in range(draws):
        sample = [r for name in rng.choice(names, len(names)) for r in by_image[name]]
        values.append(spearman(sample, key))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


FAILED_DICE = 0.7
FAILED_SLICE_DICE = 0.5


def failures_caught(rows: list[dict], key: str, share: float) -> tuple[int, int]:
    """Failed runs among the ``share`` of runs with the lowest ``key`` (ties broken by row order)."""
    failed = [r["dice"] < FAILED_DICE or r["worst_slice_dice"] < FAILED_SLICE_DICE for r in rows]
    order = np.argsort([r[key] for r in rows], kind="stable")[: int(round(share * len(rows)))]
    return int(sum(failed[i] for i in order)), int(sum(failed))


def time_score(repeats: int = 20) -> float:
    """Median seconds of :func:`confidence.confidence_score` on a 128×128×24 probability map."""
    rng = np.random.default_rng(0)
    p = ndimage.gaussian_filter(rng.random((128, 128, 24)), 2).astype(np.float32)
    mask = (p > 0.5).astype(np.uint8)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        confidence.confidence_score(p, mask)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def report(rows: list[dict], seed: int) -> None:
    """Print the correlation tables."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    print(f"\n{len(rows)} segmentations of {len({r['image'] for r in rows})} images "
          f"({sum(r['empty'] for r in rows)} empty masks)\n")
    print(f"{'degradation':12s} {'n':>3s} {'Dice med':>8s} {'conf med':>8s}   Spearman with Dice (with the clean images)")
    print(f"{'':12s} {'':>3s} {'':>8s} {'':>8s}   " + " ".join(f"{d:>12s}" for d in DEFINITIONS))
    for kind in kinds:
        sel = [r for r in rows if r["kind"] == kind]
        with_clean = sel + ([r for r in rows if r["kind"] == "clean"] if kind != "clean" else [])
        rho = " ".join(f"{spearman(with_clean, d):12.3f}" for d in DEFINITIONS)
        print(f"{kind:12s} {len(sel):3d} {np.median([r['dice'] for r in sel]):8.3f} "
              f"{np.median([r['confidence'] for r in sel]):8.3f}   {rho}")
    print(f"{'ALL':12s} {len(rows):3d} {np.median([r['dice'] for r in rows]):8.3f} "
          f"{np.median([r['confidence'] for r in rows]):8.3f}   "
          + " ".join(f"{spearman(rows, d):12.3f}" for d in DEFINITIONS))
    print(f"{'vs worst-slice Dice':29s}   " + " ".join(f"{spearman(rows, d, 'worst_slice_dice'):12.3f}"
                                                      for d in DEFINITIONS))
    print(f"{'min of the two':29s}   " + " ".join(
        f"{min(spearman(rows, d), spearman(rows, d, 'worst_slice_dice')):12.3f}" for d in DEFINITIONS))
    intervals = [bootstrap_interval(rows, d, seed) for d in DEFINITIONS]
    print(f"{'95% CI vs Dice (images)':29s}   " + " ".join(f"{f'{lo:.2f}-{hi:.2f}':>12s}" for lo, hi in intervals))
    nonempty = [r for r in rows if not r["empty"]]
    print(f"{'non-empty masks only':29s}   " + " ".join(f"{spearman(nonempty, d):12.3f}" for d in DEFINITIONS))
    for share in (0.2, 0.33):
        print(f"{f'failures in lowest {share:.0%}':29s}   " + " ".join(
            f"{f'{caught}/{total}':>12s}" for caught, total in (failures_caught(rows, d, share) for d in DEFINITIONS)))
    print(f"  (failure: Dice < {FAILED_DICE} or a slice with Dice < {FAILED_SLICE_DICE}; runs a reviewer "
          "reading that share of the list, least confident first, would see)")

    real = [r for r in rows if r["image"] == "real"]
    print(f"\nheld-out real run alone ({len(real)} copies): Spearman confidence–Dice {spearman(real, 'confidence'):.3f}")
    print(f"{'copy':16s} {'Dice':>6s} {'worst':>6s} {'conf':>6s} {'volume':>6s} {'w.sl.':>6s}")
    for r in real:
        print(f"{r['kind'] + ' ' + format(r['level'], 'g'):16s} {r['dice']:6.3f} {r['worst_slice_dice']:6.3f} "
              f"{r['confidence']:6.3f} {r['volume']:6.3f} {r['worst_slice']:6.3f}")
    per_image = [spearman([r for r in rows if r["image"] == name], "confidence") for name in dict.fromkeys(r["image"] for r in rows)]
    print(f"\nwithin each image (its copies): Spearman confidence–Dice median {np.median(per_image):.3f}, "
          f"min {np.min(per_image):.3f}")


def get_parser() -> argparse.ArgumentParser:
    """Command-line parser."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--n-phantoms", type=int, default=12, help="held-out phantoms (seed + 900000 + i)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="phantom base seed and degradation noise")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--tsv", type=Path, help="also write every row here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = get_parser().parse_args(argv)
    os.environ.setdefault("nnUNet_def_n_proc", str(args.threads))
    from episeg_bids import model

    print("command:", " ".join([".venv/bin/python", "benchmarks/bench_confidence.py",
                                *(sys.argv[1:] if argv is None else argv)]))
    print(f"seed {args.seed}: phantoms {args.seed + EVAL_PHANTOM_SEED_OFFSET}.."
          f"{args.seed + EVAL_PHANTOM_SEED_OFFSET + args.n_phantoms - 1}; noise rng [seed, image, degradation]")
    print(f"model {args.model_dir}, {args.threads} threads; confidence_score on 128x128x24: "
          f"{1000 * time_score():.1f} ms (median of 20)")
    started = time.perf_counter()
    predictor = model.load_predictor(model.locate_model(args.model_dir), threads=args.threads)
    rows = evaluate(predictor, load_images(args.n_phantoms, args.seed), args.seed)
    report(rows, args.seed)
    print(f"\nwall time {time.perf_counter() - started:.0f} s")
    if args.tsv:
        keys = list(rows[0])
        args.tsv.write_text("\t".join(keys) + "\n" + "".join(
            "\t".join(str(r[k]) for k in keys) + "\n" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
