#!/usr/bin/env python
"""Train the episeg-bids DEMO spinal-cord model (nnUNetv2 3d_fullres) on the CPU, reproducibly.

DEMO model, not for research use: install the real EPISeg weights for any analysis.

Steps (each in :mod:`demo_model`): generate training cases from fixed seeds (augmented views of the
real sub-leipzigR01 moco mean + synthetic phantoms), reorient them to RAS+ like the predictor does,
run nnUNet's fingerprint/planning (small plans variant)/preprocessing, train nnUNet's trainer with a
short schedule, export the EPISeg release layout + zip, then (unless ``--no-evaluate``) measure it
with ``tools/evaluate_demo_model.py``.

Usage::

    python tools/train_demo_model.py            # full run (make model)
    python tools/train_demo_model.py --quick    # smoke run, a few minutes, poor model
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
sys.path.insert(0, str(TOOLS))

from demo_model import DATASET_ID, DATASET_NAME, PLANS_NAME, TRAINER_FOLDER  # noqa: E402
from demo_model import card  # noqa: E402

LEIPZIG_IMAGE = ROOT / "tests/data/ds-example/sub-leipzigR01/func/sub-leipzigR01_task-rest_rec-MoCoMean_bold.nii.gz"
LEIPZIG_MASK = (ROOT / "tests/data/ds-example/derivatives/label/sub-leipzigR01/func/"
                "sub-leipzigR01_task-rest_desc-spinalcordmask.nii.gz")
DEFAULTS = {"seed": 20250107, "n_real": 300, "n_phantoms": 150, "epochs": 50, "iterations": 50,
            "features": "16,32,48,64,64"}
QUICK = {"n_real": 40, "n_phantoms": 20, "epochs": 2, "iterations": 10}


def get_parser() -> argparse.ArgumentParser:
    """Command-line parser."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=ROOT / "build/demo_model_work",
                   help="scratch directory (nnUNet_raw/_preprocessed/_results); wiped first")
    p.add_argument("--out-dir", type=Path, default=ROOT / "models/demo", help="where the model is written")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="base seed of data and training")
    p.add_argument("--n-real", type=int, default=DEFAULTS["n_real"], help="augmented views of the real image")
    p.add_argument("--n-phantoms", type=int, default=DEFAULTS["n_phantoms"], help="synthetic phantoms")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="training epochs")
    p.add_argument("--iterations", type=int, default=DEFAULTS["iterations"], help="iterations per epoch")
    p.add_argument("--features", default=DEFAULTS["features"], help="feature maps per stage (5 stages)")
    p.add_argument("--threads", type=int, default=2, help="torch threads and worker processes")
    p.add_argument("--fp32", action="store_true", help="store weights in float32 (default float16)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run: %s" % QUICK)
    p.add_argument("--no-evaluate", action="store_true", help="skip tools/evaluate_demo_model.py")
    return p


def _settings(args: argparse.Namespace) -> dict:
    """Resolved training settings (``--quick`` overrides sizes)."""
    s = {"seed": args.seed, "n_real": args.n_real, "n_phantoms": args.n_phantoms, "epochs": args.epochs,
         "iterations": args.iterations, "features": [int(v) for v in args.features.split(",")],
         "threads": args.threads, "fp16": not args.fp32}
    if args.quick:
        s.update(QUICK)
    return s


def run(args: argparse.Namespace) -> dict:
    """Generate data, plan, preprocess, train and export; return the training record."""
    s = _settings(args)
    if args.work_dir.exists():
        shutil.rmtree(args.work_dir)
    from demo_model.train import configure_environment

    folders = configure_environment(args.work_dir, n_threads=s["threads"])
    from demo_model.augment import SourceImage
    from demo_model.dataset import training_specs, write_raw_dataset

    t0 = time.perf_counter()
    raw = folders["nnUNet_raw"] / DATASET_NAME
    specs = training_specs(s["seed"], s["n_real"], s["n_phantoms"])
    write_raw_dataset(raw, specs, SourceImage.load(str(LEIPZIG_IMAGE), str(LEIPZIG_MASK)),
                      n_processes=s["threads"])
    t_data = time.perf_counter() - t0

    from demo_model.plans import plan_and_preprocess

    plans = plan_and_preprocess(DATASET_ID, folders["nnUNet_preprocessed"] / DATASET_NAME, PLANS_NAME,
                                features=tuple(s["features"]), n_processes=s["threads"])
    t_prep = time.perf_counter() - t0 - t_data

    import json

    import torch
    from demo_model.export import reduce_checkpoint, write_deterministic_zip, write_release_folder
    from demo_model.train import train

    dataset_json = json.loads((raw / "dataset.json").read_text())
    ckpt_path = train(plans, dataset_json, epochs=s["epochs"], iterations_per_epoch=s["iterations"],
                      seed=s["seed"])
    t_train = time.perf_counter() - t0 - t_data - t_prep

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    reduced = reduce_checkpoint(ckpt, fp16=s["fp16"])
    folder = write_release_folder(args.out_dir, TRAINER_FOLDER, plans, dataset_json, reduced)
    write_deterministic_zip(folder, args.out_dir / "episeg-demo-model.zip")
    n_params = _count_parameters(reduced["network_weights"])
    record = card.training_record(
        settings=s, plans=plans, n_parameters=int(n_params), final_log=_final_log(ckpt),
        seconds={"data": t_data, "plan_preprocess": t_prep, "train": t_train,
                 "total": time.perf_counter() - t0},
        command=" ".join(["python", "tools/train_demo_model.py", *sys.argv[1:]]))
    card.write_training(args.out_dir, record)
    return record


def _count_parameters(state_dict: dict) -> int:
    """Number of distinct weights (the state dict names shared tensors several times)."""
    seen = {(v.data_ptr(), tuple(v.shape)): v.numel() for v in state_dict.values()}
    return int(sum(seen.values()))


def _final_log(ckpt: dict) -> dict:
    """Last training loss and pseudo Dice from nnUNet's logger state in the checkpoint."""
    log = ckpt.get("logging", {})
    last = {k: (float(v[-1]) if len(v) else None) for k, v in log.items()
            if k in ("train_losses", "val_losses", "mean_fg_dice", "ema_fg_dice")}
    last["epochs_run"] = int(ckpt.get("current_epoch", 0))
    return last


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = get_parser().parse_args(argv)
    record = run(args)
    print(f"trained in {record['seconds']['total']:.0f} s; model in {args.out_dir / TRAINER_FOLDER}")
    if not args.no_evaluate:
        import evaluate_demo_model

        return evaluate_demo_model.main(["--model-dir", str(args.out_dir), "--seed", str(args.seed)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
