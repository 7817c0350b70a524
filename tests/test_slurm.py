"""SLURM job arrays, for real: ``scripts/submit.sh`` on a single-node SLURM started on this machine
(``scripts/ci/start_slurm.sh``), the package run directly through ``EPISEG_CMD`` instead of the
image; the array's and the group job's outputs must equal a serial run's.

The parts of the sbatch scripts that need no scheduler (which participant a task gets, the
apptainer command line, the two sbatch calls of ``submit.sh``) are checked with stand-ins that
record their arguments.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import DEMO_MODEL, EXAMPLE, REPO, run_app

SCRIPTS = REPO / "scripts"
ARRAY = SCRIPTS / "episeg_array.sbatch"
GROUP = SCRIPTS / "episeg_group.sbatch"
SUBMIT = SCRIPTS / "submit.sh"
START, STOP = SCRIPTS / "ci" / "start_slurm.sh", SCRIPTS / "ci" / "stop_slurm.sh"
SLURM_DIR = Path(os.environ.get("EPISEG_SLURM_DIR", "/tmp/episeg-slurm-ci"))
EXAMPLE_PARTICIPANTS = ["sub-brain01", "sub-errsm30", "sub-leipzigR01"]
MASKS = "sub-*/**/*_space-orig_label-SC_mask.nii.gz"
TIMEOUT_S = 600

RECORDER = """#!/bin/bash
# stands in for a command: appends its arguments, one per line, then a blank line
printf '%s\\n' "$@" >> "$RECORD"
echo >> "$RECORD"
printf '%s\\n' "${STUB_STDOUT:-}"
"""


# --------------------------------------------------------------------------- helpers

def recorder(folder: Path, name: str) -> Path:
    path = folder / name
    path.write_text(RECORDER)
    path.chmod(0o755)
    return path


def calls(record: Path) -> list[list[str]]:
    """The argument lists a recorder received, one list per call."""
    return [block.splitlines() for block in record.read_text().split("\n\n") if block.strip()]


def run_script(script: Path, *args, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *map(str, args)], env={**os.environ, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def without_times(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in row.items() if not re.search(r"date|time", k)} for row in rows]


# --------------------------------------------------------------------------- the scripts alone

@pytest.fixture
def stub_bids(tmp_path: Path) -> Path:
    """A dataset skeleton whose participants.tsv has a blank line and Windows line ends."""
    bids = tmp_path / "bids"
    for label in ("01", "02", "10"):
        (bids / f"sub-{label}").mkdir(parents=True)
    (bids / "participants.tsv").write_bytes(b"participant_id\tage\r\nsub-10\t30\r\n\r\nsub-01\t41\r\nsub-02\tn/a\r\n")
    return bids


def test_array_task_i_takes_data_line_i_plus_1(stub_bids, tmp_path):
    record = tmp_path / "record"
    env = {"EPISEG_CMD": str(recorder(tmp_path, "episeg")), "RECORD": str(record), "TMPDIR": str(tmp_path),
           "SLURM_CPUS_PER_TASK": "3", "SLURM_ARRAY_JOB_ID": "77"}
    for task in range(3):
        done = run_script(ARRAY, stub_bids, tmp_path / "out", "--tta", env={**env, "SLURM_ARRAY_TASK_ID": str(task)},
                          cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    runs = calls(record)
    assert [run[run.index("--participant-label") + 1] for run in runs] == ["sub-10", "sub-01", "sub-02"]
    first = runs[0]
    assert first[:3] == [str(stub_bids), str(tmp_path / "out"), "participant"]
    assert first[first.index("--omp-nthreads") + 1] == "3" and first[-1] == "--tta"
    work = first[first.index("-w") + 1]
    assert re.fullmatch(re.escape(str(tmp_path)) + r"/episeg_77_0\.\w+", work)
    assert not Path(work).exists(), "the node-local work folder is removed at the end"

    beyond = run_script(ARRAY, stub_bids, tmp_path / "out", env={**env, "SLURM_ARRAY_TASK_ID": "3"}, cwd=tmp_path)
    assert beyond.returncode == 64 and "no participant on data line 4" in beyond.stderr
    assert "(3 participants)" in beyond.stderr


def test_without_participants_tsv_tasks_follow_the_sorted_subject_folders(stub_bids, tmp_path):
    (stub_bids / "participants.tsv").unlink()
    record = tmp_path / "record"
    env = {"EPISEG_CMD": str(recorder(tmp_path, "episeg")), "RECORD": str(record), "TMPDIR": str(tmp_path),
           "SLURM_ARRAY_TASK_ID": "2"}
    assert run_script(ARRAY, stub_bids, tmp_path / "out", env=env, cwd=tmp_path).returncode == 0
    assert "sub-10" in calls(record)[0]


def test_the_container_command_line(stub_bids, tmp_path):
    record, sif = tmp_path / "record", tmp_path / "episeg-bids.sif"
    sif.write_text("")
    env = {"EPISEG_APPTAINER": str(recorder(tmp_path, "apptainer")), "EPISEG_SIF": str(sif), "RECORD": str(record),
           "TMPDIR": str(tmp_path), "SLURM_ARRAY_TASK_ID": "1", "SLURM_CPUS_PER_TASK": "2",
           "EPISEG_BIND": "/refs:/refs:ro"}
    out = tmp_path / "out"
    assert run_script(ARRAY, stub_bids, out, env={**env, "SLURM_GPUS_ON_NODE": "1"}, cwd=tmp_path).returncode == 0
    assert run_script(ARRAY, stub_bids, out, env=env, cwd=tmp_path).returncode == 0
    assert run_script(GROUP, stub_bids, out, "--ground-truth", "/refs", env=env, cwd=tmp_path).returncode == 0
    gpu, cpu, group = calls(record)
    work = gpu[gpu.index("-w") + 1]
    assert gpu == ["run", "--cleanenv", "-B", f"{stub_bids}:{stub_bids}:ro", "-B", str(out), "-B", work,
                   "--env", f"TMPDIR={work}/tmp", "--nv",
                   "-B", "/refs:/refs:ro", str(sif), str(stub_bids), str(out), "participant",
                   "--participant-label", "sub-01", "-w", work, "--omp-nthreads", "2"]
    assert "--nv" not in cpu
    work = group[group.index("-w") + 1]
    assert group == ["run", "--cleanenv", "-B", f"{stub_bids}:{stub_bids}:ro", "-B", str(out), "-B", work,
                     "--env", f"TMPDIR={work}/tmp", "-B", "/refs:/refs:ro", str(sif), str(stub_bids), str(out), "group", "-w", work,
                     "--ground-truth", "/refs"]
    env["EPISEG_SIF"] = str(tmp_path / "missing.sif")
    missing = run_script(ARRAY, stub_bids, out, env=env, cwd=tmp_path)
    assert missing.returncode == 64 and "missing.sif not found" in missing.stderr


def test_submit_sends_the_array_then_the_group_after_it(stub_bids, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorder(bin_dir, "sbatch")
    record = tmp_path / "record"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), "STUB_STDOUT": "4242;cluster1",
           "EPISEG_ARRAY_LIMIT": "2", "EPISEG_SBATCH_ARGS": "--account=abc --partition=cpu",
           "EPISEG_ARRAY_SBATCH_ARGS": "--gpus=1", "EPISEG_SKIP_VALIDATION": "1"}
    done = run_script(SUBMIT, stub_bids, tmp_path / "out", "--tta", "--group", "--ground-truth", "/refs",
                      env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["4242", "4242"]
    array, group = calls(record)
    logs = tmp_path / "out" / "logs" / "slurm"
    assert array == ["--parsable", "--export=ALL", "--array=0-2%2", f"--output={logs}/episeg-%A_%a.log",
                     "--account=abc", "--partition=cpu", "--gpus=1",
                     str(ARRAY), str(stub_bids), str(tmp_path / "out"), "--tta"]
    assert group == ["--parsable", "--export=ALL", "--dependency=afterany:4242", f"--output={logs}/episeg-group-%j.log",
                     "--account=abc", "--partition=cpu", str(GROUP), str(stub_bids), str(tmp_path / "out"),
                     "--ground-truth", "/refs"]


# --------------------------------------------------------------------------- real SLURM

def _ping(env: dict) -> bool:
    try:
        done = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and "is UP" in done.stdout


@pytest.fixture(scope="module")
def slurm() -> dict:
    """The environment of a running single-node SLURM: one that already answers at
    $EPISEG_SLURM_DIR/slurm.conf, else one started here (and stopped afterwards)."""
    if os.geteuid() != 0:
        pytest.fail("the SLURM test runs as root: scripts/ci/start_slurm.sh installs and starts munged, "
                    "slurmctld and slurmd")
    env = {**os.environ, "SLURM_CONF": str(SLURM_DIR / "slurm.conf")}
    started = False
    if not (shutil.which("scontrol") and (SLURM_DIR / "slurm.conf").is_file() and _ping(env)):
        done = subprocess.run([str(START), str(SLURM_DIR)], capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"SLURM cannot run on this machine: {START} {SLURM_DIR} exited {done.returncode}\n"
                        f"{done.stdout}\n{done.stderr}")
        started = True
    yield env
    if started:
        subprocess.run([str(STOP), str(SLURM_DIR)], capture_output=True, timeout=120)


def job_records(job_id: str, env: dict) -> list[dict[str, str]]:
    """``scontrol show job -o`` as dicts (one per array task)."""
    done = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in done.stdout.splitlines() if line.strip()]


def wait_for(job_ids: list[str], env: dict, logs: Path) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T %R"], env=env,
                                capture_output=True, text=True).stdout.strip()
        if not queued:
            return
        time.sleep(2)
    subprocess.run(["scancel", *job_ids], env=env)
    tails = "\n".join(f"== {p.name}\n{p.read_text()[-1500:]}" for p in sorted(logs.glob("*.log")))
    pytest.fail(f"jobs {job_ids} still queued after {TIMEOUT_S} s:\n{queued}\n{tails}")


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    bids = tmp_path_factory.mktemp("slurm") / "bids"
    shutil.copytree(EXAMPLE, bids)
    return bids


@pytest.fixture(scope="module")
def serial(example) -> Path:
    """Reference: the participant level over the whole dataset in one process, then the group level."""
    out, work = example.parent / "serial", example.parent / "serial_work"
    done = run_app(example, out, "participant", "--model-dir", DEMO_MODEL, "-w", work)
    assert done.returncode == 0, done.stderr
    done = run_app(example, out, "group", "-w", work, "--ground-truth", example / "derivatives" / "label")
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def array_run(slurm, example) -> tuple[Path, Path, dict, list[dict], dict]:
    """scripts/submit.sh with EPISEG_CMD = this checkout's run.py: an array of 3 and the group job."""
    out, scratch = example.parent / "array", example.parent / "scratch"
    scratch.mkdir()
    env = {**slurm, "EPISEG_CMD": f"{sys.executable} {REPO / 'run.py'}", "TMPDIR": str(scratch),
           "EPISEG_SBATCH_ARGS": "--mem=1G --time=00:15:00", "EPISEG_ARRAY_SBATCH_ARGS": "--cpus-per-task=1"}
    started = time.monotonic()
    submitted = subprocess.run([str(SUBMIT), str(example), str(out), "--model-dir", str(DEMO_MODEL),
                                "--group", "--ground-truth", str(example / "derivatives" / "label")],
                               env=env, cwd=example.parent, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    assert "validating" in submitted.stderr and "validator: 1 x BOLD_NOT_4D accepted" in submitted.stderr
    array_id, group_id = submitted.stdout.split()
    wait_for([array_id, group_id], slurm, out / "logs" / "slurm")
    print(f"SLURM array of 3 + group job: {time.monotonic() - started:.0f} s")
    return out, scratch, job_records(group_id, slurm)[0], job_records(array_id, slurm), {"array": array_id}


def test_every_task_and_the_group_job_succeed(array_run):
    out, _, group, tasks, _ = array_run
    assert sorted(int(t["ArrayTaskId"]) for t in tasks) == [0, 1, 2]
    for task in tasks:
        assert (task["JobState"], task["ExitCode"]) == ("COMPLETED", "0:0"), task
    assert (group["JobState"], group["ExitCode"]) == ("COMPLETED", "0:0"), group
    assert group["Dependency"] == "(null)" and group["StartTime"] >= max(t["EndTime"] for t in tasks)
    logs = out / "logs" / "slurm"
    for task in tasks:
        log = (logs / f"episeg-{task['ArrayJobId']}_{task['ArrayTaskId']}.log").read_text()
        label = EXAMPLE_PARTICIPANTS[int(task["ArrayTaskId"])]
        assert f"task {task['ArrayTaskId']} = {label}" in log and "1 done, 0 skipped, 0 failed" in log
        # validated once by submit.sh, not again in each task
        assert "validated once by scripts/submit.sh" in log and "BIDS validation skipped" in log


def test_work_folders_stay_on_node_local_scratch(array_run):
    out, scratch, *_ = array_run
    assert list(scratch.iterdir()) == [], "each job removes its work folder"
    assert not (out.parent / "episeg_work").exists()


def test_array_masks_equal_the_serial_run(array_run, serial):
    out, *_ = array_run
    names = sorted(p.relative_to(serial) for p in serial.glob(MASKS))
    assert len(names) == 3 and names == sorted(p.relative_to(out) for p in out.glob(MASKS))
    for name in names:
        ours, theirs = nib.load(out / name), nib.load(serial / name)
        assert np.asarray(ours.dataobj).tobytes() == np.asarray(theirs.dataobj).tobytes(), name
        assert ours.get_data_dtype() == theirs.get_data_dtype() and np.array_equal(ours.affine, theirs.affine)
        sidecars = [json.loads((root / str(name).replace(".nii.gz", ".json")).read_text()) for root in (out, serial)]
        for key in ("Metrics", "Flags", "Options", "Input", "PostProcessing"):
            assert sidecars[0][key] == sidecars[1][key], (name, key)


def test_array_group_tables_equal_the_serial_run(array_run, serial):
    out, *_ = array_run
    for table in ("group_bold.tsv", "group_accuracy_slices.tsv"):
        ours, theirs = read_tsv(out / table), read_tsv(serial / table)
        assert len(ours) == len(theirs) > 0
        assert without_times(ours) == without_times(theirs), table
    summary = [json.loads((root / "group_bold.json").read_text()) for root in (out, serial)]
    for document in summary:
        document.pop("Date")
    assert summary[0] == summary[1]
