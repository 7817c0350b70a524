"""Read an nnUNetv2 checkpoint as data only, never running code it might hold.

Unlike SCT, checkpoints are read with ``torch.load(weights_only=True)`` and an explicit
allow-list (:func:`checkpoint_safe_globals`: the numpy scalars, dtypes and arrays of nnunetv2's
training log, nothing callable chosen by the file): a checkpoint carrying code is refused before
any of it runs, and the error names what it carried (:func:`load_checkpoint`). A file that loads
must also look like what ``nnUNetTrainer.save_checkpoint`` writes (``network_weights`` and
``init_args``). Importing this module does not import torch.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from .errors import ModelError


def checkpoint_safe_globals() -> list:
    """What ``torch.load(weights_only=True)`` must allow, beyond its defaults, for nnUNetv2.

    ``nnUNetTrainer.save_checkpoint`` writes ``network_weights`` and ``optimizer_state`` (tensors,
    plain values), ``grad_scaler_state`` (plain values or None), ``init_args`` (plans and
    dataset.json as plain values, ``device`` a ``torch.device``), ``trainer_name``,
    ``inference_allowed_mirroring_axes``, ``current_epoch`` (plain values): torch allows all of
    those by default. Only the training log (``logging``) and ``_best_ema`` hold numpy values:
    losses and pseudo-Dice are numpy float scalars (float32 on the CPU with nnunetv2 2.8.1; their
    dtype follows the loss and the network output, so float16 or float64 elsewhere), rebuilt from:

    - ``numpy._core.multiarray.scalar``, also under ``numpy.core.multiarray.scalar``, the name
      numpy 1.x writes (torch matches the name in the file, not the function);
    - ``numpy.dtype``, called to rebuild each scalar's dtype;
    - ``numpy.dtypes.Float16DType``, ``Float32DType``, ``Float64DType``: the classes of those
      dtypes, whose state torch only sets for allowed types;
    - ``numpy.ndarray`` and ``numpy._core.multiarray._reconstruct`` (both numpy names): numpy
      arrays of those dtypes. nnunetv2 2.8.1 logs scalars only; an array is data, no callable
      is reachable from it, and a log that kept one must not make a checkpoint unusable.

    Nothing here runs code chosen by the file: everything else (a payload's ``os.system``,
    ``builtins.eval``, any class) is refused before it is called.
    """
    import numpy as np
    from numpy import dtypes

    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    allowed: list = [np.dtype, dtypes.Float16DType, dtypes.Float32DType, dtypes.Float64DType, np.ndarray]
    for name in ("scalar", "_reconstruct"):
        function = getattr(multiarray, name)
        allowed += [(function, f"numpy.core.multiarray.{name}"), (function, f"numpy._core.multiarray.{name}")]
    return allowed


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read an nnUNetv2 checkpoint without running any code it might hold.

    ``torch.load(weights_only=True)`` with :func:`checkpoint_safe_globals` only.

    Returns
    -------
    dict
        At least ``network_weights`` (name → tensor) and ``init_args`` (with ``configuration``).

    Raises
    ------
    ModelError
        If the file holds anything else (nothing from it is run), is damaged, or is not an
        nnUNetv2 checkpoint.
    """
    import torch

    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            checkpoint = torch.load(path, map_location=torch.device("cpu"), weights_only=True)
    except Exception as err:  # torch raises many types for a damaged file
        refused = _refused_objects(path, err) if isinstance(err, pickle.UnpicklingError) else None
        if refused:
            raise ModelError(
                f"{path} holds objects a model checkpoint does not ({refused}); it was refused and "
                "nothing from it was run: use the published weights (episeg-bids install-model "
                "--sha256 ...) or a checkpoint written by nnUNetv2"
            ) from None
        raise ModelError(f"{path} cannot be loaded ({_first_line(err)}); reinstall the model") from err
    _check_checkpoint(path, checkpoint)
    return checkpoint


def _refused_objects(path: Path, err: pickle.UnpicklingError) -> str | None:
    """What torch's restricted unpickler refused, or None if the error is not a refusal.

    The globals the file names beyond the allow-list (read from its opcodes, nothing is called;
    zip-format checkpoints), else the object named in torch's message.
    """
    import torch

    allowed = {name for entry in checkpoint_safe_globals() for name in _global_names(entry)}
    try:
        foreign = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
    except Exception:  # the legacy (non-zip) format, or a damaged file
        foreign = []
    if foreign:
        return ", ".join(foreign)
    found = re.search(r"GLOBAL (\S+)", str(err)) or re.search(r"WeightsUnpickler error: ([^\n]+)", str(err))
    return found.group(1).strip() if found else None


def _global_names(entry) -> list[str]:
    if isinstance(entry, tuple):
        return [entry[1]]
    return [f"{entry.__module__}.{entry.__qualname__}"]


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _check_checkpoint(path: Path, checkpoint: Any) -> None:
    """ModelError unless `checkpoint` has nnUNetv2's network weights and init args."""
    import torch

    weights = checkpoint.get("network_weights") if isinstance(checkpoint, dict) else None
    init_args = checkpoint.get("init_args") if isinstance(checkpoint, dict) else None
    if (
        not isinstance(weights, dict) or not weights
        or not all(isinstance(t, torch.Tensor) for t in weights.values())
        or not isinstance(init_args, dict) or not isinstance(init_args.get("configuration"), str)
    ):
        raise ModelError(
            f"{path} is not an nnUNetv2 checkpoint (expected a dict with network_weights and "
            "init_args['configuration']); reinstall the model"
        )
