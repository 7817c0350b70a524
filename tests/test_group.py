"""Group level on an output folder made by separate participant jobs, with a failed run."""

import csv
import json

import pytest

from conftest import DEMO_MODEL, EXAMPLE, SCT_RUN, run_app
from episeg_bids.group import add_outlier_flags, match_ground_truth, robust_z

TRUTH = EXAMPLE / "derivatives" / "label"


def read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory):
    """Leipzig and errsm30 processed by two separate participant jobs, bad01 failing."""
    import shutil

    root = tmp_path_factory.mktemp("group")
    bids = root / "bids"
    shutil.copytree(EXAMPLE, bids, ignore=shutil.ignore_patterns("derivatives"))
    bad = bids / "sub-bad01" / "func"
    bad.mkdir(parents=True)
    whole = SCT_RUN.read_bytes()
    (bad / "sub-bad01_task-rest_bold.nii.gz").write_bytes(whole[: len(whole) // 3])
    out = root / "out"
    common = ["--model-dir", DEMO_MODEL, "--skip-bids-validation", "-w", root / "work"]
    first = run_app(bids, out, "participant", "--participant-label", "leipzigR01", "bad01", *common)
    second = run_app(bids, out, "participant", "--participant-label", "errsm30", *common)
    assert first.returncode == 1 and second.returncode == 0, first.stderr + second.stderr
    return bids, out


def test_group_table_lists_done_and_failed_runs(two_jobs):
    bids, out = two_jobs
    done = run_app(bids, out, "group", "--ground-truth", TRUTH)
    assert done.returncode == 1, done.stderr        # a run failed: listed, and the exit code says so
    assert "FAILED sub-bad01/func/sub-bad01_task-rest_bold.nii.gz" in done.stderr
    rows = {r["participant_id"]: r for r in read_tsv(out / "group_bold.tsv")}
    assert set(rows) == {"sub-leipzigR01", "sub-errsm30", "sub-bad01"}
    assert rows["sub-bad01"]["status"] == "failed" and "truncated" in rows["sub-bad01"]["error"]
    errsm = rows["sub-errsm30"]
    assert errsm["status"] == "done" and errsm["session_id"] == "ses-01" and errsm["run"] == "01"
    assert errsm["kind"] == "run" and errsm["volumes_averaged"] == "30" and float(errsm["volume_mm3"]) > 0
    summary = json.loads((out / "group_bold.json").read_text())
    assert summary["Runs"] == {"total": 3, "done": 2, "failed": 1}
    assert summary["Models"] == ["nnUNetTrainer__nnUNetPlans__3d_fullres (DEMO)"]


def test_accuracy_against_the_real_leipzig_mask(two_jobs):
    _, out = two_jobs
    rows = {r["participant_id"]: r for r in read_tsv(out / "group_bold.tsv")}
    leipzig = rows["sub-leipzigR01"]
    assert leipzig["ground_truth"].endswith("sub-leipzigR01_task-rest_desc-spinalcordmask.nii.gz")
    assert float(leipzig["dice"]) > 0.8 and float(leipzig["hd95_mm"]) < 10
    assert rows["sub-errsm30"]["ground_truth"] == "n/a"
    slices = [r for r in read_tsv(out / "group_accuracy_slices.tsv") if r["participant_id"] == "sub-leipzigR01"]
    assert len(slices) == 24 and all(0 <= float(r["dice"]) <= 1 for r in slices)
    summary = json.loads((out / "group_bold.json").read_text())
    assert summary["Accuracy"]["runs_with_ground_truth"] == 1
    assert summary["Accuracy"]["dice"]["mean"] == pytest.approx(float(leipzig["dice"]))


def test_fixed_run_disappears_from_failures(two_jobs, tmp_path):
    bids, out = two_jobs
    import shutil

    shutil.copy(SCT_RUN, bids / "sub-bad01" / "func" / "sub-bad01_task-rest_bold.nii.gz")
    rerun = run_app(bids, out, "participant", "--participant-label", "bad01", "--model-dir", DEMO_MODEL,
                    "--skip-bids-validation")
    assert rerun.returncode == 0, rerun.stderr
    done = run_app(bids, out, "group")
    assert done.returncode == 0, done.stderr
    rows = {r["participant_id"]: r for r in read_tsv(out / "group_bold.tsv")}
    assert rows["sub-bad01"]["status"] == "done"


def test_group_without_participant_outputs(tmp_path):
    (tmp_path / "bids").mkdir()
    done = run_app(tmp_path / "bids", tmp_path / "out", "group")
    assert done.returncode == 18 and "run the participant level first" in done.stderr


def test_robust_outliers():
    rows = [{"status": "done", "volume_mm3": v, "mean_area_mm2": 70.0} for v in (900, 1000, 1100, 950, 1050, 5000)]
    add_outlier_flags(rows)
    assert [bool(r["group_flags"]) for r in rows] == [False] * 5 + [True]
    assert rows[-1]["group_flags"][0]["code"] == "outlier_volume_mm3"
    assert robust_z([1.0, 2.0]) == [None, None]        # too few runs to judge


def test_ground_truth_matching_by_entities(tmp_path):
    truths = [({"sub": "01", "task": "rest"}, tmp_path / "a"), ({"sub": "01", "task": "rest", "run": "2"}, tmp_path / "b"),
              ({"sub": "02", "task": "rest"}, tmp_path / "c")]
    assert match_ground_truth({"sub": "01", "task": "rest", "rec": "MoCoMean"}, truths) == tmp_path / "a"
    assert match_ground_truth({"sub": "01", "task": "rest", "run": "2"}, truths) == tmp_path / "b"
    assert match_ground_truth({"sub": "03", "task": "rest"}, truths) is None
