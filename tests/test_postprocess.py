import numpy as np
import pytest

from episeg_bids.errors import UsageError
from episeg_bids.postprocess import (fill_holes, keep_largest_component, parse_size, postprocess,
                                     remove_small_objects, size_in_voxels, threshold)




def test_threshold_is_strict():
    assert threshold(np.array([0.2, 0.5, 0.7]), 0.5).tolist() == [0, 0, 1]


def test_keep_largest_component_uses_6_connectivity():
    m = np.zeros((3, 3, 3), np.uint8)
    m[0, 0, 0] = m[0, 0, 1] = 1   # two face neighbours: one component of 2
    m[1, 1, 2] = 1                # only an edge neighbour of nothing face-connected: separate
    m[2, 2, 2] = 1
    out = keep_largest_component(m)
    assert out.sum() == 2 and out[0, 0, 0] == 1 and out[1, 1, 2] == 0


def test_keep_largest_component_treats_tiny_values_as_background():
    m = np.zeros((1, 1, 5), np.float32)
    m[0, 0, :3] = 0.0005   # below SCT's 0.001 cut: background
    m[0, 0, 4] = 1
    assert keep_largest_component(m).tolist() == [[[0, 0, 0, 0, 1]]]


def test_keep_largest_component_empty_mask():
    assert keep_largest_component(np.zeros((2, 2, 2))).sum() == 0


def test_fill_holes_fills_enclosed_voxel():
    m = np.ones((3, 3, 3), np.uint8)
    m[1, 1, 1] = 0
    assert fill_holes(m).sum() == 27


def test_remove_small_objects_uses_18_connectivity():
    m = np.zeros((3, 3, 3), np.uint8)
    m[0, 0, 0] = m[1, 1, 0] = 1      # edge neighbours: one 2-voxel object with 18-connectivity
    m[2, 2, 2] = 1                   # corner neighbour of (1,1,... no): isolated single voxel
    out = remove_small_objects(m, min_voxels=2)
    assert out[0, 0, 0] == 1 and out[1, 1, 0] == 1 and out[2, 2, 2] == 0


@pytest.mark.parametrize("text, expected", [("20", (20, "vox")), ("20vox", (20, "vox")), ("15mm3", (15, "mm3"))])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["abc", "-3", "10cm"])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        parse_size(text)


def test_size_in_voxels_mm3_rounds_by_voxel_volume():
    # voxel 1 x 1 x 5 mm = 5 mm3: 12 mm3 -> round(2.4) = 2 voxels
    assert size_in_voxels(12, "mm3", (1.0, 1.0, 5.0)) == 2
    assert size_in_voxels(12, "vox", (1.0, 1.0, 5.0)) == 12


def test_postprocess_order_threshold_then_largest():
    prob = np.zeros((1, 1, 7), np.float32)
    prob[0, 0, [0, 1, 2, 5]] = [0.9, 0.8, 0.7, 0.95]
    mask, steps = postprocess(np.zeros_like(prob, np.uint8), probability=prob, thr=0.75, largest=True)
    # threshold keeps 0,1,5 -> largest 6-connected component is {0,1}
    assert mask.ravel().tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert steps[0].startswith("threshold") and steps[1].startswith("keep largest")


def test_postprocess_without_options_is_identity():
    m = np.random.default_rng(0).integers(0, 2, (4, 5, 6)).astype(np.uint8)
    out, steps = postprocess(m)
    assert np.array_equal(out, m) and steps == []
