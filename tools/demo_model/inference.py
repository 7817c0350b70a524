"""Segment a 3D EPI exactly as SCT's ``sct_deepseg sc_epi`` runs nnUNetv2 (REFERENCE §2).

Load once with :func:`load_predictor`, then call :func:`segment` per volume: reorient to RAS+
(permutation/flip only), ``(Z, Y, X)`` network order with spacing reversed,
``predict_single_npy_array``, then back to the input's on-disk order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .orientation import ras_zooms, reorient_from_ras, reorient_to_ras, to_network_order


def load_predictor(trainer_folder: Path, *, n_threads: int = 2):
    """Build an ``nnUNetPredictor`` (CPU, no mirroring) and load the ``fold_all`` final checkpoint.

    Parameters
    ----------
    trainer_folder : Path
        ``.../nnUNetTrainer__nnUNetPlans__3d_fullres``.
    n_threads : int, keyword-only
        torch threads.

    Returns
    -------
    predictor : nnunetv2.inference.predict_from_raw_data.nnUNetPredictor
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(n_threads)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"),
                                verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(trainer_folder), use_folds=("all",),
                                                   checkpoint_name="checkpoint_final.pth")
    return predictor


def segment(predictor, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Segment one 3D volume with a loaded predictor.

    Parameters
    ----------
    predictor : nnUNetPredictor
        From :func:`load_predictor`.
    data : (X, Y, Z) ndarray
        On-disk voxel order, any real dtype.
    affine : (4, 4) ndarray
        Voxel -> scanner RAS+ mm.

    Returns
    -------
    mask : (X, Y, Z) ndarray, uint8
        Label map in the input's on-disk voxel order and grid.
    """
    data_ras, affine_ras, source_ornt = reorient_to_ras(np.asarray(data, dtype=np.float32), affine)
    array, spacing = to_network_order(data_ras, ras_zooms(affine_ras))
    seg_zyx = predictor.predict_single_npy_array(array[None], {"spacing": list(spacing)}, None, None, False)
    seg_ras = np.asarray(seg_zyx).transpose(2, 1, 0)
    return reorient_from_ras(seg_ras, source_ornt).astype(np.uint8)
