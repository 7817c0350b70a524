#!/usr/bin/env python
"""Evaluate the episeg-bids DEMO model exactly as SCT runs nnUNetv2, and record the figures.

Loads ``<model-dir>/nnUNetTrainer__nnUNetPlans__3d_fullres`` ONCE with nnUNetPredictor (CPU, no
mirroring, fold_all, checkpoint_final.pth) and reports:

* Dice on held-out synthetic phantoms (seeds disjoint from training);
* Dice on the held-out real run (temporal mean of SCT example data fmri.nii.gz against
  fmri_moco_mean_seg_modif.nii.gz; never used for training or tuning);
* CPU inference time per volume with the model loaded once;
* artefact sizes.

The figures are printed and written into ``<model-dir>/model_card.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))

from demo_model import TRAINER_FOLDER, card  # noqa: E402

HELDOUT = ROOT / "tests/data/heldout_sct_example_data_r20161128/fmri"
DEFAULT_SEED = 20250107


def get_parser() -> argparse.ArgumentParser:
    """Command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=ROOT / "models/demo",
                   help=f"folder holding {TRAINER_FOLDER}/ and model_card.json")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="base seed (phantoms use seed+900000+i)")
    p.add_argument("--n-phantoms", type=int, default=12, help="held-out synthetic phantoms")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--no-card", action="store_true", help="do not write model_card.json")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = get_parser().parse_args(argv)
    os.environ.setdefault("nnUNet_def_n_proc", str(args.threads))
    from demo_model import evaluate as ev
    from demo_model.inference import load_predictor

    t0 = time.perf_counter()
    import nnunetv2.inference.predict_from_raw_data  # noqa: F401  (timed apart from loading)

    import_s = time.perf_counter() - t0
    predictor = load_predictor(args.model_dir / TRAINER_FOLDER, n_threads=args.threads)
    load_s = time.perf_counter() - t0 - import_s
    phantoms = ev.evaluate_phantoms(predictor, n=args.n_phantoms, seed=args.seed)
    real = ev.evaluate_real_run(predictor, HELDOUT / "fmri.nii.gz", HELDOUT / "fmri_moco_mean_seg_modif.nii.gz")
    real["image"] = os.path.relpath(real["image"], ROOT)
    real["mask"] = os.path.relpath(real["mask"], ROOT)
    mean, affine = ev.temporal_mean(HELDOUT / "fmri.nii.gz")
    import nibabel as nib

    leipzig = nib.load(str(ROOT / "tests/data/ds-example/sub-leipzigR01/func/"
                                  "sub-leipzigR01_task-rest_rec-MoCoMean_bold.nii.gz"))
    timing = {"model_load_seconds": round(load_s, 3), "import_seconds": round(import_s, 3),
              "heldout_run_mean": ev.inference_time(predictor, mean, affine),
              "leipzig_128x128x24": ev.inference_time(predictor, leipzig.get_fdata(dtype="float32"),
                                                      leipzig.affine),
              "threads": args.threads}
    record = {"synthetic_heldout": phantoms, "real_heldout": real, "cpu_inference": timing,
              "sizes": ev.artefact_sizes(args.model_dir),
              "command": " ".join(["python", "tools/evaluate_demo_model.py", *(argv or sys.argv[1:])])}
    print(json.dumps({"dice_synthetic_mean": phantoms["dice_mean"], "dice_synthetic_min": phantoms["dice_min"],
                      "dice_real_heldout": real["dice"], "dice_real_per_slice": real["dice_per_slice"],
                      "inference_seconds": {k: v["median_seconds"] for k, v in timing.items()
                                            if isinstance(v, dict)},
                      "model_load_seconds": timing["model_load_seconds"],
                      "total_bytes": record["sizes"]["total_bytes"]}, indent=2))
    if not args.no_card:
        card.write_evaluation(args.model_dir, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
