"""episeg_bids.epi: header checks before any read, one-pass temporal mean, dtype coverage.

Every image is a real NIfTI file written by nibabel (or, for headers nibabel refuses to write, its
header bytes followed by the data), or one of the real EPI images in tests/data. References are
computed the plain way: ``np.asanyarray(img.dataobj).astype(float64)`` and a NaN-aware mean.
"""

import gzip
import math

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from conftest import DATA, LEIPZIG, SCT_RUN
from episeg_bids.epi import (BLOCK_BYTES, MAX_IMAGE_BYTES, _data_errors, check_geometry, image_kind,
                             load_image, mean_volume, read_volume)
from episeg_bids.errors import InputImageError

LAS = np.diag([-2.0, 2.0, 4.0, 1.0])
RAS = np.diag([2.0, 2.0, 4.0, 1.0])


def save(tmp_path, data, name="x_bold.nii.gz", affine=None, slope=None, inter=10.0, endian="<"):
    """Write ``data`` with nibabel; ``slope`` stores the raw values with that scaling."""
    header = nib.Nifti1Header(endianness=endian)
    header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, LAS if affine is None else affine, header)
    img.header.set_xyzt_units("mm", "sec")
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    path = tmp_path / name
    nib.save(img, path)
    return path


def save_raw(tmp_path, header, data, name="x_bold.nii.gz"):
    """Write ``header`` exactly as given (nibabel would rewrite an inconsistent one), then ``data``."""
    header = header.copy()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    header["vox_offset"] = 352
    payload = header.binaryblock + b"\0" * 4 + data.astype(header.get_data_dtype()).tobytes(order="F")
    path = tmp_path / name
    path.write_bytes(gzip.compress(payload, 1) if name.endswith(".gz") else payload)
    return path


def header_with(affine=LAS, *, sform_code=1, qform_code=1, units=("mm", "sec")):
    header = nib.Nifti1Header()
    header.set_data_shape((8, 8, 6))
    header.set_qform(affine, code=qform_code)
    header.set_sform(affine, code=sform_code)
    header.set_xyzt_units(*units)
    return header


def reference_mean(path):
    """NaN-aware float64 temporal mean of nibabel's own scaled read, 0 where no finite sample."""
    raw = np.asanyarray(nib.load(path).dataobj).astype(np.float64)
    raw = raw.reshape(raw.shape[:4])
    finite = np.isfinite(raw)
    counts = finite.sum(axis=3)
    total = np.where(finite, raw, 0).sum(axis=3)
    return np.divide(total, counts, out=np.zeros_like(total), where=counts > 0), int((~finite).sum())


def sct_rounded(value):
    """SCT's ``get_dimension``: a float32 pixdim rounded to its own precision."""
    stored = np.float32(value)
    return round(float(stored), -int(np.floor(np.log10(abs(np.spacing(stored))))) - 1)


def sct_spacing(path):
    """Spacing ``sct_deepseg`` gives the network, on the input's X, Y, Z, following SCT's steps.

    ``Image``: ``get_best_affine`` with quaternion threshold -1e-6; ``change_orientation('LPI')``
    (RAS+) unless already there: ``set_qform``/``set_sform`` of the reoriented affine (which
    rewrites pixdim); spacing = ``dim[4:7]`` (``get_zooms`` rounded).
    """
    header = nib.load(path).header.copy()
    header.quaternion_threshold = -1e-6
    best = header.get_best_affine()
    ornt = ornt_transform(io_orientation(best), axcodes2ornt("RAS"))
    if nib.aff2axcodes(best) != ("R", "A", "S"):
        moved = best @ inv_ornt_aff(ornt, header.get_data_shape()[:3])
        header.set_qform(moved)
        header.set_sform(moved)
    ras = [sct_rounded(z) for z in header.get_zooms()[:3]]
    return tuple(ras[int(ornt[axis, 0])] for axis in range(3))


# --- the temporal mean -----------------------------------------------------------------------

def test_mean_volume_matches_numpy_in_small_blocks(tmp_path):
    data = np.arange(2 * 3 * 4 * 7, dtype=np.int16).reshape(2, 3, 4, 7)
    img = nib.load(save(tmp_path, data))
    mean, nonfinite = mean_volume(img, block_bytes=2 * 3 * 4 * 2 * 2)  # two int16 volumes per block
    assert mean.dtype == np.float32 and mean.shape == (2, 3, 4)
    assert np.array_equal(mean, data.mean(axis=3).astype(np.float32)) and nonfinite == 0


def test_mean_volume_applies_scaling(tmp_path):
    data = np.arange(24 * 3, dtype=np.int16).reshape(2, 3, 4, 3)
    img = nib.load(save(tmp_path, data, slope=0.5))
    mean, _ = mean_volume(img)
    assert np.allclose(mean, data.mean(axis=3) * 0.5 + 10.0)


@pytest.mark.parametrize("slope", [0.0, np.nan])
def test_slope_zero_or_nan_means_unscaled_as_in_nibabel(tmp_path, slope):
    data = np.arange(24 * 3, dtype=np.int16).reshape(2, 3, 4, 3)
    header = nib.Nifti1Header()
    header["scl_slope"], header["scl_inter"] = slope, 7.0
    path = save_raw(tmp_path, header, data)
    assert np.array_equal(mean_volume(nib.load(path))[0], reference_mean(path)[0].astype(np.float32))
    assert np.array_equal(mean_volume(nib.load(path))[0], data.mean(axis=3).astype(np.float32))


def test_mean_volume_skips_nan_and_inf(tmp_path):
    data = np.ones((2, 2, 2, 4), np.float32)
    data[0, 0, 0, 0] = np.nan
    data[0, 0, 0, 1] = 5.0
    data[1, 1, 1, :] = np.inf       # no finite sample at all -> 0
    mean, nonfinite = mean_volume(nib.load(save(tmp_path, data)), block_bytes=16)
    assert nonfinite == 5
    assert mean[0, 0, 0] == pytest.approx((5 + 1 + 1) / 3)
    assert mean[1, 1, 1] == 0


def test_mean_of_an_in_memory_image():
    data = np.arange(3 * 4 * 5 * 6, dtype=np.float64).reshape(3, 4, 5, 6)
    mean, nonfinite = mean_volume(nib.Nifti1Image(data, LAS), block_bytes=3 * 4 * 5 * 8)
    assert np.array_equal(mean, data.mean(axis=3).astype(np.float32)) and nonfinite == 0


DTYPES = {  # name: (on-disk dtype, slope, byte order)
    "int16": (np.int16, None, "<"), "uint16": (np.uint16, None, "<"), "int32": (np.int32, None, "<"),
    "uint8": (np.uint8, None, "<"), "int8": (np.int8, None, "<"), "float32": (np.float32, None, "<"),
    "float64": (np.float64, None, "<"), "scaled-int16": (np.int16, 0.37, "<"),
    "bigendian-int16": (np.int16, None, ">"), "bigendian-float32": (np.float32, None, ">"),
    "bigendian-scaled-uint16": (np.uint16, 2.5, ">"),
}
CASES = [(dt, ext, bad) for dt in DTYPES for ext in (".nii", ".nii.gz")
         for bad in ((False, True) if np.dtype(DTYPES[dt][0]).kind == "f" else (False,))]


def make_run(dtype, nonfinite, shape=(5, 6, 7, 23), seed=0):
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    low, high = (info.min, info.max) if info else (-5000.0, 5000.0)
    data = rng.uniform(low, high, size=shape).astype(dtype)
    if nonfinite:
        data[0, 0, 0, 3] = np.nan
        data[1, 2, 3, ::2] = np.inf
        data[4, 5, 6, :] = -np.inf        # no finite sample: mean 0
        data[2, 2, 2, 5:9] = np.nan
    return data


@pytest.mark.parametrize("dtype_name, ext, nonfinite", CASES)
def test_run_mean_and_volumes_for_every_dtype(tmp_path, dtype_name, ext, nonfinite):
    dtype, slope, endian = DTYPES[dtype_name]
    data = make_run(dtype, nonfinite)
    path = save(tmp_path, data, name="run_bold" + ext, slope=slope, inter=-3.25, endian=endian)
    img = nib.load(path)
    assert img.dataobj.dtype == np.dtype(dtype).newbyteorder(endian)
    assert (img.dataobj.slope, img.dataobj.inter) == ((1.0, 0.0) if slope is None else (np.float32(slope), -3.25))
    volume_bytes = 5 * 6 * 7 * np.dtype(dtype).itemsize
    expected, n_bad = reference_mean(path)

    mean, count = mean_volume(img, block_bytes=3 * volume_bytes)         # 8 blocks of 3 volumes
    assert count == n_bad and (n_bad > 0) == nonfinite
    np.testing.assert_allclose(mean, expected, rtol=2e-7, atol=1e-30)  # float32 rounding of the float64 mean
    if np.dtype(dtype).kind in "iu" and slope is None:  # integer sums are exact in float64: identical
        assert np.array_equal(mean, expected.astype(np.float32))

    vol = read_volume(path, keep_volumes=True, block_bytes=2 * volume_bytes)
    assert np.array_equal(vol.data, mean) and vol.nonfinite == n_bad and vol.n_volumes == 23
    scaled = np.asanyarray(img.dataobj).astype(np.float64).astype(np.float32)  # nibabel's values, as float32
    assert vol.volumes.shape == data.shape and vol.volumes.dtype == np.float32 and vol.volumes.flags.writeable
    assert np.array_equal(vol.volumes, np.where(np.isfinite(scaled), scaled, 0))
    if nonfinite:
        assert np.array_equal(vol.finite, np.isfinite(scaled))
    else:
        assert vol.finite is None


@pytest.mark.parametrize("dtype_name, ext, nonfinite", CASES)
def test_3d_image_for_every_dtype(tmp_path, dtype_name, ext, nonfinite):
    dtype, slope, endian = DTYPES[dtype_name]
    data = make_run(dtype, nonfinite, shape=(5, 6, 7, 10))[..., 3]
    path = save(tmp_path, data, name="mean_bold" + ext, slope=slope, endian=endian)
    expected = nib.load(path).get_fdata(dtype=np.float32)  # nibabel's own float32 read
    vol = read_volume(path, keep_volumes=True, block_bytes=37)  # odd block: chunks split volumes anywhere
    assert not vol.is_mean_of_run and vol.volumes is None and vol.finite is None
    assert vol.data.shape == (5, 6, 7) and vol.data.dtype == np.float32 and vol.data.flags.writeable
    assert np.array_equal(vol.data, np.where(np.isfinite(expected), expected, 0))
    assert vol.nonfinite == int((~np.isfinite(expected)).sum())


def test_trailing_singleton_fifth_axis(tmp_path):
    data = make_run(np.int16, False, shape=(4, 5, 6, 9, 1))
    path = save(tmp_path, data)
    vol = read_volume(path, keep_volumes=True, block_bytes=4 * 5 * 6 * 2 * 2)
    assert vol.is_mean_of_run and vol.n_volumes == 9 and vol.data.shape == (4, 5, 6)
    assert np.array_equal(vol.data, data[..., 0].astype(np.float64).mean(axis=3).astype(np.float32))
    assert np.array_equal(vol.volumes, data[..., 0].astype(np.float32))


@pytest.fixture(scope="module")
def real_size_float32_run(tmp_path_factory):
    """128×128×24×40 float32 .nii.gz (63 MB of data, 8 blocks of 8 MiB), from the real Leipzig
    mean with noise, as motion correction in SCT or FSL writes it; a few NaN samples."""
    base = nib.load(LEIPZIG)
    mean = base.get_fdata(dtype=np.float32)
    rng = np.random.default_rng(1)
    run = mean[..., None] * rng.normal(1.0, 0.02, size=(1, 1, 1, 40)).astype(np.float32)
    run += rng.normal(0, 5, size=run.shape).astype(np.float32)
    run[60, 60, 10, 7] = np.nan
    run[0, 0, 0, :] = np.nan
    path = tmp_path_factory.mktemp("real") / "sub-01_task-rest_desc-moco_bold.nii.gz"
    nib.save(nib.Nifti1Image(run, base.affine, base.header), path)
    assert run.nbytes > 3 * BLOCK_BYTES
    return path


def test_real_size_float32_run_larger_than_a_block_is_read(real_size_float32_run):
    # Regression (issue 10 point 5): nibabel hands back read-only float32 blocks; writing NaN
    # replacements into them failed as "truncated or corrupt".
    vol = read_volume(real_size_float32_run, keep_volumes=True)
    expected, n_bad = reference_mean(real_size_float32_run)
    assert vol.nonfinite == n_bad == 41 and vol.data[0, 0, 0] == 0
    np.testing.assert_allclose(vol.data, expected, rtol=3e-7, atol=1e-4)
    assert vol.volumes.shape == (128, 128, 24, 40) and vol.finite.sum() == vol.finite.size - 41
    assert vol.volumes[60, 60, 10, 7] == 0 and vol.volumes.flags.writeable and vol.data.flags.writeable


def test_real_4d_run_mean():
    vol = read_volume(SCT_RUN)
    raw = np.asanyarray(nib.load(SCT_RUN).dataobj).astype(np.float64)
    assert vol.is_mean_of_run and vol.n_volumes == 30 and vol.data.shape == (68, 68, 6)
    assert np.array_equal(vol.data, raw.mean(axis=3).astype(np.float32))
    assert vol.repetition_time_s == 1.13 and vol.flags == []
    assert vol.volumes is None and vol.finite is None


def test_real_3d_mean_used_as_is():
    vol = read_volume(LEIPZIG)
    assert not vol.is_mean_of_run and vol.n_volumes == 1 and vol.repetition_time_s is None
    assert np.array_equal(vol.data, nib.load(LEIPZIG).get_fdata(dtype=np.float32))


HELDOUT_RUN = DATA / "heldout_sct_example_data_r20161128" / "fmri" / "fmri.nii.gz"


@pytest.mark.parametrize("path", [SCT_RUN, LEIPZIG, HELDOUT_RUN])
def test_real_images_geometry_is_sct_s(path):
    vol = read_volume(path)
    img = nib.load(path)
    assert vol.zooms_mm == sct_spacing(path)
    assert np.array_equal(vol.affine, img.affine) and vol.flags == []
    assert any("oblique affine" in note for note in vol.notes)  # these real images are oblique
    assert vol.header is not img.header and vol.header.binaryblock == img.header.binaryblock


def test_nan_in_3d_input_noted(tmp_path):
    data = np.ones((3, 3, 3), np.float32)
    data[1, 1, 1] = np.nan
    vol = read_volume(save(tmp_path, data))
    assert vol.nonfinite == 1 and vol.data[1, 1, 1] == 0 and any("NaN" in n for n in vol.notes)


# --- shapes and damaged files ----------------------------------------------------------------

@pytest.mark.parametrize("shape, kind", [((4, 4, 4, 9), "run"), ((4, 4, 4), "mean"), ((4, 4, 4, 1), "mean"),
                                          ((4, 4, 4, 1, 1), "mean")])
def test_image_kind(tmp_path, shape, kind):
    assert image_kind(tmp_path / "a.nii", shape) == kind


def test_2d_image_is_refused_with_its_name(tmp_path):
    path = save(tmp_path, np.zeros((64, 64), np.int16), name="sub-01_task-rest_bold.nii.gz")
    with pytest.raises(InputImageError, match=r"sub-01_task-rest_bold.nii.gz is 2D \(64, 64\)"):
        read_volume(path)


def test_not_nifti_is_refused(tmp_path):
    path = tmp_path / "sub-01_task-rest_bold.mgz"
    nib.save(nib.MGHImage(np.zeros((4, 4, 4), np.float32), np.eye(4)), path)
    with pytest.raises(InputImageError, match="sub-01_task-rest_bold.mgz is a MGHImage, not NIfTI"):
        load_image(path)


@pytest.mark.parametrize("name", ["sub-02_task-rest_bold.nii.gz", "sub-02_task-rest_bold.nii"])
def test_truncated_file_is_refused_with_its_name(tmp_path, name):
    source = save(tmp_path, make_run(np.int16, False, shape=(20, 20, 10, 30)), name="whole" + name[-7:])
    whole = source.read_bytes()
    path = tmp_path / name
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputImageError, match=f"{name}: the image data cannot be read .*truncated or corrupt, "
                                              "re-copy or re-export it"):
        read_volume(path, block_bytes=20 * 20 * 10 * 2)


def test_truncated_real_run_is_refused(tmp_path):
    whole = SCT_RUN.read_bytes()
    path = tmp_path / "sub-02_task-rest_bold.nii.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputImageError, match="sub-02_task-rest_bold.nii.gz.*truncated"):
        read_volume(path)


def test_corrupt_compressed_data_is_refused(tmp_path):
    source = save(tmp_path, make_run(np.int16, False, shape=(20, 20, 10, 30)), name="whole.nii.gz")
    damaged = bytearray(source.read_bytes())
    damaged[len(damaged) // 2: len(damaged) // 2 + 64] = bytes(range(64))
    path = tmp_path / "sub-03_task-rest_bold.nii.gz"
    path.write_bytes(bytes(damaged))
    with pytest.raises(InputImageError, match="sub-03_task-rest_bold.nii.gz: .*corrupt"):
        read_volume(path)


def test_bytes_after_the_gzip_stream_are_tolerated(tmp_path):
    data = make_run(np.int16, False, shape=(6, 6, 4, 5))
    path = save(tmp_path, data)
    path.write_bytes(path.read_bytes() + b"\0" * 16)
    assert np.array_equal(read_volume(path).data, data.mean(axis=3).astype(np.float32))


def test_only_data_errors_blame_the_file():
    for damage in (EOFError("short"), OSError("Expected 10 bytes"), gzip.BadGzipFile("bad")):
        with pytest.raises(InputImageError, match="x.nii.gz: the image data cannot be read"):
            with _data_errors("x.nii.gz"):
                raise damage
    for ours in (ValueError("assignment destination is read-only"), MemoryError(), TypeError("bug")):
        with pytest.raises(type(ours)):
            with _data_errors("x.nii.gz"):
                raise ours


# --- geometry, from the header before any data ------------------------------------------------

def test_geometry_is_checked_before_the_data_is_read(tmp_path):
    # 50 mm voxels and no data at all after the header: the geometry error comes first.
    header = header_with(np.diag([-50.0, 50.0, 50.0, 1.0]))
    path = tmp_path / "sub-04_task-rest_bold.nii"
    header.set_data_shape((64, 64, 20, 10))
    path.write_bytes(header.binaryblock + b"\0" * 4)
    with pytest.raises(InputImageError, match=r"sub-04_task-rest_bold.nii: voxel size \(50, 50, 50\) mm .*"
                                              r"outside the plausible EPI range 0.1-25 mm"):
        read_volume(path)


@pytest.mark.parametrize("zooms, units, match", [
    ((1000.0, 1000.0, 1000.0), "mm", r"voxel size \(1000, 1000, 1000\) mm"),
    ((2.0, 2.0, 4.0), "micron", r"voxel size \(0.002, 0.002, 0.004\) mm"),
    ((24.0, 24.0, 24.0), "mm", r"field of view \(768, 768, 576\) mm"),
])
def test_implausible_voxel_size_or_field_of_view_is_refused(tmp_path, zooms, units, match):
    header = header_with(np.diag([-zooms[0], zooms[1], zooms[2], 1.0]), units=(units, "sec"))
    path = save_raw(tmp_path, header, np.zeros((32, 32, 24), np.int16), name="sub-05_bold.nii.gz")
    with pytest.raises(InputImageError, match="sub-05_bold.nii.gz: " + match):
        read_volume(path)


def test_header_in_metres_is_converted_and_flagged(tmp_path):
    header = header_with(np.diag([-0.002, 0.002, 0.004, 1.0]), units=("meter", "sec"))
    vol = read_volume(save_raw(tmp_path, header, np.ones((8, 8, 6), np.float32)))
    assert vol.zooms_mm == (2.0, 2.0, 4.0)
    assert np.allclose(np.diag(vol.affine), [-2, 2, 4, 1])
    assert [f["code"] for f in vol.flags] == ["geometry"] and "'meter'" in vol.flags[0]["message"]


def test_unknown_spatial_unit_is_mm_with_a_note(tmp_path):
    vol = read_volume(save_raw(tmp_path, header_with(units=("unknown", "unknown")), np.ones((8, 8, 6), np.int16)))
    assert vol.zooms_mm == (2.0, 2.0, 4.0) and vol.flags == []
    assert any("millimetres assumed" in note for note in vol.notes)


def test_size_limit_from_the_header_alone(tmp_path):
    # A header claiming 30000^3 int16 followed by a few bytes: refused without allocating (reading
    # it would need 98 TiB: the float32 volume).
    header = header_with(np.diag([-0.01, 0.01, 0.01, 1.0]))
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.int16)
    path = tmp_path / "sub-06_task-rest_bold.nii.gz"
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 100))
    with pytest.raises(InputImageError, match=r"sub-06_task-rest_bold.nii.gz: the header claims a \(30000, 30000, "
                                              r"30000\) int16 image, 100582.\d+ GB to read, above the limit of "
                                              r"8.00 GB; .*raise the limit with --max-image-gb"):
        read_volume(path)
    assert MAX_IMAGE_BYTES == 8 * 2**30


def test_size_limit_counts_the_kept_volumes(tmp_path):
    path = save(tmp_path, np.zeros((16, 16, 8, 10), np.int16))        # 40 KiB of int16 data
    assert read_volume(path, max_bytes=50_000).n_volumes == 10
    with pytest.raises(InputImageError, match=r"0.00 GB to read.*--max-image-gb"):
        read_volume(path, max_bytes=50_000, keep_volumes=True)      # + float32 copy and mask: 100 KiB


def test_complex_data_is_refused(tmp_path):
    path = save(tmp_path, np.ones((4, 4, 4, 3), np.complex64), name="sub-09_bold.nii.gz")
    with pytest.raises(InputImageError, match=r"sub-09_bold.nii.gz: the image's datatype is complex64; expected "
                                              "real-valued"):
        read_volume(path)


@pytest.mark.parametrize("shape", [(8, 0, 6), (8, -5, 6)])
def test_empty_dimension_is_refused(tmp_path, shape):
    header = header_with()
    header.set_data_shape((8, 8, 6))
    header["dim"][2] = shape[1]
    path = tmp_path / "sub-07_bold.nii"
    path.write_bytes(header.binaryblock + b"\0" * 4)
    with pytest.raises(InputImageError, match=r"sub-07_bold.nii: the header's image shape .* empty or negative"):
        check_geometry(path, nib.load(path))


@pytest.mark.parametrize("matrix", [np.zeros((4, 4)), np.array([[2.0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 4, 0],
                                                                  [0, 0, 0, 1]])])
def test_singular_sform_is_refused(tmp_path, matrix):
    header = header_with()
    header.set_sform(matrix, code=1)
    path = save_raw(tmp_path, header, np.ones((8, 8, 6), np.int16), name="sub-08_bold.nii.gz")
    with pytest.raises(InputImageError,
                       match=r"sub-08_bold.nii.gz: the sform is singular .*fslorient -copyqform2sform"):
        read_volume(path)


def test_nan_sform_is_refused(tmp_path):
    header = header_with()
    matrix = LAS.copy()
    matrix[0, 3] = np.nan
    header.set_sform(matrix, code=1)
    with pytest.raises(InputImageError, match=r"the sform has non-finite values"):
        read_volume(save_raw(tmp_path, header, np.ones((8, 8, 6), np.int16)))


def flagged(vol):
    return [f["message"] for f in vol.flags if f["code"] == "geometry"]


def test_pixdim_z_zero_on_las_uses_the_sform_as_sct(tmp_path):
    # pixdim z = 0 while the sform says 8 mm: SCT reorients this LAS image and so reads 8 mm.
    affine = np.diag([-2.0, 2.0, 8.0, 1.0])
    header = header_with(affine, qform_code=0)
    header["pixdim"][3] = 0
    path = save_raw(tmp_path, header, np.ones((8, 8, 6), np.int16))
    vol = read_volume(path)
    assert vol.zooms_mm == (2.0, 2.0, 8.0) == sct_spacing(path)
    assert len(flagged(vol)) == 1 and "(2, 2, 0) mm differs from the sform's (2, 2, 8) mm" in flagged(vol)[0]
    assert flagged(vol)[0] in vol.notes and vol.flags[0]["slices"] == []


@pytest.mark.parametrize("bad", [0.0, np.nan])
def test_unusable_pixdim_on_ras_uses_the_sform(tmp_path, bad):
    # SCT does not reorient a RAS+ image and would read pixdim (0 or NaN) and fail: the sform's is used.
    header = header_with(RAS, qform_code=0)
    header["pixdim"][1] = bad
    vol = read_volume(save_raw(tmp_path, header, np.ones((8, 8, 6), np.int16)))
    assert vol.zooms_mm == (2.0, 2.0, 4.0)
    assert "pixdim is not usable and the sform's is used" in flagged(vol)[0]


def test_pixdim_differing_from_the_sform(tmp_path):
    # LAS: SCT's reorientation rewrites pixdim from the sform, so the sform's size is used.
    header = header_with(np.diag([-2.0, 2.0, 8.0, 1.0]), qform_code=0)
    header["pixdim"][1:4] = (1.0, 1.0, 5.0)
    path = save_raw(tmp_path, header, np.ones((8, 8, 6), np.int16))
    vol = read_volume(path)
    assert vol.zooms_mm == (2.0, 2.0, 8.0) == sct_spacing(path)
    assert "segmented and measured at (2, 2, 8) mm" in flagged(vol)[0]
    # RAS: SCT does not reorient and reads pixdim itself.
    header = header_with(np.diag([2.0, 2.0, 8.0, 1.0]), qform_code=0)
    header["pixdim"][1:4] = (1.0, 1.0, 5.0)
    path = save_raw(tmp_path, header, np.ones((8, 8, 6), np.int16), name="ras_bold.nii.gz")
    vol = read_volume(path)
    assert vol.zooms_mm == (1.0, 1.0, 5.0) == sct_spacing(path)
    assert "pixdim used, as SCT does for an image already in RAS+" in flagged(vol)[0]


@pytest.mark.parametrize("axcodes", [("L", "A", "S"), ("R", "A", "S"), ("P", "I", "R"), ("S", "L", "P")])
def test_spacing_equals_sct_s_for_any_storage_order(tmp_path, axcodes):
    ornt = axcodes2ornt(axcodes)
    affine = np.eye(4)
    for axis, (world, flip) in enumerate(ornt):
        affine[int(world), axis] = flip * (0.9558824, 1.1, 16.800001)[axis]
    rotation = nib.eulerangles.euler2mat(0.03, -0.05, 0.02)  # oblique by a few degrees, as real data
    affine[:3, :3] = rotation @ affine[:3, :3]
    path = save(tmp_path, np.ones((8, 9, 5, 6), np.int16), affine=affine)
    vol = read_volume(path)
    assert vol.zooms_mm == sct_spacing(path)
    assert np.array_equal(vol.affine, nib.load(path).affine)


def test_qform_differing_from_the_sform_is_flagged(tmp_path):
    header = header_with(LAS)
    shifted = LAS.copy()
    shifted[:3, 3] = (30.0, 0, 0)
    header.set_qform(shifted, code=1)
    vol = read_volume(save_raw(tmp_path, header, np.ones((8, 8, 6), np.int16)))
    assert np.array_equal(vol.affine, LAS)
    assert "the qform differs from the sform by up to 30 mm" in flagged(vol)[0]


def test_no_sform_nor_qform_uses_pixdim(tmp_path):
    header = header_with(LAS, sform_code=0, qform_code=0)
    path = save_raw(tmp_path, header, np.ones((8, 8, 6), np.int16))
    vol = read_volume(path)
    assert vol.zooms_mm == (2.0, 2.0, 4.0) and np.array_equal(vol.affine, nib.load(path).affine)


def test_header_copy_keeps_the_input_geometry(tmp_path):
    header = header_with(LAS, qform_code=2)
    header["pixdim"][3] = 0
    path = save_raw(tmp_path, header, np.ones((8, 8, 6), np.int16))
    vol = read_volume(path)
    assert vol.header.binaryblock == nib.load(path).header.binaryblock  # as nibabel reads it: pixdim 0 -> 1
    assert int(vol.header["qform_code"]) == 2 and int(vol.header["sform_code"]) == 1
    vol.header["pixdim"][3] = 9
    assert nib.load(path).header["pixdim"][3] == 1
    assert vol.zooms_mm == (2.0, 2.0, 4.0) and "(2, 2, 0) mm differs from the sform's" in flagged(vol)[0]


# --- repetition time ---------------------------------------------------------------------------

@pytest.mark.parametrize("tr, unit, expected, flag", [
    (1.13, "sec", 1.13, None), (2000.0, "msec", 2.0, None), (2.0, "unknown", 2.0, None),
    (2000.0, "sec", None, "milliseconds stored as seconds"), (2.0, "msec", None, "seconds stored as milliseconds"),
    (0.0, "sec", None, None), (500.0, "msec", 0.5, None),
])
def test_repetition_time(tmp_path, tr, unit, expected, flag):
    header = header_with(units=("mm", unit))
    header.set_data_shape((8, 8, 6, 3))
    header["pixdim"][4] = tr
    vol = read_volume(save_raw(tmp_path, header, np.ones((8, 8, 6, 3), np.int16)))
    assert vol.repetition_time_s == expected
    timing = [f["message"] for f in vol.flags if f["code"] == "timing"]
    assert (flag in timing[0]) if flag else not timing
    assert ("taken as seconds" in " ".join(vol.notes)) == (unit == "unknown")


def test_read_volume_accepts_a_limit_per_call(tmp_path):
    path = save(tmp_path, np.zeros((16, 16, 8, 10), np.int16))
    with pytest.raises(InputImageError, match="--max-image-gb"):
        read_volume(path, max_bytes=1000)
    assert math.isclose(read_volume(path).zooms_mm[2], 4.0)
