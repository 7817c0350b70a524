"""Group level on an output folder made by separate participant jobs, with a failed run."""

import csv
import gzip
import json
import shutil

import pytest

from conftest import DEMO_MODEL, EXAMPLE, SCT_RUN, run_app
from episeg_bids.group import add_outlier_flags, match_ground_truth, robust_z

TRUTH = EXAMPLE / "derivatives" / "label"
LABELS = ("--participant-label", "leipzigR01", "errsm30", "bad01")   # sub-brain01 is never processed here


def read_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory):
    """Leipzig and errsm30 processed by two separate participant jobs, bad01 failing."""

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
    done = run_app(bids, out, "group", "--ground-truth", TRUTH, *LABELS)
    assert done.returncode == 1, done.stderr        # a run failed: listed, and the exit code says so
    assert "FAILED sub-bad01/func/sub-bad01_task-rest_bold.nii.gz" in done.stderr
    rows = {r["participant_id"]: r for r in read_tsv(out / "group_bold.tsv")}
    assert set(rows) == {"sub-leipzigR01", "sub-errsm30", "sub-bad01"}
    assert rows["sub-bad01"]["status"] == "failed" and "truncated" in rows["sub-bad01"]["error"]
    errsm = rows["sub-errsm30"]
    assert errsm["status"] == "done" and errsm["session_id"] == "ses-01" and errsm["run"] == "01"
    assert errsm["kind"] == "run" and errsm["volumes_averaged"] == "30" and float(errsm["volume_mm3"]) > 0
    summary = json.loads((out / "group_bold.json").read_text())
    assert summary["Runs"] == {"total": 3, "done": 2, "failed": 1, "missing": 0, "outdated": 0}
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

    shutil.copy(SCT_RUN, bids / "sub-bad01" / "func" / "sub-bad01_task-rest_bold.nii.gz")
    rerun = run_app(bids, out, "participant", "--participant-label", "bad01", "--model-dir", DEMO_MODEL,
                    "--skip-bids-validation")
    assert rerun.returncode == 0, rerun.stderr
    done = run_app(bids, out, "group", *LABELS)
    assert done.returncode == 0, done.stderr
    rows = {r["participant_id"]: r for r in read_tsv(out / "group_bold.tsv")}
    assert rows["sub-bad01"]["status"] == "done"


def test_group_without_participant_outputs(example_bids, tmp_path):
    done = run_app(example_bids, tmp_path / "out", "group")
    assert done.returncode == 1 and "run the participant level first" in done.stderr
    rows = read_tsv(tmp_path / "out" / "group_bold.tsv")
    assert {r["status"] for r in rows} == {"missing"} and len(rows) == 3


def test_group_reconciles_outputs_with_the_inputs(two_jobs, tmp_path):
    """Inputs never processed are missing, changed inputs are outdated, outputs of deleted inputs
    are reported but not tabulated: nothing passes for done that is not."""
    bids, out = two_jobs
    copy = tmp_path / "bids"
    shutil.copytree(bids, copy)
    shutil.copytree(out, tmp_path / "out")
    out = tmp_path / "out"
    (copy / "sub-new01" / "func").mkdir(parents=True)
    shutil.copy(SCT_RUN, copy / "sub-new01" / "func" / "sub-new01_task-rest_bold.nii.gz")    # never processed
    errsm = copy / "sub-errsm30" / "ses-01" / "func" / "sub-errsm30_ses-01_task-rest_run-01_bold.nii.gz"
    raw = bytearray(gzip.decompress(errsm.read_bytes()))
    raw[-2:] = b"\x01\x00"                                             # another image under the same name
    errsm.write_bytes(gzip.compress(bytes(raw)))
    shutil.rmtree(copy / "sub-leipzigR01")                              # its outputs are now orphaned
    done = run_app(copy, out, "group", "-w", tmp_path / "work", *LABELS, "new01")
    assert done.returncode == 1
    rows = {r["participant_id"]: r for r in read_tsv(out / "group_bold.tsv")}
    assert rows["sub-new01"]["status"] == "missing" and rows["sub-errsm30"]["status"] == "outdated"
    assert "sub-leipzigR01" not in rows
    summary = json.loads((out / "group_bold.json").read_text())
    assert summary["Runs"]["missing"] == 1 and summary["Runs"]["outdated"] == 1
    assert summary["Orphaned"] == ["sub-leipzigR01/func/sub-leipzigR01_task-rest_rec-MoCoMean_space-orig_label-SC_mask.nii.gz"]
    assert "MISSING sub-new01/func/sub-new01_task-rest_bold.nii.gz" in done.stderr
    # the participant level recomputes the changed input (its checksum is in the fingerprint)
    rerun = run_app(copy, out, "participant", "--model-dir", DEMO_MODEL, "--skip-bids-validation", "-w",
                    tmp_path / "work", "--participant-label", "errsm30")
    assert rerun.returncode == 0 and "1 done, 0 skipped" in rerun.stderr, rerun.stderr


def test_robust_outliers():
    rows = [{"status": "done", "volume_mm3": v, "mean_area_mm2": 70.0} for v in (900, 1000, 1100, 950, 1050, 5000)]
    add_outlier_flags(rows)
    assert [bool(r["group_flags"]) for r in rows] == [False] * 5 + [True]
    assert rows[-1]["group_flags"][0]["code"] == "outlier_volume_mm3"
    assert robust_z([1.0, 2.0]) == [None, None]        # too few runs to judge
    # a tight cluster: the MAD (0.5) is floored at 5 % of the median, so 2-4 % differences are not outliers
    tight = robust_z([1000.0, 1000.5, 999.5, 1001.0, 1000.0, 1040.0])
    assert max(abs(z) for z in tight) < 1.0
    assert robust_z([1000.0, 1000.5, 999.5, 1001.0, 1000.0, 1400.0])[-1] > 3.5


def test_ground_truth_matching_by_entities(tmp_path):
    truths = [({"sub": "01", "task": "rest"}, tmp_path / "a"), ({"sub": "01", "task": "rest", "run": "2"}, tmp_path / "b"),
              ({"sub": "02", "task": "rest"}, tmp_path / "c")]
    assert match_ground_truth({"sub": "01", "task": "rest", "rec": "MoCoMean"}, truths) == tmp_path / "a"
    assert match_ground_truth({"sub": "01", "task": "rest", "run": "2"}, truths) == tmp_path / "b"
    assert match_ground_truth({"sub": "03", "task": "rest"}, truths) is None
