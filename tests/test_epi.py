
import nibabel as nib
import numpy as np
import pytest

from conftest import LEIPZIG, SCT_RUN
from episeg_bids.epi import image_kind, mean_volume, read_volume
from episeg_bids.errors import InputImageError


def save(tmp_path, data, name="x_bold.nii.gz", affine=None, slope=None):
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 4.0, 1.0]) if affine is None else affine)
    if slope is not None:
        img.header.set_slope_inter(slope, 10.0)
    path = tmp_path / name
    nib.save(img, path)
    return path


def test_mean_volume_matches_numpy_in_small_blocks(tmp_path):
    data = np.arange(2 * 3 * 4 * 7, dtype=np.int16).reshape(2, 3, 4, 7)
    img = nib.load(save(tmp_path, data))
    mean, nonfinite = mean_volume(img, block_bytes=2 * 3 * 4 * 4 * 2)  # two volumes per block
    assert mean.dtype == np.float32 and mean.shape == (2, 3, 4)
    assert np.allclose(mean, data.mean(axis=3)) and nonfinite == 0


def test_mean_volume_applies_scaling(tmp_path):
    data = np.arange(24 * 3, dtype=np.int16).reshape(2, 3, 4, 3)
    img = nib.load(save(tmp_path, data, slope=0.5))
    mean, _ = mean_volume(img)
    assert np.allclose(mean, data.mean(axis=3) * 0.5 + 10.0)


def test_mean_volume_skips_nan_and_inf(tmp_path):
    data = np.ones((2, 2, 2, 4), np.float32)
    data[0, 0, 0, 0] = np.nan
    data[0, 0, 0, 1] = 5.0
    data[1, 1, 1, :] = np.inf       # no finite sample at all -> 0
    mean, nonfinite = mean_volume(nib.load(save(tmp_path, data)))
    assert nonfinite == 5
    assert mean[0, 0, 0] == pytest.approx((5 + 1 + 1) / 3)
    assert mean[1, 1, 1] == 0


def test_real_4d_run_mean(tmp_path):
    vol = read_volume(SCT_RUN)
    raw = np.asanyarray(nib.load(SCT_RUN).dataobj).astype(np.float64)
    assert vol.is_mean_of_run and vol.n_volumes == 30 and vol.data.shape == (68, 68, 6)
    assert np.allclose(vol.data, raw.mean(axis=3), atol=1e-3)
    assert vol.repetition_time_s == pytest.approx(1.13, abs=1e-3)


def test_real_3d_mean_used_as_is():
    vol = read_volume(LEIPZIG)
    assert not vol.is_mean_of_run and vol.n_volumes == 1
    assert np.array_equal(vol.data, nib.load(LEIPZIG).get_fdata(dtype=np.float32))


@pytest.mark.parametrize("shape, kind", [((4, 4, 4, 9), "run"), ((4, 4, 4), "mean"), ((4, 4, 4, 1), "mean"),
                                          ((4, 4, 4, 1, 1), "mean")])
def test_image_kind(tmp_path, shape, kind):
    assert image_kind(tmp_path / "a.nii", shape) == kind


def test_2d_image_is_refused_with_its_name(tmp_path):
    path = save(tmp_path, np.zeros((64, 64), np.int16), name="sub-01_task-rest_bold.nii.gz")
    with pytest.raises(InputImageError, match=r"sub-01_task-rest_bold.nii.gz is 2D \(64, 64\)"):
        read_volume(path)


def test_truncated_file_is_refused_with_its_name(tmp_path):
    whole = SCT_RUN.read_bytes()
    path = tmp_path / "sub-02_task-rest_bold.nii.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputImageError, match="sub-02_task-rest_bold.nii.gz.*truncated"):
        read_volume(path)


def test_nan_in_3d_input_noted(tmp_path):
    data = np.ones((3, 3, 3), np.float32)
    data[1, 1, 1] = np.nan
    vol = read_volume(save(tmp_path, data))
    assert vol.nonfinite == 1 and vol.data[1, 1, 1] == 0 and any("NaN" in n for n in vol.notes)
