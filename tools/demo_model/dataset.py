"""Write the nnUNet raw training dataset exactly as the predictor will see it.

Every case is reoriented to RAS+ by permutation/flip only (like SCT, REFERENCE §2) before it is
written. nnUNet's default reader (SimpleITK) then returns ``data_ras.transpose(2, 1, 0)`` with the
zooms reversed, i.e. the same ``(Z, Y, X)`` network-order array and spacing that
``predict_single_npy_array`` receives at inference time.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from . import FOREGROUND_LABEL
from .augment import SourceImage
from .cases import Case, phantom_case, real_view_case
from .orientation import reorient_to_ras

#: Offsets added to the base seed; evaluation phantoms use a disjoint range.
TRAIN_PHANTOM_SEED_OFFSET = 100_000
TRAIN_REAL_SEED_OFFSET = 200_000
EVAL_PHANTOM_SEED_OFFSET = 900_000


@dataclass(frozen=True)
class CaseSpec:
    """How to build one case: ``kind`` is "phantom" or "real"; ``seed`` fixes all randomness."""

    name: str
    kind: str
    seed: int


def training_specs(seed: int, n_real: int, n_phantoms: int) -> list[CaseSpec]:
    """Case list for training: ``n_real`` augmented real views and ``n_phantoms`` phantoms."""
    real = [CaseSpec(f"real_{i:04d}", "real", seed + TRAIN_REAL_SEED_OFFSET + i) for i in range(n_real)]
    ph = [CaseSpec(f"phantom_{i:04d}", "phantom", seed + TRAIN_PHANTOM_SEED_OFFSET + i)
          for i in range(n_phantoms)]
    return real + ph


def build_case(spec: CaseSpec, source: SourceImage | None) -> Case:
    """Regenerate the case described by ``spec``."""
    if spec.kind == "phantom":
        return phantom_case(spec.seed)
    if spec.kind == "real" and source is not None:
        return real_view_case(source, spec.seed)
    raise ValueError(f"case {spec.name}: kind {spec.kind!r} needs a source image or is unknown")


def ras_nifti(data: np.ndarray, affine: np.ndarray, dtype: type) -> nib.Nifti1Image:
    """NIfTI image of ``data`` reoriented to RAS+ (permutation/flip only), qform = sform."""
    data_ras, affine_ras, _ = reorient_to_ras(data, affine)
    img = nib.Nifti1Image(np.ascontiguousarray(data_ras).astype(dtype), affine_ras)
    img.set_qform(affine_ras, code=1)
    img.set_sform(affine_ras, code=1)
    return img


_SOURCE: SourceImage | None = None


def _init_worker(source: SourceImage | None, n_threads: int) -> None:
    """Pool initialiser: keep the source image in the worker, limit BLAS threads."""
    global _SOURCE
    _SOURCE = source
    os.environ["OMP_NUM_THREADS"] = str(n_threads)


def _write_one(args: tuple[CaseSpec, str]) -> str:
    """Build one case and write its RAS+ image (``_0000``) and label into the raw folder."""
    spec, raw_dir = args
    case = build_case(spec, _SOURCE)
    raw = Path(raw_dir)
    nib.save(ras_nifti(case.image, case.affine, np.float32), raw / "imagesTr" / f"{spec.name}_0000.nii.gz")
    nib.save(ras_nifti(case.mask, case.affine, np.uint8), raw / "labelsTr" / f"{spec.name}.nii.gz")
    return spec.name


def dataset_json(n_training: int) -> dict:
    """The nnUNet dataset.json of the demo model (EPISeg conventions: one "bold" channel, z-score)."""
    return {
        "channel_names": {"0": "bold"},
        "labels": {"background": 0, FOREGROUND_LABEL: 1},
        "numTraining": n_training,
        "file_ending": ".nii.gz",
        "name": "episeg-bids DEMO spinal cord model (not for research use)",
        "description": "Synthetic EPI phantoms and augmented views of one real EPI (sub-leipzigR01).",
    }


def write_raw_dataset(raw_dir: Path, specs: list[CaseSpec], source: SourceImage | None,
                      *, n_processes: int = 2) -> None:
    """Generate all cases and write them as an nnUNet raw dataset.

    Parameters
    ----------
    raw_dir : Path
        ``$nnUNet_raw/DatasetXXX_Name``; created if needed.
    specs : list of CaseSpec
        The cases; each is built from its own seed, so the result does not depend on process order.
    source : SourceImage or None
        Real image and mask for "real" cases.
    n_processes : int, keyword-only
        Worker processes.
    """
    for sub in ("imagesTr", "labelsTr"):
        (raw_dir / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(s, str(raw_dir)) for s in specs]
    with ProcessPoolExecutor(n_processes, initializer=_init_worker, initargs=(source, 1)) as pool:
        for _ in pool.map(_write_one, jobs, chunksize=4):
            pass
    (raw_dir / "dataset.json").write_text(json.dumps(dataset_json(len(specs)), indent=2, sort_keys=True))
