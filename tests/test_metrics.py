import numpy as np
import pytest

from episeg_bids.metrics import per_slice, slice_axis, summary


def cylinder(shape, radius_vox, axis):
    """A cylinder along ``axis`` through the middle of ``shape`` (radius in voxels, isotropic in-plane)."""
    grids = np.indices(shape)
    others = [i for i in range(3) if i != axis]
    centre = [(shape[i] - 1) / 2 for i in others]
    r2 = sum((grids[i] - c) ** 2 for i, c in zip(others, centre))
    return (r2 <= radius_vox ** 2).astype(np.uint8)


def test_cylinder_area_volume_on_anisotropic_grid():
    mask = cylinder((21, 21, 6), 4, axis=2)
    zooms = (0.5, 0.5, 5.0)
    per_plane = int(mask[..., 0].sum())
    s = summary(mask, np.diag([*zooms, 1.0]), zooms)
    assert s["slice_axis"] == 2 and s["n_slices"] == 6 and s["slices_with_cord"] == 6
    assert s["mean_area_mm2"] == pytest.approx(per_plane * 0.25)
    assert s["volume_mm3"] == pytest.approx(per_plane * 6 * 0.25 * 5.0)
    assert s["components"] == 1 and s["first_slice"] == 0 and s["last_slice"] == 5


def test_axis_permuted_grid_gives_same_area():
    # voxel axes (S, R, A): the superior axis is axis 0
    mask = np.moveaxis(cylinder((21, 21, 6), 4, axis=2), 2, 0)
    affine = np.array([[0, 0.5, 0, 0], [0, 0, 0.5, 0], [5.0, 0, 0, 0], [0, 0, 0, 1]])
    zooms = (5.0, 0.5, 0.5)
    assert slice_axis(affine) == 0
    rows = per_slice(mask, affine, zooms)
    assert len(rows) == 6
    assert rows[0]["area_mm2"] == pytest.approx(int(mask[0].sum()) * 0.25)
    # centroid of slice k lies at z = 5 k mm, x = y = 10 * 0.5 mm
    assert rows[3]["centroid_z_mm"] == pytest.approx(15.0)
    assert rows[3]["centroid_x_mm"] == pytest.approx(5.0)


def test_gaps_and_empty_slices():
    mask = cylinder((9, 9, 5), 2, axis=2)
    mask[..., 2] = 0
    mask[..., 4] = 0
    s = summary(mask, np.eye(4), (1.0, 1.0, 1.0))
    assert s["slices_with_cord"] == 3 and s["first_slice"] == 0 and s["last_slice"] == 3
    assert s["components"] == 2


def test_empty_mask():
    s = summary(np.zeros((4, 4, 4), np.uint8), np.eye(4), (1.0, 1.0, 1.0))
    assert s["voxels"] == 0 and s["first_slice"] is None and s["mean_area_mm2"] is None


def test_quality_flags_on_hand_made_masks():
    from episeg_bids.metrics import per_slice, quality_flags
    affine, zooms = np.eye(4), (1.0, 1.0, 1.0)

    def flags_of(mask):
        rows = per_slice(mask, affine, zooms)
        return {f["code"]: f for f in quality_flags(mask, affine, rows, summary(mask, affine, zooms))}

    good = cylinder((21, 21, 5), 4, axis=2)           # 49 mm² per slice, one component, centred
    assert flags_of(good) == {}
    assert set(flags_of(np.zeros((5, 5, 5)))) == {"empty"}
    gap = good.copy()
    gap[..., 2] = 0
    found = flags_of(gap)
    assert found["gaps"]["slices"] == [2] and "components" in found
    thin = cylinder((21, 21, 5), 1, axis=2)            # 5 mm² per slice: implausible
    assert flags_of(thin)["area"]["slices"] == [0, 1, 2, 3, 4]
    edge = good.copy()
    edge[0, 10, 1] = 1                                 # touches the x = 0 border
    assert "edge" in flags_of(edge)
