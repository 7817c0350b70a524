#!/usr/bin/env python3
"""Discovery time: episeg_bids.layout.discover, cold and warm, against pybids' default indexing.

Generates BIDS datasets of N subjects x 2 sessions x 2 runs (default N = 1,000 and 10,000) in a
temporary folder under /tmp: each run a small but real gzipped 4D NIfTI (16x16x8x10 int16) with
its JSON sidecar, each session a T1w image with its sidecar, a root ``task-rest_bold.json``,
``dataset_description.json`` and ``participants.tsv``. Files are dated an hour back (a dataset
that has not changed lately; files changed in the last seconds are read again on purpose). The
folders are deleted at the end.

Every measurement runs in a new Python process, as a job would:

- ``wall``: the whole process (interpreter start, imports, discovery), measured outside;
- ``discover``: the ``discover()`` call alone, measured inside (imports excluded);
- cold = empty work dir; warm = the same work dir again (median of 3); participant = one subject
  of the N (an array task), cold then warm, in its own work dir;
- pybids = ``BIDSLayout(root, validate=False)`` (no database), the call alone and the whole
  process, for N up to ``--pybids-max`` (pybids takes minutes at 10,000).

The operating system's file cache is warm in every case (the files were just written).

    .venv/bin/python benchmarks/bench_discovery.py [--subjects 1000 10000] [--pybids-max 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
AN_HOUR_AGO = time.time() - 3600

DISCOVER = """
import json, sys, time
started = time.perf_counter()
from pathlib import Path
from episeg_bids import layout
imported = time.perf_counter()
found = layout.discover(Path(sys.argv[1]), Path(sys.argv[2]), layout.load_filters(None),
                        subjects=json.loads(sys.argv[3]))
done = time.perf_counter()
print(json.dumps({"import_s": imported - started, "call_s": done - imported, "runs": len(found.runs),
                  "invalid": sum(r.kind == "invalid" for r in found.runs), "reused": found.reused,
                  "pybids_imported": "bids" in sys.modules, "nibabel_imported": "nibabel" in sys.modules}))
"""

PYBIDS = """
import json, sys, time
started = time.perf_counter()
from bids import BIDSLayout
imported = time.perf_counter()
layout = BIDSLayout(sys.argv[1], validate=False)
done = time.perf_counter()
runs = layout.get(datatype="func", suffix="bold", extension=[".nii", ".nii.gz"], return_type="filename")
print(json.dumps({"import_s": imported - started, "call_s": done - imported, "runs": len(runs)}))
"""


def nifti_bytes(shape: tuple[int, ...], seed: int) -> bytes:
    """A real gzipped NIfTI image (random int16 data, 2x2x5 mm voxels) as bytes."""
    data = np.random.default_rng(seed).integers(0, 1000, size=shape, dtype=np.int16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.nii.gz"
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 5.0, 1.0])), path)
        return path.read_bytes()


def write(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    os.utime(path, (AN_HOUR_AGO, AN_HOUR_AGO))


def make_dataset(root: Path, n_subjects: int) -> int:
    """Write the dataset; returns the number of files."""
    bold, t1w = nifti_bytes((16, 16, 8, 10), 0), nifti_bytes((16, 16, 8), 1)
    run_sidecar = json.dumps({"RepetitionTime": 2.0, "EchoTime": 0.03, "PhaseEncodingDirection": "j-",
                              "SliceTiming": [0.0, 1.0, 0.25, 1.25, 0.5, 1.5, 0.75, 1.75]}).encode()
    root.mkdir(parents=True)
    write(root / "dataset_description.json", b'{"Name": "bench", "BIDSVersion": "1.10.0"}')
    write(root / "task-rest_bold.json", b'{"TaskName": "rest", "RepetitionTime": 2.0}')
    write(root / "participants.tsv", ("participant_id\n" + "".join(
        f"sub-{s:05d}\n" for s in range(n_subjects))).encode())
    files = 3
    for s in range(n_subjects):
        for ses in ("1", "2"):
            prefix = f"sub-{s:05d}_ses-{ses}"
            folder = root / f"sub-{s:05d}" / f"ses-{ses}"
            (folder / "func").mkdir(parents=True)
            (folder / "anat").mkdir()
            write(folder / "anat" / f"{prefix}_T1w.nii.gz", t1w)
            write(folder / "anat" / f"{prefix}_T1w.json", b'{"EchoTime": 0.002}')
            for run in ("1", "2"):
                write(folder / "func" / f"{prefix}_task-rest_run-{run}_bold.nii.gz", bold)
                write(folder / "func" / f"{prefix}_task-rest_run-{run}_bold.json", run_sidecar)
            files += 6
    return files


def measure(code: str, *args: str) -> dict:
    """Run ``code`` in a new Python process; its JSON line plus the process's wall time."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    return {**json.loads(done.stdout.splitlines()[-1]), "wall_s": time.perf_counter() - started}


def discover(root: Path, work: Path, subjects: list[str] | None = None) -> dict:
    return measure(DISCOVER, str(root), str(work), json.dumps(subjects))


def bench(n_subjects: int, pybids_max: int, tmp: Path) -> dict:
    root, work = tmp / f"ds{n_subjects}", tmp / f"work{n_subjects}"
    started = time.perf_counter()
    files = make_dataset(root, n_subjects)
    print(f"\n{n_subjects} subjects: {files} files generated in {time.perf_counter() - started:.0f} s")
    result = {"cold": discover(root, work)}
    warm = [discover(root, work) for _ in range(3)]
    result["warm"] = sorted(warm, key=lambda r: r["wall_s"])[1]
    label = f"{n_subjects // 2:05d}"
    result["participant cold"] = discover(root, tmp / f"work{n_subjects}-one", [label])
    result["participant warm"] = discover(root, tmp / f"work{n_subjects}-one", [label])
    if n_subjects <= pybids_max:
        result["pybids default"] = measure(PYBIDS, str(root))
    expected = 4 * n_subjects
    for name, r in result.items():
        wanted = 4 if name.startswith("participant") else expected
        assert r["runs"] == wanted and not r.get("invalid"), (name, r)
        extra = f"  reused={r['reused']} pybids imported={r['pybids_imported']} nibabel imported=" \
                f"{r['nibabel_imported']}" if "reused" in r else ""
        print(f"  {name:17s} wall {r['wall_s']:7.2f} s   call {r['call_s']:7.2f} s   imports "
              f"{r['import_s']:5.2f} s   {r['runs']} runs{extra}")
    if "pybids default" in result:
        pybids = result["pybids default"]
        for name in ("cold", "warm"):
            print(f"  pybids default / {name:4s}: {pybids['call_s'] / result[name]['call_s']:6.1f}x (calls), "
                  f"{pybids['wall_s'] / result[name]['wall_s']:6.1f}x (whole processes)")
    shutil.rmtree(root)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--pybids-max", type=int, default=1000, help="largest N also indexed with pybids")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, goals at 1,000 subjects: cold <= 8 s, "
          "warm <= 1 s (whole processes)")
    tmp = Path(tempfile.mkdtemp(prefix="bench_discovery_", dir="/tmp"))
    try:
        results = {n: bench(n, args.pybids_max, tmp) for n in args.subjects}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sizes = sorted(results)
    for small, large in zip(sizes, sizes[1:]):
        print(f"\ngrowth {small} -> {large} subjects ({large / small:.0f}x):")
        for name in ("cold", "warm", "participant cold", "participant warm"):
            a, b = results[small][name], results[large][name]
            print(f"  {name:17s} wall {b['wall_s'] / a['wall_s']:5.1f}x   call {b['call_s'] / a['call_s']:5.1f}x")
    print(f"\nwarm = median of 3 runs; load average at the end {os.getloadavg()[0]:.1f} (2-CPU machine shared)")


if __name__ == "__main__":
    main()
