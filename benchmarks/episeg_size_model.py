#!/usr/bin/env python3
"""Build an nnUNetv2 model folder with the size of EPISeg's network and random weights.

For benchmarks only: the masks it gives are meaningless, but its run time and memory are those of
the published EPISeg model (REFERENCE §6: PlainConvUNet, 6 stages, 32→320 features, patch
24×128×128, ≈ 30 M parameters). The folder has the layout of the EPISeg release, so
``episeg_bids.model.locate_model(folder)`` and ``load_predictor(spec, threads=2)`` load it::

    <folder>/nnUNetTrainer__nnUNetPlans__3d_fullres/
        dataset.json  plans.json  fold_all/checkpoint_final.pth

The plans start from the demo model's ``plans.json`` (same keys, same preprocessing: z-score,
cubic in-plane / nearest-along-z resampling) with the architecture, patch and target spacing
(5×1×1 mm as z, y, x) replaced. The checkpoint holds only ``network_weights``, ``init_args``,
``trainer_name`` ("nnUNetTrainer") and ``inference_allowed_mirroring_axes``.

    .venv/bin/python benchmarks/episeg_size_model.py /tmp/episeg_size   # writes the folder
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_TRAINER = REPO / "models" / "demo" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__3d_fullres"
CONFIGURATION = "3d_fullres"

#: Network of EPISeg's size: 6 stages; (z, y, x) kernels and strides as nnUNet plans them for a
#: 24×128×128 patch at 5×1×1 mm (in-plane first, z pooled once the spacing is isotropic enough).
FEATURES = [32, 64, 128, 256, 320, 320]
KERNELS = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]
STRIDES = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
PATCH_ZYX = [24, 128, 128]
SPACING_ZYX_MM = [5.0, 1.0, 1.0]


def episeg_size_plans(features: list[int] = FEATURES) -> dict:
    """The demo model's plans with EPISeg's architecture, patch size and target spacing
    (``features``: the features per stage, EPISeg's by default)."""
    plans = json.loads((DEMO_TRAINER / "plans.json").read_text())
    plans["dataset_name"] = "Dataset902_EPISegSizeBenchmark"
    plans["experiment_planner_used"] = "benchmarks/episeg_size_model.py"
    config = plans["configurations"][CONFIGURATION]
    config["patch_size"] = list(PATCH_ZYX)
    config["spacing"] = list(SPACING_ZYX_MM)
    config["normalization_schemes"] = ["ZScoreNormalization"]
    config["use_mask_for_norm"] = [False]
    kwargs = config["architecture"]["arch_kwargs"]
    n_stages = len(FEATURES)
    if len(features) != n_stages:
        raise ValueError(f"features must give {n_stages} stages, got {features}")
    kwargs.update(
        n_stages=n_stages,
        features_per_stage=list(features),
        kernel_sizes=copy.deepcopy(KERNELS),
        strides=copy.deepcopy(STRIDES),
        n_conv_per_stage=[2] * n_stages,
        n_conv_per_stage_decoder=[2] * (n_stages - 1),
    )
    return plans


def episeg_size_dataset_json() -> dict:
    """``dataset.json`` as EPISeg's conversion script writes it: one "bold" channel, 2 labels."""
    return {
        "channel_names": {"0": "bold"},
        "labels": {"background": 0, "bold": 1},
        "file_ending": ".nii.gz",
        "numTraining": 0,
        "name": "EPISeg-size network with RANDOM weights (benchmarks only, not for segmentation)",
    }


def build_episeg_size_model(folder: Path, *, seed: int = 0, features: list[int] = FEATURES) -> Path:
    """Write a complete nnUNetv2 model folder of EPISeg's size with random weights.

    Parameters
    ----------
    folder : Path
        Created if needed; the trainer folder is written inside it (an existing one is overwritten).
    seed : int, keyword-only
        Seed of torch's generator for the random initial weights.
    features : list of int, keyword-only
        Features per stage (6 values); EPISeg's by default. Fewer features give the same
        architecture, patch and pipeline with a cheaper network (a stand-in for a GPU).

    Returns
    -------
    trainer_folder : Path
        ``folder / 'nnUNetTrainer__nnUNetPlans__3d_fullres'``; pass ``folder`` (or this) to
        ``episeg_bids.model.locate_model``.
    """
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from episeg_bids.model import network_from_plans

    plans = episeg_size_plans(features)
    dataset_json = episeg_size_dataset_json()
    manager = PlansManager(plans)
    configuration = manager.get_configuration(CONFIGURATION)
    torch.manual_seed(seed)
    network = network_from_plans(manager, configuration, dataset_json, initialise=True)
    trainer_folder = Path(folder) / TRAINER_FOLDER
    (trainer_folder / "fold_all").mkdir(parents=True, exist_ok=True)
    (trainer_folder / "plans.json").write_text(json.dumps(plans, indent=4) + "\n")
    (trainer_folder / "dataset.json").write_text(json.dumps(dataset_json, indent=4) + "\n")
    checkpoint = {
        "network_weights": network.state_dict(),
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": "all",
                      "dataset_json": dataset_json, "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(checkpoint, trainer_folder / "fold_all" / "checkpoint_final.pth")
    return trainer_folder


def count_parameters(trainer_folder: Path) -> int:
    """Number of distinct weights in the checkpoint (aliased tensors counted once)."""
    import torch

    weights = torch.load(trainer_folder / "fold_all" / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["network_weights"]
    seen = {t.data_ptr(): t.numel() for t in weights.values()}
    return int(sum(seen.values()))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUTPUT_FOLDER")
    built = build_episeg_size_model(Path(sys.argv[1]))
    size_mb = (built / "fold_all" / "checkpoint_final.pth").stat().st_size / 2**20
    print(f"{built}: {count_parameters(built) / 1e6:.1f} M parameters, checkpoint {size_mb:.0f} MB")
