"""Build, train, export and evaluate the episeg-bids DEMO spinal-cord model.

The demo model is a small real nnUNetv2 ``3d_fullres`` model trained by this project so that tests and
the offline demo run the genuine nnUNetv2 inference path. It is NOT for research use: install the real
EPISeg weights (Banerjee et al., Imaging Neuroscience 2025) for any analysis.

Modules, one job each:

``orientation``
    RAS+ reorientation (permutation/flip only) and the (X, Y, Z) on-disk <-> (Z, Y, X) network order.
``acquisition``
    Random EPI acquisition grids and partial-volume sampling of a field through them.
``phantoms``
    Analytic EPI-like neck phantoms (cord, CSF, vertebrae, soft tissue) as fields in mm.
``artefacts``
    Intensity effects of EPI: bias, gamma, Nyquist ghost, dropout, Rician noise.
``augment``
    Heavily augmented "re-acquisitions" of the real Leipzig moco-mean image and mask.
``dataset``
    Writing the nnUNet raw dataset exactly as the predictor will see it.
``plans``
    nnUNetv2 fingerprint, planning (small plans variant) and preprocessing.
``train``
    The short-schedule trainer subclass and the training run.
``export``
    The EPISeg release layout, reduced checkpoint, deterministic zip.
``inference``
    SCT-style inference with a model loaded once.
``evaluate``
    Dice on held-out phantoms and on the held-out real run.
"""

#: nnUNet dataset id and name used in the work directory (never shipped).
DATASET_ID = 901
DATASET_NAME = "Dataset901_EPISegDemo"
#: Name of the foreground label in dataset.json (value 1).
FOREGROUND_LABEL = "spinal_cord"
#: Plans identifier; must match the ``nnUNetTrainer__<plans>__3d_fullres`` folder name.
PLANS_NAME = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
TRAINER_FOLDER = f"nnUNetTrainer__{PLANS_NAME}__{CONFIGURATION}"
