"""Shared fixtures: the example BIDS dataset of real EPI and the project's demo model (and a quick
prediction with it).

Tests read no data outside the repository: the real images live in tests/data (see tests/data/README.md).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
EXAMPLE = DATA / "ds-example"
DEMO_MODEL = REPO / "models" / "demo"
LEIPZIG = EXAMPLE / "sub-leipzigR01" / "func" / "sub-leipzigR01_task-rest_rec-MoCoMean_bold.nii.gz"
LEIPZIG_MASK = (EXAMPLE / "derivatives" / "label" / "sub-leipzigR01" / "func"
                / "sub-leipzigR01_task-rest_desc-spinalcordmask.nii.gz")
SCT_RUN = EXAMPLE / "sub-errsm30" / "ses-01" / "func" / "sub-errsm30_ses-01_task-rest_run-01_bold.nii.gz"


@pytest.fixture
def example_bids(tmp_path: Path) -> Path:
    """A writable copy of the example dataset (without its derivatives folder)."""
    target = tmp_path / "bids"
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns("derivatives"))
    return target


@pytest.fixture(scope="session")
def predictor():
    """The demo model's nnUNetPredictor, built once for the whole session."""
    from episeg_bids import model

    return model.load_predictor(model.locate_model(DEMO_MODEL), device="cpu", threads=2)


def small_mask(predictor):
    """Mask (ndarray) of the first volume of the real 4D SCT run (68x68x6): a quick prediction."""
    import nibabel as nib
    import numpy as np

    from episeg_bids.segment import segment_volume

    img = nib.load(SCT_RUN)
    return segment_volume(predictor, np.asarray(img.dataobj[..., 0], dtype=np.float32), img.affine,
                          img.header.get_zooms()[:3]).mask


def run_app(*args: str | Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``run.py`` as a user would, in a subprocess; returns the completed process."""
    command = [sys.executable, str(REPO / "run.py"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
