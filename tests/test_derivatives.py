from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from episeg_bids.derivatives import (derivative_name, json_text, parse_name, run_outputs,
                                     write_json_atomic, write_nifti_atomic)


def test_parse_name():
    assert parse_name("sub-01_ses-2_task-rest_run-01_bold.nii.gz") == (
        {"sub": "01", "ses": "2", "task": "rest", "run": "01"}, "bold")


def test_names_follow_bids_entity_order():
    outputs = run_outputs(Path("/out"),
                          "sub-01/ses-01/func/sub-01_ses-01_task-rest_acq-zs_run-01_echo-1_bold.nii.gz")
    assert outputs.mask.name == "sub-01_ses-01_task-rest_acq-zs_run-01_echo-1_space-orig_label-SC_mask.nii.gz"
    assert outputs.mean.name == "sub-01_ses-01_task-rest_acq-zs_run-01_echo-1_desc-mean_bold.nii.gz"
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
    write_nifti_atomic(np.eye(3, dtype=bool)[..., None].repeat(2, 2), affine, path, dtype=np.uint8)
    img = nib.load(path)
    assert np.allclose(img.affine, affine) and img.get_data_dtype() == np.uint8
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert [p.name for p in tmp_path.iterdir()] == ["m.nii.gz"]   # no temporary file left


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "bad.json"
    with pytest.raises(TypeError):
        write_json_atomic({"x": object()}, path)
    assert list(tmp_path.iterdir()) == []
