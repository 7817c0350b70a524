#!/usr/bin/env python3
"""Wall time per volume: one process that loads the model once and segments N volumes (what
episeg-bids does) against N processes that each import nnunetv2, load the model and segment one
volume (what one ``sct_deepseg`` call per image does). Same model, same image, same run.

    .venv/bin/python benchmarks/bench_model_reuse.py [--model-dir models/demo] [--volumes 4]
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "tests/data/ds-example/sub-leipzigR01/func/sub-leipzigR01_task-rest_rec-MoCoMean_bold.nii.gz"

WORKER = """
import sys, nibabel as nib, numpy as np
from episeg_bids import model, segment
spec = model.locate_model(sys.argv[1])
img = nib.load(sys.argv[2])
data, zooms = img.get_fdata(dtype=np.float32), img.header.get_zooms()[:3]
predictor = model.load_predictor(spec, threads=int(sys.argv[4]))
for _ in range(int(sys.argv[3])):
    mask = segment.segment_volume(predictor, data, img.affine, zooms).mask
print(int(mask.sum()))
"""


def run_worker(model_dir: Path, volumes: int, threads: int) -> str:
    done = subprocess.run([sys.executable, "-c", WORKER, str(model_dir), str(IMAGE), str(volumes), str(threads)],
                          capture_output=True, text=True, check=True, cwd=REPO)
    return done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "demo")
    parser.add_argument("--volumes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    started = time.perf_counter()
    baseline = {run_worker(args.model_dir, 1, args.threads) for _ in range(args.volumes)}
    per_call = (time.perf_counter() - started) / args.volumes

    started = time.perf_counter()
    ours = run_worker(args.model_dir, args.volumes, args.threads)
    once = (time.perf_counter() - started) / args.volumes

    print(f"model {args.model_dir}, image 128x128x24, {args.volumes} volumes, {args.threads} threads")
    print(f"one process per volume (SCT-style): {per_call:6.2f} s/volume")
    print(f"one process, model loaded once    : {once:6.2f} s/volume")
    print(f"speed-up                          : {per_call / once:6.2f}x  (same mask size: {baseline == {ours}})")


if __name__ == "__main__":
    main()
