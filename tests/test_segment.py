"""Segmentation exactly as SCT runs it: orientation bookkeeping and the real predictor."""

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from conftest import LEIPZIG, LEIPZIG_MASK, DEMO_MODEL
from episeg_bids.segment import from_network_output, reorientation, segment_volume, to_network_input

LAS = np.diag([-1.0, 1.0, 5.0, 1.0])


def reoriented_copy(data, affine, codes):
    """The same image stored in another voxel order (nibabel's own reorientation)."""
    ornt = ornt_transform(io_orientation(affine), axcodes2ornt(codes))
    return apply_orientation(data, ornt), affine @ inv_ornt_aff(ornt, data.shape)


def test_network_input_of_las_image():
    data = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    array, spacing = to_network_input(data, (1.0, 1.0, 5.0), reorientation(LAS))
    # LAS -> RAS flips x, then (x, y, z) -> (z, y, x)
    assert np.array_equal(array[0], np.flip(data, 0).transpose(2, 1, 0))
    assert spacing == (5.0, 1.0, 1.0) and array.dtype == np.float32


@pytest.mark.parametrize("codes", ["LAS", "RAS", "PIR", "SRA", "ILP"])
def test_network_input_is_independent_of_storage_order(codes):
    data = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(float)
    zooms = (1.0, 2.0, 5.0)
    reference, ref_spacing = to_network_input(data, zooms, reorientation(np.diag([1.0, 2.0, 5.0, 1.0])))
    other, affine = reoriented_copy(data, np.diag([1.0, 2.0, 5.0, 1.0]), codes)
    other_zooms = tuple(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))
    array, spacing = to_network_input(other, other_zooms, reorientation(affine))
    assert np.array_equal(array, reference) and np.allclose(spacing, ref_spacing)
    # and back onto the stored grid
    assert np.array_equal(from_network_output(array[0], reorientation(affine)), other)


def sct_reference(predictor, img):
    """Independent re-statement of REFERENCE §2 steps 2-5 with nibabel's canonical reorientation."""
    canonical = nib.as_closest_canonical(img)
    data = canonical.get_fdata(dtype=np.float32)
    array = data.transpose(2, 1, 0)[None].astype(np.float32)
    spacing = [float(z) for z in canonical.header.get_zooms()[:3]][::-1]
    labels = predictor.predict_single_npy_array(array, {"spacing": spacing})
    seg = nib.Nifti1Image(np.asarray(labels).transpose(2, 1, 0).astype(np.uint8), canonical.affine)
    ornt = ornt_transform(io_orientation(canonical.affine), io_orientation(img.affine))
    return np.asarray(apply_orientation(seg.get_fdata(), ornt)).astype(np.uint8)


@pytest.fixture(scope="module")
def sct_predictor():
    """nnunetv2's own loader, with SCT's arguments, independent of episeg_bids.model."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from episeg_bids.model import find_trainer_folder

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(find_trainer_folder(DEMO_MODEL)), use_folds="all",
                                                   checkpoint_name="checkpoint_final.pth")
    return predictor


@pytest.mark.parametrize("codes", ["LAS", "RAS", "PIR"])
def test_mask_equals_direct_nnunet_call_on_any_storage_order(predictor, sct_predictor, codes):
    img = nib.load(LEIPZIG)
    data, affine = reoriented_copy(img.get_fdata(dtype=np.float32), img.affine, codes)
    stored = nib.Nifti1Image(data, affine)
    zooms = tuple(float(z) for z in stored.header.get_zooms()[:3])
    ours = segment_volume(predictor, data, affine, zooms).mask
    assert ours.shape == data.shape and ours.dtype == np.uint8
    assert np.array_equal(ours, sct_reference(sct_predictor, stored))
    assert ours.sum() > 100


@pytest.fixture(scope="module")
def leipzig_segmentations(predictor):
    """The Leipzig mean segmented without and with the probabilities (two real predictions)."""
    img = nib.load(LEIPZIG)
    args = (img.get_fdata(dtype=np.float32), img.affine, img.header.get_zooms()[:3])
    return segment_volume(predictor, *args), segment_volume(predictor, *args, probabilities=True)


def test_probability_agrees_with_mask(leipzig_segmentations):
    _, seg = leipzig_segmentations
    p = seg.foreground_probability
    assert p.shape == seg.mask.shape and p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
    # argmax of a two-class softmax is p > 0.5 (ties aside)
    assert np.mean((p > 0.5) == (seg.mask > 0)) > 0.999


def test_asking_for_probabilities_does_not_change_the_mask(leipzig_segmentations):
    # nnunetv2 takes the argmax of the logits without probabilities, of the softmax with them
    plain, with_probabilities = leipzig_segmentations
    assert plain.foreground_probability is None
    assert np.array_equal(plain.mask, with_probabilities.mask)


def test_demo_model_finds_the_cord_on_leipzig(leipzig_segmentations):
    mask = leipzig_segmentations[0].mask
    truth = np.asarray(nib.load(LEIPZIG_MASK).dataobj) > 0
    dice = 2 * np.sum(mask.astype(bool) & truth) / (mask.sum() + truth.sum())
    assert dice > 0.8
