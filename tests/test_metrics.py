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


# --- components: where, how big, how far; which ones a reviewer should look at --------------------

def cord_with(extra_voxels, shape=(60, 30, 5), zooms=(1.0, 1.0, 5.0)):
    """A cylinder of radius 4 voxels around (x, y) = (10, 14.5) along z (x from 7 to 13), plus the
    voxels given."""
    mask = np.zeros(shape, np.uint8)
    mask[:21, :, :] = cylinder((21, 30, shape[2]), 4, axis=2)[:, :, :]
    for index in extra_voxels:
        mask[index] = 1
    return mask, np.diag([*zooms, 1.0]), zooms


def test_label_components_numbers_by_size_then_position():
    from episeg_bids.metrics import label_components
    labels, n = label_components(np.array([[[1, 0, 1, 1, 0, 1]]]))
    assert n == 3 and labels.ravel().tolist() == [2, 0, 1, 1, 0, 3]      # the pair first, then left to right


def test_summary_takes_the_component_count_from_the_labels_it_is_given():
    from episeg_bids.metrics import label_components
    mask, affine, zooms = cord_with([(44, 15, 2), (44, 25, 3)])          # the cord and two far voxels
    labels = label_components(mask)
    assert labels[1] == 3 and summary(mask, affine, zooms, n_components=labels[1]) == summary(mask, affine, zooms)

def test_far_blob_is_flagged_with_its_slice_a_touching_speck_is_not():
    from episeg_bids.metrics import describe_components, quality_flags
    blob = [(x, y, 2) for x in (44, 45) for y in (15, 16)]              # 2×2×1 voxels of 1×1×5 mm = 20 mm³
    speck = [(14, 18, 4)]                                                # touches the cord's (13, 17) by an edge
    mask, affine, zooms = cord_with(blob + speck)
    table = describe_components(mask, affine, zooms)
    main, far, tiny = table
    assert (main["id"], main["main"], main["first_slice"], main["last_slice"]) == (1, True, 0, 4)
    # 30 voxels of 1 mm between the cord's last column (x = 13) and the blob's first (x = 44)
    assert (far["voxels"], far["volume_mm3"], far["distance_mm"], far["flagged"]) == (4, 20.0, 30.0, True)
    assert (far["first_slice"], far["last_slice"], far["centroid_mm"]) == (2, 2, [44.5, 15.5, 10.0])
    assert (tiny["voxels"], tiny["speck"], tiny["flagged"], tiny["distance_mm"]) == (1, True, False, 0.0)
    rows = per_slice(mask, affine, zooms)
    flags = {f["code"]: f for f in quality_flags(mask, affine, rows, summary(mask, affine, zooms, rows))}
    assert flags["components"]["slices"] == [2]
    assert flags["components"]["message"].endswith(": #2 on slice 2 (20 mm³, 30.0 mm from the cord)")
    assert [c["id"] for c in flags["components"]["components"]] == [2]


def test_only_specks_near_the_cord_raise_no_flag():
    from episeg_bids.metrics import quality_flags
    mask, affine, zooms = cord_with([(16, 15, 1), (16, 16, 1), (3, 3, 3)])   # 10 mm³ 2 mm away; one far voxel
    rows = per_slice(mask, affine, zooms)
    s = summary(mask, affine, zooms, rows)
    assert s["components"] == 3
    assert "components" not in {f["code"] for f in quality_flags(mask, affine, rows, s)}


def test_distance_is_between_voxel_edges_so_thick_slices_do_not_push_neighbours_away():
    from episeg_bids.metrics import describe_components
    zooms = (0.96, 0.96, 16.8)
    mask = np.zeros((30, 30, 3), np.uint8)
    mask[10:16, 10:16, 0:2] = 1                                          # the cord on slices 0 and 1
    mask[17:19, 12:14, 2] = 1                                            # next slice, one voxel beside it in-plane
    (_, fragment) = describe_components(mask, np.diag([*zooms, 1.0]), zooms)
    assert fragment["distance_mm"] == pytest.approx(0.96)                # not 16.8: no slice between them
    assert not fragment["flagged"]                                       # 2×2 voxels = 62 mm³ but close, small


def test_a_second_large_piece_is_flagged_wherever_it_is():
    from episeg_bids.metrics import describe_components
    mask = np.zeros((30, 30, 6), np.uint8)
    mask[10:16, 10:16, 0:3] = 1
    mask[16:22, 10:16, 3:6] = 1                                          # the upper half, shifted: a broken cord
    (_, piece) = describe_components(mask, np.diag([1.0, 1.0, 5.0, 1.0]), (1.0, 1.0, 5.0))
    assert piece["distance_mm"] == 0.0 and piece["flagged"]              # half the volume of the main one


def test_components_are_the_same_whatever_the_storage_order():
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
    from episeg_bids.metrics import describe_components
    mask, affine, zooms = cord_with([(x, y, 2) for x in (44, 45) for y in (15, 16)] + [(30, 2, 0)])
    affine = affine.copy()
    affine[0, 0] = -1.0                                                  # LAS
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(("P", "I", "R")))
    stored = apply_orientation(mask, transform)
    stored_affine = affine @ inv_ornt_aff(transform, mask.shape)
    stored_zooms = tuple(float(z) for z in np.linalg.norm(stored_affine[:3, :3], axis=0))

    def key(table):
        return sorted((c["voxels"], c["volume_mm3"], tuple(c["centroid_mm"]), c["distance_mm"], c["flagged"])
                      for c in table)
    original = describe_components(mask, affine, zooms)
    assert key(describe_components(stored, stored_affine, stored_zooms)) == key(original)


def test_components_of_a_failed_model_match_scipy_per_component():
    """Thousands of pieces (a failed model) are measured with array operations; each one's size,
    slices, centroid and distance agree with scipy.ndimage's per-label functions."""
    from scipy import ndimage
    from episeg_bids.metrics import describe_components, label_components
    rng = np.random.default_rng(7)
    mask = ndimage.gaussian_filter(rng.standard_normal((40, 36, 9)), 0.7) > 0.3
    zooms = (0.9, 1.1, 4.0)
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = (-20.0, 13.0, 7.5)
    labels, n = label_components(mask)
    table = describe_components(mask, affine, zooms, labels=(labels, n))
    assert n > 200 and [c["id"] for c in table] == list(range(1, n + 1))
    ids = np.arange(1, n + 1)
    z_index = np.broadcast_to(np.arange(9), mask.shape)
    centres = np.asarray(ndimage.center_of_mass(np.ones(mask.shape), labels, ids)) * zooms + affine[:3, 3]
    grown = ndimage.binary_dilation(labels == 1, structure=np.ones((3, 3, 3), bool))
    gaps = ndimage.minimum(ndimage.distance_transform_edt(~grown, sampling=zooms), labels, ids)
    assert [c["voxels"] for c in table] == ndimage.sum_labels(np.ones(mask.shape), labels, ids).astype(int).tolist()
    assert [c["first_slice"] for c in table] == np.asarray(ndimage.minimum(z_index, labels, ids), int).tolist()
    assert [c["last_slice"] for c in table] == np.asarray(ndimage.maximum(z_index, labels, ids), int).tolist()
    np.testing.assert_allclose([c["centroid_mm"] for c in table], centres, atol=0.005 + 1e-9)
    np.testing.assert_allclose([c["distance_mm"] for c in table[1:]], gaps[1:], atol=0.005 + 1e-9)


def test_edge_flag_names_its_slices():
    from episeg_bids.metrics import quality_flags
    mask, affine, zooms = cord_with([(0, 15, 3), (1, 15, 3), (2, 15, 3), (3, 15, 3), (4, 15, 3), (5, 15, 3)])
    rows = per_slice(mask, affine, zooms)
    flags = {f["code"]: f for f in quality_flags(mask, affine, rows, summary(mask, affine, zooms, rows),
                                                 zooms_mm=zooms)}
    assert flags["edge"]["slices"] == [3] and flags["edge"]["message"].endswith(": slice 3")
