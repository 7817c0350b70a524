"""Train the demo model with nnUNet's own trainer, a short schedule, on the CPU.

The trainer subclass is instantiated directly in Python (looking a trainer up by name imports every
trainer module, and some need timm/torchvision, which cannot load with the CPU torch; REFERENCE §6).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np

#: Where nnunetv2 finds its folders; set before nnunetv2 is imported.
ENV_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def configure_environment(work_dir: Path, *, n_threads: int = 2) -> dict[str, Path]:
    """Point nnunetv2 at ``work_dir`` and limit threads/processes. Call before importing nnunetv2.

    Parameters
    ----------
    work_dir : Path
        Work directory; ``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results`` are made in it.
    n_threads : int, keyword-only
        torch/BLAS threads and nnUNet's default process count (``nnUNet_def_n_proc``).
    Returns
    -------
    folders : dict of str to Path
        The three nnUNet folders.
    """
    folders = {name: work_dir / name for name in ENV_FOLDERS}
    for name, path in folders.items():
        path.mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(path)
    os.environ["nnUNet_def_n_proc"] = str(n_threads)
    os.environ["nnUNet_n_proc_DA"] = str(n_threads)  # planning needs >= 1; see train()
    os.environ["nnUNet_compile"] = "f"
    os.environ.setdefault("OMP_NUM_THREADS", str(n_threads))
    import torch

    torch.set_num_threads(n_threads)
    return folders


def seed_everything(seed: int) -> None:
    """Seed Python, numpy's global state (used by nnUNet's data loader) and torch."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_trainer_class():
    """The short-schedule ``nnUNetTrainer`` subclass (imports nnunetv2)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class DemoTrainer(nnUNetTrainer):
        """nnUNetTrainer with a short schedule and anatomy-preserving augmentation.

        Rotation is limited to +-30 degrees in-plane (the network sees RAS+ images, so anterior is
        always up) and mirroring to the S-I (network axis 0) and L-R (network axis 2) axes; an A-P
        flip would put the vertebral body behind the cord.
        """

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            rot, dummy_2d, initial, mirror = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

            rot = (-30.0 / 180 * np.pi, 30.0 / 180 * np.pi)
            patch = self.configuration_manager.patch_size
            initial = get_patch_size(patch, rot, rot, rot, (0.85, 1.25))
            if dummy_2d:
                initial[0] = patch[0]
            mirror = (0, 2)
            self.inference_allowed_mirroring_axes = mirror
            return rot, dummy_2d, initial, mirror

        def plot_network_architecture(self):
            """Skipped: needs hiddenlayer/graphviz, irrelevant here."""

    return DemoTrainer


def train(plans: dict, dataset_json: dict, *, epochs: int, iterations_per_epoch: int,
          seed: int, val_iterations: int = 4, n_proc_da: int = 0) -> Path:
    """Train ``3d_fullres`` fold ``all`` and return the path of ``checkpoint_final.pth``.

    Parameters
    ----------
    plans, dataset_json : dict
        As written by :func:`demo_model.plans.plan_and_preprocess`.
    epochs, iterations_per_epoch : int, keyword-only
        Schedule (nnUNet's default is 1000 x 250).
    seed : int, keyword-only
        Seeds torch and numpy before the trainer is built.
    val_iterations : int, keyword-only
        Pseudo-Dice batches per epoch (logging only).
    n_proc_da : int, keyword-only
        Data-augmentation worker processes (``nnUNet_n_proc_DA``); 0 runs augmentation in the main
        process, which keeps the whole run reproducible for a given seed.
    """
    import torch

    os.environ["nnUNet_n_proc_DA"] = str(n_proc_da)
    seed_everything(seed)
    plans = {**plans, "continue_training": False}  # popped by nnUNetTrainer.__init__
    trainer = make_trainer_class()(plans, "3d_fullres", "all", dataset_json, device=torch.device("cpu"))
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations_per_epoch
    trainer.num_val_iterations_per_epoch = val_iterations
    trainer.save_every = 10**9
    trainer.run_training()
    return Path(trainer.output_folder) / "checkpoint_final.pth"
