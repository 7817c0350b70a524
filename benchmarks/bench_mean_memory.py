#!/usr/bin/env python3
"""Peak memory of the temporal mean: episeg_bids.epi.mean_volume against the naive float64 mean.

Builds a synthetic int16 4D run (default 128x128x24x300, about 236 MB on disk as int16) in a temp
folder, then measures each method's peak Python-allocated memory with tracemalloc in the same run.

    .venv/bin/python benchmarks/bench_mean_memory.py [--volumes 300]
"""

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np

from episeg_bids.epi import mean_volume


def measure(function):
    tracemalloc.start()
    started = time.perf_counter()
    result = function()
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, peak / 2**20, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=300)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    data = rng.integers(0, 4000, size=(128, 128, 24, args.volumes), dtype=np.int16)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run_bold.nii"          # uncompressed: the read itself is not measured
        img = nib.Nifti1Image(data, np.eye(4))
        img.header.set_slope_inter(0.5, 3.0)      # scaled data: nibabel's reads go to float
        nib.save(img, path)
        del data
        ours, ours_mb, ours_s = measure(lambda: mean_volume(nib.load(path))[0])
        naive, naive_mb, naive_s = measure(lambda: nib.load(path).get_fdata().mean(axis=3))
    run_mb = 128 * 128 * 24 * args.volumes * 2 / 2**20
    print(f"run: 128x128x24x{args.volumes} int16 = {run_mb:.0f} MB")
    print(f"naive get_fdata().mean(axis=3): peak {naive_mb:7.1f} MB, {naive_s:.2f} s")
    print(f"episeg_bids mean_volume       : peak {ours_mb:7.1f} MB, {ours_s:.2f} s")
    print(f"peak memory ratio naive/ours  : {naive_mb / ours_mb:.1f}x")
    print(f"max abs difference            : {float(np.abs(ours - naive).max()):.2e}")


if __name__ == "__main__":
    main()
