"""nnUNetv2 fingerprint, a small plans variant, and preprocessing, through nnunetv2's own code.

The plans keep nnUNet's default planner for everything (normalisation, resampling functions,
transpose, network class) and replace only the ``3d_fullres`` target spacing (5 x 1 x 1 mm, network
order Z, Y, X), the patch size (16 x 64 x 64) and the feature widths, so the model is small enough to
ship and train on a CPU. The 2d configuration is dropped.

nnunetv2 reads ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` when it is imported: the
caller must set them first (see :func:`demo_model.train.configure_environment`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TARGET_SPACING_MM = (5.0, 1.0, 1.0)  # network order (Z, Y, X)
PATCH_SIZE = (16, 64, 64)  # network order (Z, Y, X)


def _make_planner_class(patch_size: tuple[int, int, int], features: tuple[int, ...], batch_size: int):
    """Subclass of nnUNet's ExperimentPlanner with a fixed patch and feature widths (imports nnunetv2)."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

    class DemoPlanner(ExperimentPlanner):
        """Default planner; 3d_fullres patch, topology and widths overridden for a CPU-sized model."""

        def get_plans_for_configuration(self, spacing, median_shape, data_identifier,
                                        approximate_n_voxels_dataset, _cache):
            plan = super().get_plans_for_configuration(spacing, median_shape, data_identifier,
                                                       approximate_n_voxels_dataset, _cache)
            if len(spacing) != 3:
                return plan
            _, strides, kernels, patch, _ = get_pool_and_conv_props(
                spacing, patch_size, self.UNet_featuremap_min_edge_length, 999999)
            n_stages = len(strides)
            if n_stages != len(features):
                raise ValueError(f"patch {patch_size} at spacing {list(spacing)} gives {n_stages} stages; "
                                 f"features {features} has {len(features)}")
            arch = plan["architecture"]["arch_kwargs"]
            arch.update({"n_stages": n_stages, "features_per_stage": tuple(features),
                         "kernel_sizes": kernels, "strides": strides,
                         "n_conv_per_stage": self.UNet_blocks_per_stage_encoder[:n_stages],
                         "n_conv_per_stage_decoder": self.UNet_blocks_per_stage_decoder[:n_stages - 1]})
            plan["patch_size"] = tuple(int(v) for v in patch)
            plan["batch_size"] = batch_size
            return plan

    return DemoPlanner


def plan_and_preprocess(dataset_id: int, preprocessed_dir: Path, plans_name: str, *,
                        features: tuple[int, ...], batch_size: int = 2, n_processes: int = 2) -> dict:
    """Fingerprint, plan (small variant) and preprocess ``3d_fullres``.

    Parameters
    ----------
    dataset_id : int
        nnUNet dataset id (raw dataset already written).
    preprocessed_dir : Path
        ``$nnUNet_preprocessed/DatasetXXX_Name``.
    plans_name : str
        Plans identifier (file ``<plans_name>.json``), e.g. "nnUNetPlans".
    features : tuple of int, keyword-only
        Feature maps per encoder stage (5 stages for patch 16x64x64 at 5x1x1 mm).
    batch_size : int, keyword-only
        Training batch size written into the plans.
    n_processes : int, keyword-only
        Worker processes for fingerprinting and preprocessing.

    Returns
    -------
    plans : dict
        The plans as saved.
    """
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    DatasetFingerprintExtractor(dataset_id, n_processes, verbose=False).run(overwrite_existing=True)
    planner_cls = _make_planner_class(PATCH_SIZE, features, batch_size)
    planner = planner_cls(dataset_id, plans_name=plans_name,
                          overwrite_target_spacing=[float(v) for v in TARGET_SPACING_MM])
    plans = planner.plan_experiment()
    plans["configurations"] = {"3d_fullres": plans["configurations"]["3d_fullres"]}
    plans_file = preprocessed_dir / f"{plans_name}.json"
    plans_file.write_text(json.dumps(plans, indent=4, default=_json_default))
    plans = json.loads(plans_file.read_text())
    DefaultPreprocessor(verbose=False).run(dataset_id, "3d_fullres", plans_name, num_processes=n_processes)
    return plans


def _json_default(obj):
    """JSON encoder for numpy scalars/arrays left in nnUNet's plans."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj)}")
