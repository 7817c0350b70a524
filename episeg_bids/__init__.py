"""episeg-bids: EPISeg spinal-cord segmentation of EPI-BOLD fMRI as a BIDS App.

The pipeline, one module per stage, in the order the orchestrator (:mod:`episeg_bids.participant`)
runs them:

``layout`` (find runs by BIDS entities) → ``epi`` (temporal mean of a 4D run) → ``model`` (find and
load the nnUNetv2 model once) → ``segment`` (SCT-exact inference) → ``postprocess`` (SCT's
post-processing options) → ``metrics`` → ``derivatives`` (BIDS outputs, written atomically).
"""

__version__ = "0.1.0"

CODE_URL = "https://github.com/episeg-bids/episeg-bids"
