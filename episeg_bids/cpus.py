"""How many CPUs this process may use: scheduler affinity, cgroup quota, SLURM.

:func:`available_cpus` is the smallest of the limits that apply to the process, at least 1: the
CPUs it may run on (``taskset``, a SLURM cpuset), the CPU quota of its cgroups (a Docker
``--cpus``; :func:`cgroup_cpu_limit` reads the v1 and v2 hierarchies named in
``/proc/self/mountinfo`` and ``/proc/self/cgroup``) and ``SLURM_CPUS_PER_TASK``. It is the default
number of torch threads of :func:`episeg_bids.model.load_predictor`. Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path


def available_cpus() -> int:
    """Number of CPUs this process may use: the smallest of its limits, at least 1.

    The limits are the scheduler affinity (``os.sched_getaffinity``, e.g. ``taskset`` or a SLURM
    cpuset), the cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``,
    the smallest along the process's cgroup and its ancestors, rounded up: a Docker
    ``--cpus 1.5`` gives 2) and ``SLURM_CPUS_PER_TASK``.

    Returns
    -------
    int
        CPUs, ≥ 1; the default number of torch threads of
        :func:`episeg_bids.model.load_predictor`.
    """
    limits = [_affinity_cpus(), cgroup_cpu_limit(), _slurm_cpus()]
    return max(1, min((n for n in limits if n is not None), default=1))


def _affinity_cpus() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count()


def _slurm_cpus() -> int | None:
    value = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def cgroup_cpu_limit(proc: Path = Path("/proc/self")) -> int | None:
    """CPU quota of the process's cgroups (v1 and v2 hierarchies), rounded up; None if unlimited.

    Parameters
    ----------
    proc : Path
        Folder with the process's ``mountinfo`` and ``cgroup`` files (``/proc/self``); the
        cgroup mount points named in ``mountinfo`` are read as they are.

    Returns
    -------
    int or None
        ``ceil(quota / period)`` of the most restrictive cgroup from the process's own up to the
        root of its hierarchy, or None when no quota applies or nothing can be read.
    """
    try:
        mounts = (proc / "mountinfo").read_text().splitlines()
        groups = (proc / "cgroup").read_text().splitlines()
    except OSError:
        return None
    paths = {}  # controller ('' for the v2 hierarchy) -> cgroup path of the process
    for line in groups:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                paths[controller] = parts[2]
    quotas = []
    for line in mounts:
        fields, _, fs = (part.split() for part in line.partition(" - "))
        if len(fields) < 5 or len(fs) < 3:
            continue
        root, mount_point = _unescape(fields[3]), Path(_unescape(fields[4]))
        if fs[0] == "cgroup2" and "" in paths:
            quotas.append(_smallest_quota(mount_point, root, paths[""], _cpu_max))
        elif fs[0] == "cgroup" and "cpu" in fs[2].split(",") and "cpu" in paths:
            quotas.append(_smallest_quota(mount_point, root, paths["cpu"], _cfs_quota))
    found = [q for q in quotas if q is not None]
    return max(1, math.ceil(min(found))) if found else None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _smallest_quota(mount_point: Path, root: str, path: str, read) -> float | None:
    """Smallest quota (CPUs) from the cgroup folder of `path` up to `mount_point`."""
    relative = path if root == "/" else path[len(root):] if path.startswith(root) else "/"
    folder = mount_point / relative.lstrip("/")
    if not folder.is_dir():  # host path seen from a container without a cgroup namespace
        folder = mount_point
    quotas = []
    for level in [folder, *folder.parents]:
        quotas.append(read(level))
        if level == mount_point or not level.is_relative_to(mount_point):
            break
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _read_numbers(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _cpu_max(folder: Path) -> float | None:
    """cgroup v2 ``cpu.max``: ``'<quota> <period>'`` or ``'max <period>'``."""
    words = _read_numbers(folder / "cpu.max")
    if len(words) == 2 and words[0].isdigit() and words[1].isdigit() and int(words[1]) > 0:
        return int(words[0]) / int(words[1])
    return None


def _cfs_quota(folder: Path) -> float | None:
    """cgroup v1 ``cpu.cfs_quota_us`` (-1: unlimited) over ``cpu.cfs_period_us``."""
    quota, period = _read_numbers(folder / "cpu.cfs_quota_us"), _read_numbers(folder / "cpu.cfs_period_us")
    if quota and period and quota[0].isdigit() and period[0].isdigit() and int(period[0]) > 0:
        return int(quota[0]) / int(period[0])
    return None
