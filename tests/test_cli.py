"""End to end: run.py as a subprocess on a BIDS dataset of real EPI, with the demo model."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import DEMO_MODEL, SCT_RUN, run_app
from episeg_bids.validate import blocking_errors, run_validator

LEIPZIG_OUT = "sub-leipzigR01/func/sub-leipzigR01_task-rest_rec-MoCoMean_space-orig_label-SC_mask.nii.gz"
ERRSM_OUT = "sub-errsm30/ses-01/func/sub-errsm30_ses-01_task-rest_run-01_space-orig_label-SC_mask.nii.gz"
ERRSM_MEAN = "sub-errsm30/ses-01/func/sub-errsm30_ses-01_task-rest_run-01_desc-mocomean_boldref.nii.gz"
ERRSM_MOTION = "sub-errsm30/ses-01/func/sub-errsm30_ses-01_task-rest_run-01_desc-moco_timeseries.tsv"
BRAIN_OUT = "sub-brain01/func/sub-brain01_task-rest_space-orig_label-SC_mask.nii.gz"


def sidecar(path: Path) -> dict:
    return json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The whole example dataset processed once (validation on, probability maps saved)."""
    root = tmp_path_factory.mktemp("e2e")
    bids = root / "bids"
    shutil.copytree(Path(__file__).parent / "data" / "ds-example", bids, ignore=shutil.ignore_patterns("derivatives"))
    out = root / "out"
    done = run_app(bids, out, "participant", "--model-dir", DEMO_MODEL, "-w", root / "work", "--save-probseg")
    return bids, out, root / "work", done


def test_participant_level_writes_every_output(full_run):
    bids, out, _, done = full_run
    assert done.returncode == 0, done.stderr
    assert "3 done, 0 skipped, 0 failed" in done.stderr
    for rel in (LEIPZIG_OUT, ERRSM_OUT, BRAIN_OUT, ERRSM_MEAN):
        assert (out / rel).is_file(), rel
    # no mean is written for an input that already is a mean
    assert not list((out / "sub-leipzigR01" / "func").glob("*desc-mean*"))
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "episeg-bids"
    assert description["DatasetLinks"]["raw"].startswith("file://")


def test_masks_lie_on_the_input_grid(full_run):
    bids, out, _, _ = full_run
    source = nib.load(bids / "sub-errsm30/ses-01/func/sub-errsm30_ses-01_task-rest_run-01_bold.nii.gz")
    mask = nib.load(out / ERRSM_OUT)
    assert mask.shape == source.shape[:3] and np.allclose(mask.affine, source.affine)
    assert mask.get_data_dtype() == np.uint8 and set(np.unique(mask.dataobj)) <= {0, 1}
    mean = nib.load(out / ERRSM_MEAN)
    # a 3D image on the run's own grid, which 3D-only tools (sct_deepseg, FSL, ANTs) read directly
    assert mean.shape == (68, 68, 6) and mean.get_data_dtype() == np.float32 and np.array_equal(mean.affine, source.affine)
    assert mean.header.get_zooms() == source.header.get_zooms()[:3]
    raw = np.asanyarray(source.dataobj).astype(np.float64).mean(axis=3)
    assert np.corrcoef(mean.get_fdata().ravel(), raw.ravel())[0, 1] > 0.99    # motion-corrected, same image
    assert not list((out / "sub-errsm30").rglob("*_desc-mean_boldref*"))     # no plain mean beside it
    prob = nib.load(str(out / ERRSM_OUT).replace("_mask", "_probseg"))
    assert prob.get_data_dtype() == np.float32 and 0 <= prob.get_fdata().min() and prob.get_fdata().max() <= 1


def test_sidecars_explain_the_mask(full_run):
    _, out, _, _ = full_run
    meta = sidecar(out / ERRSM_OUT)
    assert meta["Type"] == "ROI" and meta["Manual"] is False
    assert meta["Sources"] == ["bids::" + ERRSM_MEAN,
                               "bids:raw:sub-errsm30/ses-01/func/sub-errsm30_ses-01_task-rest_run-01_bold.nii.gz"]
    assert meta["Model"]["IsDemoModel"] is True and "DEMO" in meta["Description"]
    assert meta["Model"]["Folds"] == ["all"] and len(meta["Model"]["CheckpointSHA256"]["fold_all"]) == 64
    assert meta["Input"]["VolumesAveraged"] == 30 and len(meta["Input"]["SHA256"]) == 64
    assert meta["Options"]["largest"] is False and meta["Options"]["device"] == "cpu"
    assert {"nnunetv2", "torch", "nibabel", "pybids", "episeg-bids"} <= set(meta["PipelineVersions"])
    assert meta["Metrics"]["n_slices"] == 6 and meta["Metrics"]["slices_with_cord"] >= 4
    assert meta["Metrics"]["volume_mm3"] == pytest.approx(
        np.asarray(nib.load(out / ERRSM_OUT).dataobj).sum() * 0.9558824 ** 2 * 16.800001, rel=1e-4)
    assert meta["RunTimeSeconds"]["segment_s"] > 0
    mean_meta = sidecar(out / ERRSM_MEAN)
    assert mean_meta["RepetitionTime"] == 1.13 and mean_meta["VolumesAveraged"] == 30
    assert meta["Input"]["Kind"].startswith("4D run (motion-corrected") and meta["RunTimeSeconds"]["moco_s"] > 0
    motion = meta["Motion"]
    assert motion["Volumes"] == 30 and 0 <= motion["FramewiseDisplacementMeanMM"] <= motion["FramewiseDisplacementMaxMM"]
    assert meta["Outputs"]["motion"] == ERRSM_MOTION
    table = (out / ERRSM_MOTION).read_text().splitlines()
    assert len(table) == 31 and table[0].startswith("volume\tframewise_displacement_mm\tmean_translation_i_mm")
    assert "translation_j_slice05_mm" in json.loads((out / ERRSM_MOTION.replace(".tsv", ".json")).read_text())


def test_moco_none_and_3d_inputs_keep_the_plain_mean(example_bids, tmp_path):
    out = tmp_path / "out"
    done = run_app(example_bids, out, "participant", "--model-dir", DEMO_MODEL, "--skip-bids-validation",
                   "--participant-label", "errsm30", "--moco", "none")
    assert done.returncode == 0, done.stderr
    plain = out / ERRSM_MEAN.replace("mocomean", "mean")
    source = nib.load(example_bids / "sub-errsm30/ses-01/func/sub-errsm30_ses-01_task-rest_run-01_bold.nii.gz")
    raw = np.asanyarray(source.dataobj).astype(np.float64).mean(axis=3)
    plain_img = nib.load(plain)
    assert plain_img.shape == (68, 68, 6) and np.array_equal(plain_img.affine, source.affine)
    assert np.allclose(plain_img.get_fdata(), raw, atol=1e-3)
    meta = sidecar(out / ERRSM_OUT)
    assert "Motion" not in meta and meta["Options"]["moco"] == "none" and not (out / ERRSM_MOTION).exists()
    assert meta["Sources"][0] == "bids::" + ERRSM_MEAN.replace("mocomean", "mean")


def test_output_passes_the_bids_validator(full_run):
    _, out, _, _ = full_run
    findings = run_validator(out)
    assert blocking_errors(findings) == [] and not [f for f in findings if f.severity == "error"]


def test_rerun_skips_complete_runs_and_overwrite_recomputes(full_run):
    bids, out, work, _ = full_run
    before = (out / LEIPZIG_OUT).stat().st_mtime_ns
    again = run_app(bids, out, "participant", "--model-dir", DEMO_MODEL, "-w", work, "--save-probseg",
                    "--skip-bids-validation", "--participant-label", "leipzigR01")
    assert again.returncode == 0 and "0 done, 1 skipped" in again.stderr
    assert (out / LEIPZIG_OUT).stat().st_mtime_ns == before
    forced = run_app(bids, out, "participant", "--model-dir", DEMO_MODEL, "-w", work, "--save-probseg",
                     "--skip-bids-validation", "--participant-label", "leipzigR01", "--overwrite")
    assert forced.returncode == 0 and "1 done, 0 skipped" in forced.stderr
    assert (out / LEIPZIG_OUT).stat().st_mtime_ns != before


def test_bad_inputs_fail_alone(example_bids, tmp_path):
    bad = example_bids / "sub-bad01" / "func"
    bad.mkdir(parents=True)
    whole = SCT_RUN.read_bytes()
    (bad / "sub-bad01_task-rest_bold.nii.gz").write_bytes(whole[: len(whole) // 3])
    flat = example_bids / "sub-bad02" / "func"
    flat.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), flat / "sub-bad02_task-rest_bold.nii.gz")
    out = tmp_path / "out"
    done = run_app(example_bids, out, "participant", "--model-dir", DEMO_MODEL, "--skip-bids-validation",
                   "--participant-label", "bad01", "sub-bad02", "leipzigR01")
    assert done.returncode == 1
    assert "1 done, 0 skipped, 2 failed" in done.stderr
    assert "sub-bad01_task-rest_bold.nii.gz" in done.stderr and "truncated" in done.stderr
    assert "sub-bad02_task-rest_bold.nii.gz is 2D (64, 64)" in done.stderr
    assert (out / LEIPZIG_OUT).is_file()
    crash = list((out / "sub-bad01" / "log").glob("crash-*.txt"))
    assert len(crash) == 1 and "Traceback" in crash[0].read_text() and "options:" in crash[0].read_text()
    assert list((out / "sub-bad02" / "log").glob("crash-*.txt"))
    # nothing half-written: no temporary files, no mask for the bad runs
    assert not [p for p in out.rglob(".*") if p.is_file() and p.name not in (".bidsignore", ".lock")]
    assert not list((out / "sub-bad01").rglob("*.nii.gz"))


def test_filters_labels_and_exit_codes(example_bids, tmp_path):
    out = tmp_path / "out"
    nothing = tmp_path / "nothing.json"
    nothing.write_text(json.dumps({"bold": {"task": "motor"}, "mean": {"task": "motor"}}))
    done = run_app(example_bids, out, "participant", "--model-dir", DEMO_MODEL, "--skip-bids-validation",
                   "--bids-filter-file", nothing)
    assert done.returncode == 18 and "no 4D _bold run or 3D mean EPI" in done.stderr
    done = run_app(example_bids, out, "participant", "--model-dir", DEMO_MODEL, "--skip-bids-validation",
                   "--participant_label", "sub-nobody")
    assert done.returncode == 18 and "participant nobody is not in" in done.stderr
    assert run_app(example_bids, out, "everyone").returncode == 17
    assert run_app(example_bids, out, "participant", "--thr", "7").returncode == 64
    assert run_app(example_bids, out, "participant", "--no-such-option").returncode == 64
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run_app(example_bids, blocker / "out", "participant").returncode == 73


def test_filter_file_with_null_and_star_end_to_end(example_bids, tmp_path):
    selection = tmp_path / "filter.json"
    # sessions of 4D runs required ("*"), 3D means only without rec (null): selects errsm30 alone
    selection.write_text(json.dumps({"bold": {"session": "*"}, "mean": {"reconstruction": None}}))
    out = tmp_path / "out"
    done = run_app(example_bids, out, "participant", "--model-dir", DEMO_MODEL, "--skip-bids-validation",
                   "--bids-filter-file", selection)
    assert done.returncode == 0, done.stderr
    assert "1 done" in done.stderr and (out / ERRSM_OUT).is_file() and not (out / LEIPZIG_OUT).exists()


def test_invalid_dataset_exits_16_unless_skipped(example_bids, tmp_path):
    (example_bids / "sub-brain01" / "func" / "notes about brain01.txt").write_text("not BIDS")
    done = run_app(example_bids, tmp_path / "out", "participant", "--model-dir", DEMO_MODEL,
                   "--participant-label", "leipzigR01")
    assert done.returncode == 16 and "failed BIDS validation" in done.stderr


def test_missing_model_explains_how_to_install(example_bids, tmp_path):
    env = {**os.environ, "EPISEG_HOME": str(tmp_path / "home")}
    env.pop("EPISEG_MODEL_DIR", None)
    done = run_app(example_bids, tmp_path / "out", "participant", "--skip-bids-validation", env=env)
    assert done.returncode == 1 and "episeg-bids install-model" in done.stderr


def test_postprocessing_options_are_applied_and_recorded(example_bids, tmp_path):
    out = tmp_path / "out"
    done = run_app(example_bids, out, "participant", "--model-dir", DEMO_MODEL, "--skip-bids-validation",
                   "--participant-label", "leipzigR01", "--thr", "0.3", "--largest", "--fill-holes",
                   "--remove-small", "20mm3")
    assert done.returncode == 0, done.stderr
    meta = sidecar(out / LEIPZIG_OUT)
    assert meta["Options"] == {"tta": False, "thr": 0.3, "largest": True, "fill_holes": True,
                               "remove_small": [20.0, "mm3"], "moco": "slicewise", "device": "cpu", "save_probseg": False}
    assert [s.split(" ")[0] for s in meta["PostProcessing"]] == ["threshold", "keep", "fill", "remove"]
    assert meta["Metrics"]["components"] == 1


def test_parser_and_options(tmp_path, monkeypatch):
    from episeg_bids.cli import get_parser, options_from_args

    monkeypatch.delenv("EPISEG_WORK_DIR", raising=False)
    (tmp_path / "bids").mkdir()
    args = get_parser().parse_args([str(tmp_path / "bids"), str(tmp_path / "out"), "participant",
                                    "--participant_label", "sub-01", "02", "--session-label", "ses-a",
                                    "--task-label", "task-rest", "--remove-small", "15mm3", "--largest"])
    options = options_from_args(args)
    assert options.participant_labels == ("01", "02") and options.session_labels == ("a",)
    assert options.task_labels == ("rest",) and options.remove_small == (15.0, "mm3")
    assert options.work_dir == tmp_path / "episeg_work"
    assert options.segmentation_options()["remove_small"] == [15.0, "mm3"] and options.nprocs is None


def test_version_and_help():
    assert run_app("--version").stdout.startswith("episeg-bids ")
    help_text = run_app("--help").stdout
    for option in ("--participant-label", "--bids-filter-file", "--model-dir", "--device", "--tta", "--thr",
                   "--largest", "--fill-holes", "--remove-small", "--save-probseg", "--overwrite", "--nprocs",
                   "--omp-nthreads", "--skip-bids-validation", "--work-dir", "--ground-truth"):
        assert option in help_text


def test_work_dir_from_environment_and_option(tmp_path, monkeypatch):
    from episeg_bids.cli import get_parser, options_from_args

    (tmp_path / "bids").mkdir()
    monkeypatch.setenv("EPISEG_WORK_DIR", str(tmp_path / "scratch"))
    base = [str(tmp_path / "bids"), str(tmp_path / "out"), "participant"]
    assert options_from_args(get_parser().parse_args(base)).work_dir == tmp_path / "scratch"
    assert options_from_args(get_parser().parse_args(base + ["-w", str(tmp_path / "w")])).work_dir == tmp_path / "w"


def test_validate_once_command(example_bids):
    done = run_app("validate", example_bids)
    assert done.returncode == 0 and "BOLD_NOT_4D accepted" in done.stderr, done.stderr
    (example_bids / "sub-brain01" / "func" / "notes about brain01.txt").write_text("not BIDS")
    done = run_app("validate", example_bids)
    assert done.returncode == 16 and "failed BIDS validation" in done.stderr
    assert run_app("validate", example_bids / "nothing").returncode == 64
