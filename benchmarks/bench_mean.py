#!/usr/bin/env python3
"""Temporal mean of a 4D run (episeg_bids.epi.read_volume) against one native read of the same file.

Builds 128×128×24×T runs (default T = 300) from the real Leipzig mean EPI in tests/data, times a
small drift, plus Gaussian noise, in several on-disk forms (int16 .nii.gz and .nii, scaled int16,
float32 with a few NaN), in a temporary folder. Each measurement runs in a FRESH Python process
(so peak memory is that process's own): its wall time for the operation and its peak resident
memory (``VmHWM`` of /proc/self/status, Linux; it includes the interpreter, numpy and nibabel:
the "baseline" row; "net" columns subtract it).

- native read: ``np.asanyarray(nib.load(p).dataobj)`` (for ``.nii``, ``mmap=False`` so the data
  is really read rather than mapped);
- mean: ``read_volume(p)`` (header checks + one sequential pass);
- mean+volumes: ``read_volume(p, keep_volumes=True)`` (the float32 run kept for motion correction);
- slicing (``--slicing``): the former method, ``dataobj`` sliced in 16 MiB blocks (quadratic on .gz).

Goals (issue 10): mean time / native read <= 1.2, mean peak memory / native read <= 0.5.

    .venv/bin/python benchmarks/bench_mean.py [--volumes 300] [--repeat 3] [--slicing]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
LEIPZIG = REPO / "tests/data/ds-example/sub-leipzigR01/func/sub-leipzigR01_task-rest_rec-MoCoMean_bold.nii.gz"

CHILD = r"""
import json, sys, time
import nibabel as nib, numpy as np
from pathlib import Path
from episeg_bids.epi import read_volume
mode, path = sys.argv[1], Path(sys.argv[2])
started = time.perf_counter()
if mode == "native":
    out = np.asanyarray(nib.load(path, mmap=False).dataobj)
elif mode == "mean":
    out = read_volume(path).data
elif mode == "mean+volumes":
    out = read_volume(path, keep_volumes=True).volumes
elif mode == "slicing":
    img = nib.load(path)
    step = max(1, (16 * 2**20) // (int(np.prod(img.shape[:3])) * 4))
    total = np.zeros(img.shape[:3])
    for start in range(0, img.shape[3], step):
        total += np.asarray(img.dataobj[..., start:start + step], dtype=np.float32).sum(axis=3)
else:  # baseline: imports and the header only
    out = nib.load(path).shape
seconds = time.perf_counter() - started
# VmHWM: this process's peak resident memory since exec (ru_maxrss would include the parent's at fork)
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_mb": hwm_kb / 1024}))
"""


def build_runs(folder: Path, n_volumes: int) -> dict[str, Path]:
    """The benchmark runs, written with nibabel; returns {label: path}."""
    base = nib.load(LEIPZIG)
    mean = base.get_fdata(dtype=np.float32)
    mean *= 1500 / mean.max()
    rng = np.random.default_rng(0)
    drift = 1 + 0.01 * np.sin(np.arange(n_volumes) / 7)
    run = np.empty(mean.shape + (n_volumes,), np.float32)
    for t in range(n_volumes):
        run[..., t] = mean * drift[t] + rng.normal(0, 20, mean.shape)
    paths = {}

    def write(label: str, data: np.ndarray, name: str, slope: float | None = None) -> None:
        img = nib.Nifti1Image(data, base.affine)
        img.header.set_xyzt_units("mm", "sec")
        img.header.set_zooms((*base.header.get_zooms()[:3], 1.5))
        if slope is not None:
            img.header.set_slope_inter(slope, 3.0)
        paths[label] = folder / name
        nib.save(img, paths[label])

    as_int16 = np.clip(np.rint(run), -32768, 32767).astype(np.int16)
    write("int16 .nii.gz", as_int16, "int16_bold.nii.gz")
    write("int16 .nii", as_int16, "int16_bold.nii")
    write("scaled int16 .nii.gz", as_int16, "scaled_bold.nii.gz", slope=0.5)
    del as_int16
    run[5, 5, 5, ::10] = np.nan
    write("float32+NaN .nii.gz", run, "float32_bold.nii.gz")
    return paths


def measure(mode: str, path: Path, repeat: int) -> dict[str, float]:
    """Best time and peak memory of ``mode`` on ``path`` over ``repeat`` fresh processes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    runs = []
    for _ in range(repeat):
        done = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True,
                              env=env, check=True)
        runs.append(json.loads(done.stdout))
    return {"seconds": min(r["seconds"] for r in runs), "peak_mb": min(r["peak_mb"] for r in runs)}


def max_difference(path: Path) -> float:
    """Largest |read_volume mean - float64 NaN-aware mean of nibabel's own read| (relative)."""
    sys.path.insert(0, str(REPO))
    from episeg_bids.epi import read_volume

    logging.getLogger("episeg_bids").setLevel(logging.ERROR)  # the NaN warning is expected here

    raw = np.asanyarray(nib.load(path).dataobj)
    total = np.zeros(raw.shape[:3])
    counts = np.zeros(raw.shape[:3])
    for start in range(0, raw.shape[3], 20):
        block = raw[..., start:start + 20].astype(np.float64)
        finite = np.isfinite(block)
        total += np.where(finite, block, 0).sum(axis=3)
        counts += finite.sum(axis=3)
    expected = np.divide(total, counts, out=np.zeros_like(total), where=counts > 0)
    ours = read_volume(path).data
    return float(np.max(np.abs(ours - expected) / np.maximum(np.abs(expected), 1e-30)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per measurement (best kept)")
    parser.add_argument("--slicing", action="store_true", help="also time the former dataobj slicing (slow)")
    args = parser.parse_args()
    modes = ["native", "mean", "mean+volumes"] + (["slicing"] if args.slicing else [])
    with tempfile.TemporaryDirectory() as tmp:
        print(f"building 128x128x24x{args.volumes} runs from {LEIPZIG.name} + noise ...", flush=True)
        paths = build_runs(Path(tmp), args.volumes)
        baseline = measure("baseline", paths["int16 .nii"], args.repeat)
        print(f"baseline process (imports, header): peak {baseline['peak_mb']:.0f} MB\n")
        print(f"{'run':22} {'on disk':>9} {'mode':13} {'time s':>7} {'peak MB':>8} {'time/native':>11} "
              f"{'peak/native':>11} {'net peak/native':>15}")
        for label, path in paths.items():
            results = {mode: measure(mode, path, args.repeat) for mode in modes}
            native = results["native"]
            for mode, result in results.items():
                net = (result["peak_mb"] - baseline["peak_mb"]) / max(native["peak_mb"] - baseline["peak_mb"], 1)
                print(f"{label:22} {path.stat().st_size / 2**20:7.0f}MB {mode:13} {result['seconds']:7.2f} "
                      f"{result['peak_mb']:8.0f} {result['seconds'] / native['seconds']:11.2f} "
                      f"{result['peak_mb'] / native['peak_mb']:11.2f} {net:15.2f}")
            print(f"{'':22} max relative difference of the mean to nibabel's float64 NaN-aware mean: "
                  f"{max_difference(path):.1e}", flush=True)


if __name__ == "__main__":
    main()
