"""Slice-wise motion correction (episeg_bids.moco) on real EPI images.

Tuning (group size, search range, regularisation) was done on runs synthesised from the two
68×68 runs (sub-errsm30 and the held-out SCT example); the acceptance test below synthesises its
run from ANOTHER subject, the real Leipzig moco mean (128×128×24, 1×1×5 mm), never tuned on.
The synthetic runs move each slice with a Fourier phase ramp (not the B-spline interpolation
moco uses), so the test does not grade the method on its own interpolator.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from conftest import DATA, LEIPZIG, LEIPZIG_MASK, SCT_RUN
from scipy import ndimage

from episeg_bids import moco
from episeg_bids.segment import segment_volume

HELDOUT = DATA / "heldout_sct_example_data_r20161128" / "fmri"
SEED = 11


# --------------------------------------------------------------------------- synthetic runs


def true_shifts_mm(n_t: int, n_s: int, rng: np.random.Generator) -> np.ndarray:
    """(T, S, 2) in-plane shifts in mm, 0-3 mm: a slow drift (with a slow oscillation), two
    sudden jumps of 0.8-1.5 mm, a slice-dependent amplitude (0.6-1.3 times, ±15 % per slice) and
    0.05 mm per-volume, per-slice jitter; the first volume holds only the jitter."""
    t = np.linspace(0.0, 1.0, n_t)[:, None]
    direction = rng.normal(size=2)
    course = (1.2 * t + 0.25 * np.sin(2 * np.pi * 1.5 * t)) * direction / np.linalg.norm(direction)
    for when in rng.choice(np.arange(n_t // 5, n_t), size=2, replace=False):
        step = rng.normal(size=2)
        course[when:] += rng.uniform(0.8, 1.5) * step / np.linalg.norm(step)
    amplitude = np.linspace(0.6, 1.3, n_s) * (1 + 0.15 * rng.normal(size=n_s))
    shifts = course[:, None, :] * amplitude[None, :, None] + 0.05 * rng.normal(size=(n_t, n_s, 2))
    norm = np.linalg.norm(shifts, axis=2, keepdims=True)
    return shifts * np.minimum(1.0, 3.0 / np.maximum(norm, 1e-9))


def fourier_shift_slices(volume: np.ndarray, shifts_vox: np.ndarray, pad: int = 16) -> np.ndarray:
    """(X, Y, Z) volume with slice ``s`` moved by ``+shifts_vox[s]`` (content at x goes to
    x + shift), by a phase ramp on the mirror-padded slice."""
    padded = np.pad(volume.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    spectrum = np.fft.fft2(padded, axes=(0, 1))
    fa = np.fft.fftfreq(padded.shape[0])[:, None, None]
    fb = np.fft.fftfreq(padded.shape[1])[None, :, None]
    ramp = np.exp(-2j * np.pi * (fa * shifts_vox[:, 0] + fb * shifts_vox[:, 1]))
    return np.fft.ifft2(spectrum * ramp, axes=(0, 1)).real[pad:-pad, pad:-pad]


def synthetic_run(mean, cord, zooms, shifts_mm, rng, *, noise_snr=32.0, fluctuation=0.02):
    """(X, Y, Z, T) float32 from a real 3D mean: per volume a global gain (1 % slow drift,
    0.4 % random), a cardiac-like fluctuation around the cord (``fluctuation`` of the signal,
    smooth in space, a 1.13 Hz rhythm sampled once per volume), the slice shifts, then Gaussian noise of SD ``cord mean / noise_snr``."""
    n_t = len(shifts_mm)
    around_cord = ndimage.gaussian_filter(cord.astype(float), (3, 3, 0))
    around_cord /= around_cord.max()
    gain = 1 + 0.01 * np.sin(2 * np.pi * np.arange(n_t) / 45.0) + 0.004 * rng.normal(size=n_t)
    pulse = fluctuation * np.sin(2 * np.pi * 1.13 * np.arange(n_t) + rng.uniform(0, 2 * np.pi))
    noise_sd = float(mean[cord].mean()) / noise_snr
    run = np.empty(mean.shape + (n_t,), np.float32)
    for t in range(n_t):
        volume = mean * gain[t] * (1 + pulse[t] * around_cord)
        run[..., t] = fourier_shift_slices(volume, shifts_mm[t] / np.asarray(zooms[:2]))
        run[..., t] += rng.normal(scale=noise_sd, size=mean.shape)
    return run


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def load(path) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    img = nib.load(path)
    return img.get_fdata(dtype=np.float32), img.affine, tuple(float(z) for z in img.header.get_zooms()[:3])


# --------------------------------------------------------------------------- acceptance: synthetic


@pytest.fixture(scope="module")
def leipzig_case(predictor):
    """Moco of a 60-volume run synthesised from the Leipzig mean, with the app's two passes:
    plain mean -> demo-model mask -> 35 mm cylinder -> moco."""
    mean, affine, zooms = load(LEIPZIG)
    manual = np.asarray(nib.load(LEIPZIG_MASK).dataobj) > 0
    rng = np.random.default_rng(SEED)
    truth = true_shifts_mm(60, mean.shape[2], rng)
    still = synthetic_run(mean, manual, zooms, np.zeros_like(truth), np.random.default_rng(SEED + 1))
    moving = synthetic_run(mean, manual, zooms, truth, np.random.default_rng(SEED + 1))
    plain = moving.mean(axis=3)
    first_mask = segment_volume(predictor, plain, affine, zooms).mask
    roi = moco.cord_cylinder(first_mask, zooms, 2)
    result = moco.motion_correct(moving, zooms, 2, roi=roi)
    return dict(truth=truth, still=still, moving=moving, plain=plain, result=result, manual=manual,
                affine=affine, zooms=zooms, first_mask=first_mask)


def test_synthetic_run_has_realistic_temporal_snr(leipzig_case):
    tsnr = moco.temporal_snr(leipzig_case["still"], leipzig_case["manual"])
    print(f"\ntSNR in the cord of the synthetic run without motion: {tsnr:.1f}")
    assert 20 <= tsnr <= 40, tsnr


def test_shifts_recovered_within_a_tenth_of_a_millimetre(leipzig_case):
    truth, result = leipzig_case["truth"], leipzig_case["result"]
    group = result.parameters["GroupSize"]
    expected = truth - truth[:group].mean(axis=0)           # the reference is the first group
    with_cord = leipzig_case["first_mask"].any(axis=(0, 1))
    error = result.shifts_mm[:, with_cord] - expected[:, with_cord]
    rms = float(np.sqrt(np.mean(np.sum(error**2, axis=2))))
    print(f"\nshift RMS error {rms:.4f} mm over {with_cord.sum()} slices, max |truth| "
          f"{np.linalg.norm(truth, axis=2).max():.2f} mm")
    assert np.linalg.norm(truth, axis=2).max() > 2.5
    assert rms <= 0.1, rms


def test_mask_on_moco_mean_matches_motion_free_mask(leipzig_case, predictor):
    affine, zooms = leipzig_case["affine"], leipzig_case["zooms"]
    reference = segment_volume(predictor, leipzig_case["still"].mean(axis=3), affine, zooms).mask
    on_moco = segment_volume(predictor, leipzig_case["result"].mean, affine, zooms).mask
    on_plain = segment_volume(predictor, leipzig_case["plain"], affine, zooms).mask
    dice_moco, dice_plain = dice(on_moco, reference), dice(on_plain, reference)
    print(f"\nDice vs mask on the motion-free mean: moco mean {dice_moco:.3f}, plain mean {dice_plain:.3f}")
    assert dice_moco >= 0.95, (dice_moco, dice_plain)
    assert dice_plain <= dice_moco - 0.03, (dice_moco, dice_plain)


def test_mean_equals_scipy_resampling_of_each_volume(leipzig_case):
    """The fast mean (one matrix product per slice) equals the mean of the volumes resampled one
    by one with scipy.ndimage.shift(order=3), away from the field-of-view edge."""
    moving, zooms = leipzig_case["moving"][..., :20], leipzig_case["zooms"]
    fast = moco.motion_correct(moving, zooms, 2, group_size=2)
    assert np.abs(fast.shifts_mm).max() > 0.3                    # real sub-voxel resampling
    slow = moco.apply_shifts(moving, fast.shifts_mm, zooms, 2).mean(axis=3)
    inner = (slice(10, -10), slice(10, -10))
    scale = np.abs(slow[inner]).max()
    assert np.abs(fast.mean[inner] - slow[inner]).max() <= 1e-4 * scale


# --------------------------------------------------------------------------- acceptance: real runs


def tsnr_before_after(run, zooms, cord) -> tuple[float, float]:
    result = moco.motion_correct(run, zooms, 2, roi=moco.cord_cylinder(cord, zooms, 2))
    corrected = moco.apply_shifts(run, result.shifts_mm, zooms, 2)
    return moco.temporal_snr(run, cord), moco.temporal_snr(corrected, cord)


def test_real_heldout_run_temporal_snr_not_worse():
    run, _, zooms = load(HELDOUT / "fmri.nii.gz")
    cord = np.asarray(nib.load(HELDOUT / "fmri_moco_mean_seg_modif.nii.gz").dataobj) > 0
    before, after = tsnr_before_after(run, zooms, cord)
    print(f"\nheld-out run: tSNR in the cord {before:.2f} before, {after:.2f} after moco")
    assert after >= before


def test_real_sct_run_temporal_snr_not_worse(predictor):
    run, affine, zooms = load(SCT_RUN)
    cord = segment_volume(predictor, run.mean(axis=3), affine, zooms).mask > 0
    assert cord.sum() > 100
    before, after = tsnr_before_after(run, zooms, cord)
    print(f"\nsub-errsm30 run: tSNR in the cord {before:.2f} before, {after:.2f} after moco")
    assert after >= before


# --------------------------------------------------------------------------- properties


@pytest.fixture(scope="module")
def heldout_still():
    """The held-out run's mean repeated 12 times with noise: a real image without motion."""
    run, _, zooms = load(HELDOUT / "fmri.nii.gz")
    mean = run.mean(axis=3)
    rng = np.random.default_rng(SEED)
    still = mean[..., None] + rng.normal(scale=mean.mean() / 30, size=mean.shape + (12,))
    cord = np.asarray(nib.load(HELDOUT / "fmri_moco_mean_seg_modif.nii.gz").dataobj) > 0
    return still.astype(np.float32), zooms, cord


def test_zero_motion_gives_zero_shifts_and_the_plain_mean(heldout_still):
    still, zooms, cord = heldout_still
    result = moco.motion_correct(still, zooms, 2, roi=moco.cord_cylinder(cord, zooms, 2))
    assert np.abs(result.shifts_mm).max() < 0.05
    assert result.framewise_displacement_mm[0] == 0.0
    plain = still.mean(axis=3)
    assert np.abs(result.mean - plain)[cord].max() < 0.01 * plain[cord].mean()


def test_result_does_not_depend_on_storage_order(heldout_still):
    """The same run stored with the slice axis first gives the same shifts and mean."""
    still, zooms, cord = heldout_still
    moved = still.copy()
    moved[..., 6:] = np.roll(still[..., 6:], 2, axis=0)       # a 2-voxel jump along axis 0
    roi = moco.cord_cylinder(cord, zooms, 2)
    stored = moco.motion_correct(moved, zooms, 2, roi=roi)
    permuted = moco.motion_correct(moved.transpose(2, 0, 1, 3), (zooms[2], zooms[0], zooms[1]), 0,
                                   roi=roi.transpose(2, 0, 1))
    np.testing.assert_allclose(permuted.shifts_mm, stored.shifts_mm, atol=1e-6)
    np.testing.assert_allclose(permuted.mean, stored.mean.transpose(2, 0, 1), rtol=1e-5, atol=1e-3)
    jump = stored.shifts_mm[6:, :, 0].mean() - stored.shifts_mm[:6, :, 0].mean()
    assert abs(jump - 2 * zooms[0]) < 0.05, jump            # the content moved to higher indices


def test_invalid_samples_are_left_out_of_the_mean(heldout_still):
    still, zooms, cord = heldout_still
    run = still.copy()
    finite = np.ones(run.shape, bool)
    finite[30:34, 30:34, 2, 3:9] = False
    run[~finite] = 0.0
    result = moco.motion_correct(run, zooms, 2, finite=finite)
    clean = moco.motion_correct(still, zooms, 2)
    region = (slice(30, 34), slice(30, 34), 2)
    assert np.abs(result.mean[region] - clean.mean[region]).max() < 0.05 * still.mean()


def test_cord_cylinder_follows_the_cord_and_fills_empty_slices():
    mask = np.zeros((40, 40, 4), bool)
    mask[10:13, 20:23, 0] = True                               # centroid (11, 21)
    mask[20:23, 20:23, 3] = True                               # centroid (21, 21)
    roi = moco.cord_cylinder(mask, (1.0, 1.0, 5.0), 2, diameter_mm=5.0)
    centres = [np.argwhere(roi[:, :, s]).mean(axis=0) for s in range(4)]
    np.testing.assert_allclose([c[0] for c in centres], [11, 14.33, 17.67, 21], atol=0.5)
    assert all(abs(roi[:, :, s].sum() - np.pi * 2.5**2) <= 4 for s in range(4))   # a 5 mm disc
    assert moco.cord_cylinder(np.zeros((5, 5, 2)), (1.0, 1.0, 5.0), 2).all()


def test_cord_cylinder_diameter_is_in_millimetres():
    mask = np.zeros((60, 60, 1), bool)
    mask[30, 30, 0] = True
    roi = moco.cord_cylinder(mask, (0.5, 2.0, 5.0), 2, diameter_mm=20.0)
    rows, cols = np.nonzero(roi[:, :, 0])
    assert (rows.max() - rows.min()) * 0.5 == pytest.approx(20.0, abs=1.0)
    assert (cols.max() - cols.min()) * 2.0 == pytest.approx(20.0, abs=2.0)


def test_regularisation_fills_a_slice_without_information():
    estimates = np.array([[[1.0, 0.0], [9.0, 9.0], [3.0, 0.0]]])      # (T=1, S=3, 2), mm
    information = np.array([np.eye(2) * 1e6, np.zeros((2, 2)), np.eye(2) * 1e6])
    smoothed = moco.regularise_along_slices(estimates, information, tau_mm=0.5)
    np.testing.assert_allclose(smoothed[0], [[1, 0], [2, 0], [3, 0]], atol=1e-3)


def test_motion_table_one_row_per_volume():
    shifts = np.zeros((3, 2, 2))
    shifts[2, 1] = [0.3, 0.4]
    rows = moco.motion_table(shifts, moco.framewise_displacement(shifts), slice_axis=1)
    assert len(rows) == 3
    assert rows[-1] == {"volume": 2, "framewise_displacement_mm": 0.25, "mean_translation_i_mm": 0.15,
                        "mean_translation_k_mm": 0.2, "max_displacement_mm": 0.5,
                        "translation_i_slice00_mm": 0.0, "translation_k_slice00_mm": 0.0,
                        "translation_i_slice01_mm": 0.3, "translation_k_slice01_mm": 0.4}
    # summaries over the registered slices only
    only = moco.motion_table(shifts, moco.framewise_displacement(shifts), slice_axis=1, slices=np.array([True, False]))
    assert only[-1]["max_displacement_mm"] == 0.0


def test_motion_summary_and_flag():
    shifts = np.zeros((20, 3, 2))
    result = moco.MotionCorrection(np.zeros((2, 2, 3), np.float32), shifts, moco.framewise_displacement(shifts), "", {})
    calm = moco.motion_summary(result)
    assert calm["HighMotionVolumes"] == 0 and moco.motion_flags(calm) == []
    shifts[10:, :, 0] = 2.5                                  # one jump of 2.5 mm
    result.framewise_displacement_mm = moco.framewise_displacement(shifts)
    moved = moco.motion_summary(result)
    assert moved["HighMotionVolumes"] == 1 and moved["MaxDisplacementMM"] == 2.5
    (flag,) = moco.motion_flags(moved)
    assert flag["code"] == "motion" and "2.50 mm" in flag["message"]


@pytest.mark.parametrize("bad, message", [
    (dict(volumes=np.zeros((4, 4, 4), np.float32)), "4D"),
    (dict(roi=np.zeros((4, 4, 2), bool)), "no voxel"),
    (dict(slice_axis=3), "slice_axis"),
    (dict(group_size=0), "group_size"),
    (dict(smoothing=1), "unknown"),
])
def test_bad_input_is_refused_with_the_reason(bad, message):
    arguments = dict(volumes=np.zeros((4, 4, 2, 3), np.float32), zooms_mm=(1.0, 1.0, 5.0), slice_axis=2)
    arguments.update(bad)
    with pytest.raises(ValueError, match=message):
        moco.motion_correct(arguments.pop("volumes"), arguments.pop("zooms_mm"), arguments.pop("slice_axis"),
                            **arguments)


def test_slice_without_roi_follows_its_neighbours(heldout_still):
    still, zooms, cord = heldout_still
    moved = still.copy()
    moved[..., 6:] = np.roll(still[..., 6:], -1, axis=1)      # a 1-voxel jump along axis 1
    roi = moco.cord_cylinder(cord, zooms, 2)
    roi[:, :, 2] = False
    result = moco.motion_correct(moved, zooms, 2, roi=roi)
    assert result.parameters["RegistrationMask"].startswith("roi")
    np.testing.assert_allclose(result.shifts_mm[:, 2], result.shifts_mm[:, [1, 3]].mean(axis=1), atol=0.02)
    assert np.abs(result.shifts_mm[6:, 2, 1] + zooms[1]).max() < 0.05


def test_noise_free_and_short_runs():
    mean, _, zooms = load(HELDOUT / "fmri.nii.gz")
    mean = mean.mean(axis=3)
    shifts_vox = np.zeros((4, mean.shape[2], 2))
    shifts_vox[2:, :, 0] = 0.5
    run = np.stack([fourier_shift_slices(mean, s) for s in shifts_vox], axis=3).astype(np.float32)
    result = moco.motion_correct(run, zooms, 2, group_size=2)
    np.testing.assert_allclose(result.shifts_mm[:, :, 0], shifts_vox[:, :, 0] * zooms[0], atol=0.03)
    single = moco.motion_correct(run[..., :1], zooms, 2)
    assert np.abs(single.shifts_mm).max() == 0.0
    np.testing.assert_allclose(single.mean, run[..., 0], rtol=1e-4, atol=1e-2)
