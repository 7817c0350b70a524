"""The CPUs a process may use: affinity and SLURM in real subprocesses, cgroup quotas on hand-made
``/proc/self`` files and cgroup folders."""

import os
import shutil
import subprocess
import sys

from conftest import REPO
from episeg_bids import cpus

CPUS_SCRIPT = "from episeg_bids.cpus import available_cpus; print(available_cpus())"


def cpus_in_subprocess(env_extra=None, *, one_cpu=False) -> int:
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CPUS_PER_TASK"}
    env.update(env_extra or {}, PYTHONPATH=str(REPO))
    command = [sys.executable, "-c", CPUS_SCRIPT]
    first = min(os.sched_getaffinity(0))
    if one_cpu and shutil.which("taskset"):
        command = ["taskset", "-c", str(first), *command]
    preexec = (lambda: os.sched_setaffinity(0, {first})) if one_cpu and not shutil.which("taskset") else None
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=60, preexec_fn=preexec)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def test_available_cpus_follows_affinity_and_slurm():
    allowed = len(os.sched_getaffinity(0))
    unrestricted = cpus_in_subprocess()
    assert 1 <= unrestricted <= allowed
    assert cpus_in_subprocess(one_cpu=True) == 1
    assert cpus_in_subprocess({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert cpus_in_subprocess({"SLURM_CPUS_PER_TASK": "4096"}) == unrestricted  # the smallest limit wins
    assert cpus_in_subprocess({"SLURM_CPUS_PER_TASK": "not a number"}) == unrestricted


def fake_proc(tmp_path, cgroup: str, mounts: list[str]):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("".join(line + "\n" for line in mounts))
    return proc


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_smallest_along_the_path_rounded_up(tmp_path):
    fs = tmp_path / "cg2"
    write(fs / "cpu.max", "max 100000\n")
    write(fs / "job" / "cpu.max", "150000 100000\n")  # 1.5 CPUs (docker --cpus 1.5)
    write(fs / "job" / "step" / "cpu.max", "max 100000\n")
    proc = fake_proc(tmp_path, "0::/job/step\n", [f"30 23 0:26 / {fs} rw - cgroup2 cgroup2 rw"])
    assert cpus.cgroup_cpu_limit(proc) == 2
    write(fs / "job" / "step" / "cpu.max", "50000 100000\n")
    assert cpus.cgroup_cpu_limit(proc) == 1  # never 0


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    fs = tmp_path / "cpu,cpuacct"
    write(fs / "cpu.cfs_quota_us", "-1\n")
    write(fs / "cpu.cfs_period_us", "100000\n")
    write(fs / "docker" / "abc" / "cpu.cfs_quota_us", "300000\n")
    write(fs / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    mounts = [f"32 31 0:29 / {fs} rw,relatime - cgroup cgroup rw,cpu,cpuacct",
              f"34 31 0:31 / {tmp_path / 'cpuset'} rw,relatime - cgroup cgroup rw,cpuset"]
    proc = fake_proc(tmp_path, "4:cpu,cpuacct:/docker/abc\n3:cpuset:/\n", mounts)
    assert cpus.cgroup_cpu_limit(proc) == 3
    (proc / "cgroup").write_text("4:cpu,cpuacct:/\n")
    assert cpus.cgroup_cpu_limit(proc) is None  # -1: no quota


def test_cgroup_seen_from_a_container_without_cgroup_namespace(tmp_path):
    # mountinfo's root is the container's cgroup, /proc/self/cgroup names it from the host
    fs = tmp_path / "cgroup"
    write(fs / "cpu.max", "200000 100000\n")
    proc = fake_proc(tmp_path, "0::/system.slice/docker-abc.scope\n",
                     [f"30 23 0:26 /system.slice/docker-abc.scope {fs} ro - cgroup2 cgroup2 rw"])
    assert cpus.cgroup_cpu_limit(proc) == 2
    assert cpus.cgroup_cpu_limit(tmp_path / "no-proc") is None
