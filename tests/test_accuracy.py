import numpy as np
import pytest

from episeg_bids.accuracy import compare, dice, hd95_mm, per_slice_dice

ZOOMS = (1.0, 1.0, 5.0)


def test_dice_by_hand():
    assert dice(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 0])) == 0.5
    assert dice(np.zeros(3), np.zeros(3)) is None


def test_hd95_single_voxels_two_slices_apart_on_anisotropic_grid():
    a = np.zeros((3, 3, 5), np.uint8)
    b = np.zeros_like(a)
    a[1, 1, 0] = 1
    b[1, 1, 2] = 1     # two slices of 5 mm apart: 10 mm
    assert hd95_mm(a, b, ZOOMS) == pytest.approx(10.0)
    b[1, 1, 2] = 0
    b[2, 1, 0] = 1     # one voxel of 1 mm apart in-plane
    assert hd95_mm(a, b, ZOOMS) == pytest.approx(1.0)
    assert hd95_mm(a, np.zeros_like(a), ZOOMS) is None


def test_identical_masks():
    a = np.zeros((6, 6, 4), np.uint8)
    a[2:4, 2:4, :] = 1
    result = compare(a, a, np.diag([*ZOOMS, 1.0]), ZOOMS)
    assert result["dice"] == 1.0 and result["hd95_mm"] == 0.0 and result["volume_diff_mm3"] == 0.0


def test_partial_manual_coverage_reported_on_common_slices():
    pred = np.zeros((6, 6, 5), np.uint8)
    pred[2:4, 2:4, :] = 1            # 4 voxels on each of 5 slices
    truth = pred.copy()
    truth[..., 3:] = 0               # the manual mask covers slices 0-2 only
    result = compare(pred, truth, np.diag([*ZOOMS, 1.0]), ZOOMS)
    assert result["dice"] == pytest.approx(2 * 12 / (20 + 12))
    assert result["dice_common"] == 1.0 and result["hd95_mm_common"] == 0.0 and result["common_slices"] == 3
    assert result["volume_diff_mm3"] == pytest.approx(8 * 5.0)
    assert result["volume_diff_percent"] == pytest.approx(100 * 8 / 12, abs=0.01)
    assert [r["dice"] for r in result["per_slice"]] == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_per_slice_dice_follows_the_superior_axis():
    pred = np.zeros((4, 3, 3), np.uint8)   # slice axis 0 for an (S, R, A) affine
    pred[1, 1, 1] = 1
    rows = per_slice_dice(pred, pred, axis=0)
    assert rows == [{"slice": 1, "dice": 1.0, "voxels_pred": 1, "voxels_truth": 1}]
