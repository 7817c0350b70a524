"""The participant level on messy datasets: a corpus of bad inputs among good runs, kill -9 at
random moments, and concurrent jobs sharing one output folder and one work folder.

Everything runs ``run.py`` in real subprocesses with the real demo model, real pybids and the
real BIDS validator.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import corpus
from conftest import DEMO_MODEL, EXAMPLE, REPO, SCT_RUN, run_app
from episeg_bids import derivatives as deriv
from episeg_bids.participant import network_threads
from episeg_bids.validate import run_validator

COMMON = ("--model-dir", DEMO_MODEL, "--skip-bids-validation")
TIME_KEYS = ("DateProcessed", "RunTimeSeconds")


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if " ERROR " in line]


def no_temporary_files(out: Path) -> list[Path]:
    """Hidden files other than the dataset's .bidsignore and the lock files."""
    return [p for p in out.rglob(".*") if p.is_file() and p.name != ".bidsignore" and not p.name.endswith(".lock")]


# --- the corpus ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    paths = corpus.build_dataset(root / "bids")
    out = root / "out"
    done = run_app(root / "bids", out, "participant", *COMMON, "-w", root / "work", "--max-image-gb", "1",
                   timeout=1200)
    return root / "bids", out, paths, done


def test_corpus_run_finishes_with_exit_1_and_good_runs_done(corpus_run):
    bids, out, paths, done = corpus_run
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    for mask in ("sub-good4d/func/sub-good4d_task-rest_space-orig_label-SC_mask.nii.gz",
                 "sub-good3d/func/sub-good3d_task-rest_rec-MoCoMean_space-orig_label-SC_mask.nii.gz"):
        assert (out / mask).is_file()
    failed = sum(c.outcome == "failed" for c in corpus.CASES)
    assert re.search(rf"\d+ done, 0 skipped, {failed} failed", done.stderr), done.stderr[-2000:]
    assert no_temporary_files(out) == []
    assert (out / "qc" / "index.html").is_file()


def _case_outputs(out: Path, case_id: str) -> list[Path]:
    return [p for p in (out / f"sub-{case_id}").rglob("*") if p.is_file() and "log" not in p.parts]


@pytest.mark.parametrize("case", corpus.CASES, ids=[c.id for c in corpus.CASES])
def test_corpus_case(corpus_run, case):
    bids, out, paths, done = corpus_run
    shown = deriv.printable(paths[case.id].name)
    mine = [line for line in error_lines(done.stderr) if shown in line and " FAILED " not in line]
    crashes = list((out / f"sub-{case.id}" / "log").glob("crash-*.txt"))
    if case.outcome == "failed":
        assert len(mine) == 1, f"{case.id}: expected one error line naming {shown!r}:\n" + "\n".join(error_lines(done.stderr))
        assert re.search(case.expect, mine[0]), f"{case.id}: {mine[0]!r} does not match {case.expect!r}"
        assert "\n" not in mine[0] and len(mine[0]) < 1000
        assert len(crashes) == 1 and "Traceback" in crashes[0].read_text()
        assert not [p for p in _case_outputs(out, case.id) if p.name.endswith("_mask.nii.gz")]
        return
    assert not mine and not crashes, f"{case.id} failed: {mine}"
    (sidecar,) = [p for p in _case_outputs(out, case.id) if p.name.endswith("_mask.json")]
    meta = json.loads(sidecar.read_text())
    assert deriv.read_record(out, sidecar).complete
    if case.expect:
        said = " ".join(meta["Notes"]) + " " + " ".join(f["message"] for f in meta["Flags"])
        assert re.search(case.expect, said), f"{case.id}: {said!r} does not match {case.expect!r}"


def test_corpus_is_documented():
    table = (REPO / "docs" / "robustness.md").read_text()
    for case in corpus.CASES:
        row = re.search(rf"^\| `{case.id}` \|([^|]*)\|([^|]*)\|", table, re.M)
        assert row, f"{case.id} is not in docs/robustness.md"
        assert row.group(2).strip() == case.outcome, case.id


def test_group_level_counts_the_corpus(corpus_run):
    bids, out, paths, _ = corpus_run
    done = run_app(bids, out, "group", "-w", out.parent / "work")
    assert done.returncode == 1
    summary = json.loads((out / "group_bold.json").read_text())
    failed = {row["input"] for row in summary["NotDone"] if row["status"] == "failed"}
    expected = {paths[c.id].relative_to(bids).as_posix() for c in corpus.CASES if c.outcome == "failed"}
    assert expected <= failed
    assert summary["Runs"]["missing"] == 0


# --- kill -9 and rerun ----------------------------------------------------------------------------

def comparable(sidecar: Path) -> dict:
    meta = json.loads(sidecar.read_text())
    for key in TIME_KEYS:
        meta.pop(key, None)
    return meta


def outputs_of(out: Path) -> dict[str, Path]:
    return {p.relative_to(out).as_posix(): p for p in out.glob("sub-*/**/*") if p.is_file()
            and (p.name.endswith(".nii.gz") or p.name.endswith(".json") or p.name.endswith(".tsv"))}


def test_kill_at_random_moments_then_rerun_equals_an_uninterrupted_run(example_bids, tmp_path):
    args = ("--save-probseg", *COMMON)
    reference = tmp_path / "reference"
    started = time.monotonic()
    first = run_app(example_bids, reference, "participant", *args, "-w", tmp_path / "work-ref")
    full_s = time.monotonic() - started
    assert first.returncode == 0, first.stderr
    out, work = tmp_path / "out", tmp_path / "work"
    rng = random.Random(20261202)
    moments = sorted(rng.uniform(0.2, full_s) for _ in range(12))
    moments[:3] = [0.3, 1.0, 2.0]         # early: imports, validation skipped, pybids indexing
    for moment in moments:
        job = subprocess.Popen([sys.executable, str(REPO / "run.py"), str(example_bids), str(out), "participant",
                                *map(str, args), "-w", str(work)], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        time.sleep(moment)
        job.send_signal(signal.SIGKILL)
        job.wait()
    final = run_app(example_bids, out, "participant", *args, "-w", work)
    assert final.returncode == 0, final.stderr
    expected, got = outputs_of(reference), outputs_of(out)
    assert sorted(got) == sorted(expected)
    for rel, path in expected.items():
        if rel.endswith(".nii.gz"):
            assert got[rel].read_bytes() == path.read_bytes(), rel
        elif rel.endswith(".json"):
            assert comparable(got[rel]) == comparable(path), rel
        else:
            assert got[rel].read_text() == path.read_text(), rel
    assert no_temporary_files(out) == []
    assert [f for f in run_validator(out) if f.severity == "error"] == []
    group = run_app(example_bids, out, "group", "-w", work)
    assert group.returncode == 0 and "3 done" in group.stderr, group.stderr


# --- concurrent jobs --------------------------------------------------------------------------------

@pytest.fixture
def sessions_bids(tmp_path) -> Path:
    """Five participants of the real run (first 8 volumes), one with two sessions."""
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "sessions", "BIDSVersion": "1.10.0"}))
    (root / "task-rest_bold.json").write_text(json.dumps({"TaskName": "rest", "RepetitionTime": 1.13}))
    run = corpus.real_run()
    for label in ("a", "b", "c", "d"):
        folder = root / f"sub-{label}" / "func"
        folder.mkdir(parents=True)
        nib.save(run, folder / f"sub-{label}_task-rest_bold.nii.gz")
    for session in ("01", "02"):
        folder = root / "sub-s" / f"ses-{session}" / "func"
        folder.mkdir(parents=True)
        nib.save(run, folder / f"sub-s_ses-{session}_task-rest_bold.nii.gz")
    return root


def test_eight_concurrent_jobs_share_one_output_and_one_work_folder(sessions_bids, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    selections = [["--participant-label", "a"], ["--participant-label", "a"],
                  ["--participant-label", "s", "--session-label", "01"],
                  ["--participant-label", "s", "--session-label", "02"],
                  ["--participant-label", "b"], ["--participant-label", "c"], ["--participant-label", "d"],
                  ["--participant-label", "s"]]
    jobs = [subprocess.Popen([sys.executable, str(REPO / "run.py"), str(sessions_bids), str(out), "participant",
                              *map(str, COMMON), "-w", str(work), "--omp-nthreads", "1", *selection],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for selection in selections]
    results = [(job.wait(timeout=900), job.stderr.read()) for job in jobs]
    for code, stderr in results:
        assert code == 0, stderr
    records, problems = deriv.run_records(out)
    assert problems == [] and len(records) == 6 and all(r.complete for r in records)
    masks = {r.mask_rel: np.asarray(nib.load(r.mask).dataobj) for r in records}
    first = next(iter(masks.values()))
    assert all(np.array_equal(m, first) for m in masks.values())     # the same image everywhere
    assert no_temporary_files(out) == []
    group = run_app(sessions_bids, out, "group", "-w", work)
    assert group.returncode == 0, group.stderr
    summary = json.loads((out / "group_bold.json").read_text())
    assert summary["Runs"]["total"] == 6 and summary["Runs"]["done"] == 6
    data = re.search(r'<script type="application/json" id="qc-data">(.*?)</script>',
                     (out / "qc" / "index.html").read_text(), re.S).group(1)
    assert len(json.loads(data)["runs"]) == 6


def test_network_threads_follow_the_options():
    assert network_threads(None, None, lambda: 6) == 6
    assert network_threads(3, None, lambda: 6) == 3
    assert network_threads(None, 2, lambda: 6) == 2
    assert network_threads(8, 2, lambda: 6) == 2


@pytest.mark.parametrize("threads", [1, 2])
def test_omp_nthreads_is_the_thread_count_inside_the_network(tmp_path, threads):
    """--omp-nthreads reaches the network's forward pass (nnunetv2 caps torch's threads while it
    predicts) and is recorded in the mask sidecar."""
    import torch

    from episeg_bids import epi, model, segment
    from episeg_bids.cli import get_parser, options_from_args
    from episeg_bids.participant import Context

    options = options_from_args(get_parser().parse_args(
        [str(EXAMPLE), str(tmp_path / "out"), "participant", "--omp-nthreads", str(threads),
         "--model-dir", str(DEMO_MODEL)]))
    context = Context(options, model.locate_model(options.model_dir))
    seen: list[int] = []
    hook = context.predictor.network.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    try:
        volume = epi.read_volume(SCT_RUN)
        segment.segment_volume(context.predictor, volume.data, volume.affine, volume.zooms_mm)
    finally:
        hook.remove()
    assert seen and set(seen) == {threads}
    assert model.describe_predictor(context.predictor)["Threads"] == threads
