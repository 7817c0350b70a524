"""Write the trained model in the EPISeg release layout, and its deterministic zip.

Layout (as in ``model-fmri-segmentation-v0.2_nnUNetTrainer.zip``)::

    nnUNetTrainer__nnUNetPlans__3d_fullres/
        dataset.json
        plans.json
        fold_all/checkpoint_final.pth

The checkpoint keeps only what ``nnUNetPredictor.initialize_from_trained_model_folder`` reads:
``network_weights`` (fp16 unless asked otherwise), ``init_args``, ``trainer_name`` (always
"nnUNetTrainer", so the class lookup stays on the plain trainer) and
``inference_allowed_mirroring_axes``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

#: Fixed timestamp of every zip entry (the zip format's epoch, 1980-01-01 00:00:00).
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def _convert_shared(state_dict: dict, *, fp16: bool) -> dict:
    """Copy (and maybe halve) tensors, keeping aliases shared.

    PlainConvUNet's state dict names each tensor up to four times (``encoder.*`` and
    ``decoder.encoder.*``, ``convs.N.conv`` and ``convs.N.all_modules.0``); torch.save stores a shared
    tensor once, so the aliases must stay one tensor after conversion or the file grows fourfold.
    """
    converted: dict[tuple, object] = {}
    out = {}
    for key, tensor in state_dict.items():
        ident = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if ident not in converted:
            t = tensor.detach()
            converted[ident] = (t.half() if fp16 and t.is_floating_point() else t).clone()
        out[key] = converted[ident]
    return out


def reduce_checkpoint(checkpoint: dict, *, fp16: bool = True) -> dict:
    """Keep only the inference keys of an nnUNet training checkpoint.

    Parameters
    ----------
    checkpoint : dict
        As saved by ``nnUNetTrainer.save_checkpoint``.
    fp16 : bool, keyword-only
        Store floating-point weights as float16 (``load_state_dict`` casts them back to float32).

    Returns
    -------
    reduced : dict
        ``network_weights``, ``init_args`` (plans, configuration, fold, dataset_json, device "cpu"),
        ``trainer_name`` = "nnUNetTrainer", ``inference_allowed_mirroring_axes``.
    """
    import torch

    weights = _convert_shared(checkpoint["network_weights"], fp16=fp16)
    init = checkpoint["init_args"]
    plans = {k: v for k, v in init["plans"].items() if k != "continue_training"}
    return {
        "network_weights": weights,
        "init_args": {"plans": plans, "configuration": init["configuration"], "fold": init["fold"],
                      "dataset_json": init["dataset_json"], "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": checkpoint["inference_allowed_mirroring_axes"],
    }


def _write_json(path: Path, obj: dict) -> None:
    """JSON with 4-space indent and a final newline (stable, diffable)."""
    path.write_text(json.dumps(obj, indent=4) + "\n")


def write_release_folder(dest_parent: Path, folder_name: str, plans: dict, dataset_json: dict,
                         checkpoint: dict) -> Path:
    """Write the trainer folder atomically (build beside it, then swap).

    Parameters
    ----------
    dest_parent : Path
        Directory receiving ``folder_name`` (e.g. ``models/demo``).
    folder_name : str
        ``nnUNetTrainer__nnUNetPlans__3d_fullres``.
    plans, dataset_json : dict
        Contents of plans.json and dataset.json.
    checkpoint : dict
        Reduced checkpoint (:func:`reduce_checkpoint`).

    Returns
    -------
    folder : Path
        The written trainer folder.
    """
    import torch

    dest_parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=dest_parent))
    tmp.chmod(0o755)
    (tmp / "fold_all").mkdir()
    _write_json(tmp / "plans.json", plans)
    _write_json(tmp / "dataset.json", dataset_json)
    buf = io.BytesIO()
    torch.save(checkpoint, buf)
    (tmp / "fold_all" / "checkpoint_final.pth").write_bytes(buf.getvalue())
    final = dest_parent / folder_name
    old = dest_parent / f".old-{folder_name}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def write_deterministic_zip(folder: Path, zip_path: Path) -> Path:
    """Zip ``folder`` as one top-level directory, sorted entries, fixed timestamps and permissions.

    Parameters
    ----------
    folder : Path
        The trainer folder; its name becomes the zip's only top-level entry.
    zip_path : Path
        Output file, replaced atomically.

    Returns
    -------
    zip_path : Path
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    dirs = sorted({folder} | {p.parent for p in files})
    tmp = zip_path.with_name(zip_path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        entries = [(d, True) for d in dirs] + [(f, False) for f in files]
        for path, is_dir in sorted(entries, key=lambda e: e[0].relative_to(folder.parent).as_posix()):
            arc = path.relative_to(folder.parent).as_posix() + ("/" if is_dir else "")
            info = zipfile.ZipInfo(arc, date_time=ZIP_DATE_TIME)
            info.create_system = 3  # unix, so the permission bits below are honoured
            info.external_attr = ((0o40755 if is_dir else 0o100644) << 16) | (0x10 if is_dir else 0)
            info.compress_type = zipfile.ZIP_STORED if is_dir else zipfile.ZIP_DEFLATED
            zf.writestr(info, b"" if is_dir else path.read_bytes())
    os.replace(tmp, zip_path)
    return zip_path
