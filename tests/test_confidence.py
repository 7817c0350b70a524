import nibabel as nib
import numpy as np
import pytest

from conftest import DATA
from episeg_bids import accuracy, epi, metrics
from episeg_bids.confidence import MIN_SLICE_MASS_VOXELS, confidence_score, expected_dice
from episeg_bids.segment import segment_volume

HELDOUT = DATA / "heldout_sct_example_data_r20161128" / "fmri"


def square_cord(shape=(8, 8, 3)) -> np.ndarray:
    """A 4×4 square of cord on every slice (16 voxels per slice)."""
    mask = np.zeros(shape, np.uint8)
    mask[2:6, 2:6, :] = 1
    return mask


def test_crisp_probability_scores_one():
    mask = square_cord()
    score = confidence_score(mask.astype(np.float32), mask)
    assert score["confidence"] == score["confidence_volume"] == score["confidence_worst_slice"] == 1.0
    assert score["expected_false_positive_voxels"] == score["expected_false_negative_voxels"] == 0.0
    assert score["mask_voxels"] == 48 and score["probability_mass_voxels"] == 48.0
    assert score["slices_assessed"] == 3 and score["worst_slice"] == 0 and score["empty"] is False
    assert [row["confidence"] for row in score["per_slice"]] == [1.0, 1.0, 1.0]


def test_half_probability_along_the_border_scores_low():
    mask = square_cord()
    p = np.zeros(mask.shape)
    p[1:7, 1:7, :] = 0.5          # the ring just outside the mask (20 voxels) and the mask's border ring (12)
    p[3:5, 3:5, :] = 1.0          # a sure 2×2 core
    # per slice: Σ_M p = 4 + 12·0.5 = 10, |M| = 16, Σ p = 10 + 20·0.5 = 20 → 2·10 / (16 + 20)
    score = confidence_score(p, mask)
    assert score["confidence"] == score["confidence_volume"] == round(20 / 36, 4)
    assert score["confidence"] < 0.6
    assert score["expected_false_positive_voxels"] == 3 * 6.0    # 12 border voxels at 1 - 0.5, per slice
    assert score["expected_false_negative_voxels"] == 3 * 10.0   # 20 outside voxels at 0.5, per slice


def test_one_failed_slice_costs_its_share_of_the_score():
    mask = square_cord((8, 8, 5))
    p = mask.astype(float)
    p[..., 3] = 0.0               # slice 3 drawn, but the network gave it no probability
    score = confidence_score(p, mask)
    assert score["confidence"] == 0.8                                    # (4 × 1 + 0) / 5
    assert score["confidence_volume"] == round(2 * 64 / (80 + 64), 4)   # 0.8889: one slice of five hides in it
    assert score["confidence_worst_slice"] == 0.0 and score["worst_slice"] == 3


def test_slice_axis_follows_the_affine_not_the_storage_order():
    mask = square_cord((8, 8, 5))
    p = mask.astype(float)
    p[..., 3] *= 0.6
    reference = confidence_score(p, mask)
    # the same volume stored with the slice axis first (a PIR-like order)
    stored = confidence_score(np.moveaxis(p, 2, 0), np.moveaxis(mask, 2, 0), slice_axis=0)
    assert stored == reference
    assert confidence_score(p, mask, slice_axis=0)["slices_assessed"] == 4   # rows 2-5 of axis 0 hold cord


def test_empty_mask_scores_zero_and_says_whether_the_network_saw_anything():
    nothing = confidence_score(np.zeros((8, 8, 3)), np.zeros((8, 8, 3), np.uint8))
    assert nothing["confidence"] == nothing["confidence_volume"] == nothing["confidence_worst_slice"] == 0.0
    assert nothing["empty"] is True and nothing["worst_slice"] is None and nothing["slices_assessed"] == 0
    assert nothing["probability_mass_voxels"] == 0.0
    assert all(row["confidence"] is None for row in nothing["per_slice"])

    p = np.zeros((8, 8, 3))
    p[2:6, 2:6, 1] = 0.4          # 6.4 voxels of probability on slice 1, below the argmax
    missed = confidence_score(p, np.zeros(p.shape, np.uint8))
    assert missed["confidence"] == 0.0 and missed["empty"] is True
    assert missed["probability_mass_voxels"] == missed["expected_false_negative_voxels"] == 6.4
    assert missed["worst_slice"] == 1 and missed["slices_assessed"] == 1


def test_stray_probability_below_one_voxel_does_not_make_a_slice():
    mask = square_cord((8, 8, 4))
    mask[..., 3] = 0
    p = mask.astype(float)
    p[0, 0, 3] = 0.9 * MIN_SLICE_MASS_VOXELS
    score = confidence_score(p, mask)
    assert score["slices_assessed"] == 3 and score["per_slice"][3]["confidence"] is None
    assert score["confidence"] == 1.0 and score["confidence_volume"] < 1.0   # the volume value still counts it
    p[0:2, 0, 3] = 0.9            # 1.8 voxels: cord the network saw and did not draw
    score = confidence_score(p, mask)
    assert score["per_slice"][3]["confidence"] == 0.0 and score["confidence"] == 0.75


def test_per_slice_rows_have_indices_and_counts():
    mask = square_cord((6, 8, 3))
    mask[..., 2] = 0
    p = mask * 0.75
    rows = confidence_score(p, mask)["per_slice"]
    assert [r["slice"] for r in rows] == [0, 1, 2]
    assert [r["mask_voxels"] for r in rows] == [16, 16, 0]
    assert [r["probability_mass_voxels"] for r in rows] == [12.0, 12.0, 0.0]
    assert rows[0]["confidence"] == round(2 * 12 / 28, 4) and rows[2]["confidence"] is None


@pytest.mark.parametrize("p, m, match", [
    (np.zeros((4, 4, 3)), np.zeros((4, 4, 2)), r"shape \(4, 4, 3\) and mask shape \(4, 4, 2\)"),
    (np.zeros((4, 4)), np.zeros((4, 4)), "3D"),
    (np.full((2, 2, 2), np.nan), np.zeros((2, 2, 2)), "8 NaN/Inf"),
    (np.full((2, 2, 2), 3.0), np.zeros((2, 2, 2)), r"spans \[3, 3\]; expected \[0, 1\]"),
])
def test_bad_input_is_refused_with_the_values_that_clashed(p, m, match):
    with pytest.raises(ValueError, match=match):
        confidence_score(p, m)


def test_bad_slice_axis_is_refused():
    with pytest.raises(ValueError, match="slice_axis 3"):
        confidence_score(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), slice_axis=3)


def test_expected_dice_is_elementwise_and_bounded():
    values = expected_dice(np.array([4.0, 0.0, 2.0]), np.array([4, 0, 4]), np.array([4.0, 5.0, 2.0]))
    np.testing.assert_allclose(values, [1.0, 0.0, 4 / 6])


def test_heavily_degraded_real_image_scores_lower_than_the_clean_one(predictor):
    """The held-out real run (never trained on): its mean, and a copy with heavy magnitude noise."""
    run = epi.read_volume(HELDOUT / "fmri.nii.gz")
    truth = np.asarray(nib.load(HELDOUT / "fmri_moco_mean_seg_modif.nii.gz").dataobj) > 0
    axis = metrics.slice_axis(run.affine)
    rng = np.random.default_rng(12)
    sigma = 0.5 * float(np.percentile(run.data, 99))
    noisy = np.hypot(run.data + rng.normal(0, sigma, run.data.shape), rng.normal(0, sigma, run.data.shape))

    results = {}
    for name, data in (("clean", run.data), ("noisy", noisy.astype(np.float32))):
        seg = segment_volume(predictor, data, run.affine, run.zooms_mm, probabilities=True)
        results[name] = (accuracy.dice(seg.mask, truth),
                         confidence_score(seg.foreground_probability, seg.mask, slice_axis=axis))
    (clean_dice, clean), (noisy_dice, noisy_score) = results["clean"], results["noisy"]
    assert clean_dice > 0.85 and noisy_dice < clean_dice - 0.1            # the copy really is worse
    assert clean["confidence"] > 0.9                                      # measured 0.965 (Dice 0.906)
    assert noisy_score["confidence"] < clean["confidence"] - 0.1          # measured 0.79 (Dice 0.37)
