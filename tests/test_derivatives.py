import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from episeg_bids.atomic import json_text, write_json_atomic
from episeg_bids.derivatives import (crash_file_path, derivative_name, parse_name, record_of, run_outputs, run_records,
                                     sidecar_of, unresolved_crashes, write_crash_file, write_nifti_atomic)
from episeg_bids.errors import InputImageError


def test_parse_name():
    assert parse_name("sub-01_ses-2_task-rest_run-01_bold.nii.gz") == (
        {"sub": "01", "ses": "2", "task": "rest", "run": "01"}, "bold")


def test_names_follow_bids_entity_order():
    outputs = run_outputs(Path("/out"),
                          "sub-01/ses-01/func/sub-01_ses-01_task-rest_acq-zs_run-01_echo-1_bold.nii.gz")
    assert outputs.mask.name == "sub-01_ses-01_task-rest_acq-zs_run-01_echo-1_space-orig_label-SC_mask.nii.gz"
    assert outputs.mean.name == "sub-01_ses-01_task-rest_acq-zs_run-01_echo-1_desc-mean_boldref.nii.gz"
    assert outputs.probseg.name.endswith("_space-orig_label-SC_probseg.nii.gz")
    assert str(outputs.folder) == "/out/sub-01/ses-01/func"


def test_source_desc_goes_after_label():
    name = derivative_name("sub-01_task-rest_desc-preproc_bold.nii.gz",
                           entities={"space": "orig", "label": "SC"}, suffix="mask", extension=".nii.gz")
    assert name == "sub-01_task-rest_space-orig_label-SC_desc-preproc_mask.nii.gz"


def test_mean_of_ds005143_style_name_keeps_rec():
    outputs = run_outputs(Path("/o"), "sub-a/func/sub-a_task-rest_rec-MoCoMean_bold.nii.gz")
    assert outputs.mask.name == "sub-a_task-rest_rec-MoCoMean_space-orig_label-SC_mask.nii.gz"


def test_json_is_stable_and_sorted(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomic({"b": 1, "a": np.int64(2)}, path)
    assert path.read_text() == json_text({"a": 2, "b": 1}) == '{\n  "a": 2,\n  "b": 1\n}\n'


def test_nifti_written_atomically_on_source_grid(tmp_path):
    affine = np.array([[-2.0, 0, 0, 10], [0, 2, 0, -5], [0, 0, 4, 3], [0, 0, 0, 1]])
    path = tmp_path / "m.nii.gz"
    write_nifti_atomic(np.eye(3, dtype=bool)[..., None].repeat(2, 2), path, affine=affine, dtype=np.uint8)
    img = nib.load(path)
    assert np.allclose(img.affine, affine) and img.get_data_dtype() == np.uint8
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert [p.name for p in tmp_path.iterdir()] == ["m.nii.gz"]   # no temporary file left


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "bad.json"
    with pytest.raises(TypeError):
        write_json_atomic({"x": object()}, path)
    assert list(tmp_path.iterdir()) == []


def test_outputs_keep_the_inputs_own_header_geometry(tmp_path):
    # an input whose pixdim (2 mm), qform (3 mm) and sform (4 mm) disagree, in NIfTI-2: the mask is
    # written with the same three, so every tool sees the grid it sees for the input
    source = nib.Nifti2Image(np.zeros((4, 5, 6), np.int16), np.diag([-4.0, 4.0, 4.0, 1.0]))
    source.set_qform(np.diag([-3.0, 3.0, 3.0, 1.0]), code=1)
    source.set_sform(np.diag([-4.0, 4.0, 4.0, 1.0]), code=2)
    source.header.set_zooms((2.0, 2.0, 2.0))
    source.header.set_xyzt_units("mm", "sec")
    path = tmp_path / "mask.nii.gz"
    write_nifti_atomic(np.ones((4, 5, 6)), path, dtype=np.uint8, geometry=source.header)
    written = nib.load(path).header
    assert written.get_zooms() == (2.0, 2.0, 2.0)
    assert np.allclose(written.get_qform(), source.header.get_qform()) and int(written["qform_code"]) == 1
    assert np.allclose(written.get_sform(), source.header.get_sform()) and int(written["sform_code"]) == 2
    assert written.get_data_dtype() == np.uint8


def test_mean_output_carries_the_repetition_time(tmp_path):
    source = nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.int16), np.diag([-2.0, 2.0, 5.0, 1.0]))
    path = tmp_path / "mean.nii.gz"
    write_nifti_atomic(np.ones((4, 5, 6, 1)), path, dtype=np.float32, geometry=source.header, tr_s=1.13)
    img = nib.load(path)
    assert img.shape == (4, 5, 6, 1) and img.header.get_zooms() == pytest.approx((2.0, 2.0, 5.0, 1.13))
    assert img.header.get_xyzt_units() == ("mm", "sec") and np.allclose(img.affine, source.affine)


@pytest.mark.parametrize("name", ["sub-01_task-rest-eyesopen_bold.nii.gz", "sub-01_task-rest'_bold.nii.gz",
                                  "sub-01\n_task-rest_bold.nii.gz", "sub-01_task-r<st_bold.nii.gz"])
def test_names_that_are_not_bids_are_an_input_error_naming_the_file(name):
    with pytest.raises(InputImageError, match="is not a BIDS file name") as caught:
        run_outputs(Path("/out"), f"sub-01/func/{name}")
    assert "\n" not in str(caught.value)


def test_output_names_longer_than_the_file_system_allows_are_refused():
    with pytest.raises(InputImageError, match="shorten its labels"):
        run_outputs(Path("/out"), f"sub-01/func/sub-01_task-{'a' * 230}_bold.nii.gz")


def test_crash_file_names_are_bounded_and_safe(tmp_path):
    long_name = "sub-01_task-" + "x" * 300 + "'<\n_bold"
    path = crash_file_path(tmp_path, "01", long_name, "20260101T000000")
    assert path.parent == tmp_path / "sub-01" / "log" and len(path.name) < 200
    assert re.fullmatch(r"crash-20260101T000000-[A-Za-z0-9._-]+\.txt", path.name)
    assert crash_file_path(tmp_path, "0'1", "x", "s").parent == tmp_path / "log"   # no odd subject folders


def test_crash_files_round_trip_and_resolve(tmp_path):
    try:
        raise InputImageError("sub-01_bold.nii.gz is 2D (64, 64); expected a 3D mean EPI or a 4D run")
    except InputImageError as err:
        crash = write_crash_file(tmp_path, subject="01", name="sub-01_bold", relpath="sub-01/func/sub-01_bold.nii.gz",
                                 path=tmp_path / "x", error=err, options={"a": 1})
    text = crash.read_text()
    assert "Traceback" in text and "options:" in text
    (found,) = unresolved_crashes(tmp_path, {})
    assert found.input == "sub-01/func/sub-01_bold.nii.gz" and found.error.startswith("sub-01_bold.nii.gz is 2D")
    assert unresolved_crashes(tmp_path, {found.input: "2999-01-01T00:00:00+00:00"}) == []   # solved later


def test_run_record_lists_what_is_missing(tmp_path):
    outputs = run_outputs(tmp_path, "sub-01/func/sub-01_task-rest_bold.nii.gz")
    outputs.folder.mkdir(parents=True)
    mean_rel = outputs.mean.relative_to(tmp_path).as_posix()
    write_json_atomic({"Input": {"Path": "sub-01/func/sub-01_task-rest_bold.nii.gz"}, "Outputs": {"mean": mean_rel},
                       "Fingerprint": "f"}, sidecar_of(outputs.mask))
    outputs.mask.write_bytes(b"")
    record = record_of(tmp_path, outputs)
    assert record.input_path == "sub-01/func/sub-01_task-rest_bold.nii.gz" and record.subject_dir == "sub-01"
    assert not record.complete and record.missing_outputs() == [mean_rel]
    outputs.mean.write_bytes(b"")
    assert record.complete and record.segmented_image(None) == outputs.mean
    sidecar_of(outputs.mask).write_text("[1, 2]")
    assert record_of(tmp_path, outputs) is None
    records, problems = run_records(tmp_path)
    assert records == [] and "is not a JSON object" in problems[0]
