"""The run's options as one frozen object (the CLI builds it; nothing below sees argparse)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Options:
    """Everything a participant or group run needs; paths absolute.

    ``remove_small`` is ``(size, unit)`` with unit ``'vox'`` or ``'mm3'``.
    """

    bids_dir: Path
    output_dir: Path
    analysis_level: str
    work_dir: Path
    participant_labels: tuple[str, ...] | None = None
    session_labels: tuple[str, ...] | None = None
    task_labels: tuple[str, ...] | None = None
    bids_filter_file: Path | None = None
    skip_bids_validation: bool = False
    model_dir: Path | None = None
    device: str = "auto"
    tta: bool = False
    moco: str = "slicewise"
    nprocs: int | None = None
    omp_nthreads: int | None = None
    thr: float | None = None
    largest: bool = False
    fill_holes: bool = False
    remove_small: tuple[float, str] | None = None
    save_probseg: bool = False
    ground_truth: Path | None = None
    overwrite: bool = False
    max_image_bytes: int = 8 * 1024**3
    verbose: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (paths as strings), for sidecars and crash files."""
        return json.loads(json.dumps(asdict(self), default=str))

    def segmentation_options(self) -> dict[str, Any]:
        """The options that change a mask (recorded in sidecars and in the fingerprint)."""
        return {
            "tta": self.tta,
            "moco": self.moco,
            "thr": self.thr,
            "largest": self.largest,
            "fill_holes": self.fill_holes,
            "remove_small": list(self.remove_small) if self.remove_small else None,
        }
