"""Find an nnUNetv2 model folder and load it once, the way Spinal Cord Toolbox does.

A model folder is what nnUNetv2 writes after training and what the EPISeg release zip holds
(REFERENCE §1)::

    <Trainer>__<Plans>__<configuration>/
        dataset.json  plans.json
        fold_all/checkpoint_final.pth      (or fold_0 ... fold_4, or checkpoint_best.pth)

Discovery follows ``sct_deepseg`` (SCT 7.x): folds are ``'all'`` when the only fold folder is
``fold_all``, otherwise every ``fold_N``; the checkpoint is ``checkpoint_final.pth``, falling back
to ``checkpoint_best.pth``. The network is built from ``plans.json`` with nnunetv2's own network
builder and handed to ``nnUNetPredictor.manual_initialization``: the same network, weights and
predictor settings as ``initialize_from_trained_model_folder``, but independent of the trainer's
class name (looking that class up imports every trainer module, REFERENCE §6).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelError

#: The published EPISeg weights (release v0.2 of sct-pipeline/fmri-segmentation, REFERENCE §1).
EPISEG_URL = (
    "https://github.com/sct-pipeline/fmri-segmentation/releases/download/v0.2/"
    "model-fmri-segmentation-v0.2_nnUNetTrainer.zip"
)
#: Name of the folder that ``install-model`` creates under ``$EPISEG_HOME/models``.
EPISEG_NAME = "episeg-v0.2"

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
_FOLD_RE = re.compile(r"^fold_(\d+|all)$")

INSTALL_HINT = (
    "install the EPISeg weights with 'episeg-bids install-model' (needs internet), or pass "
    "--model-dir / set EPISEG_MODEL_DIR to an nnUNetv2 model folder"
)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to load a model and to describe it in sidecars.

    Attributes
    ----------
    trainer_folder : Path
        The ``<Trainer>__<Plans>__<configuration>`` folder.
    folds : tuple of str
        ``('all',)`` or the fold numbers as strings, e.g. ``('0', '1', '2', '3', '4')``.
    checkpoint_name : str
        ``checkpoint_final.pth`` or ``checkpoint_best.pth``.
    checkpoint_sha256 : dict
        ``{'fold_all': '<hex>'}``: checksum of each checkpoint file used.
    source : dict
        Where the model came from: ``source.json`` written by ``install-model`` (URL, archive
        sha256), or ``{'path': ...}`` for a folder given directly.
    is_demo : bool
        True for the project's small demo model (not the published EPISeg weights).
    """

    trainer_folder: Path
    folds: tuple[str, ...]
    checkpoint_name: str
    checkpoint_sha256: dict[str, str]
    source: dict[str, Any]
    is_demo: bool

    @property
    def checkpoint_paths(self) -> list[Path]:
        """Checkpoint file of each fold, in fold order."""
        return [self.trainer_folder / f"fold_{f}" / self.checkpoint_name for f in self.folds]

    def describe(self) -> dict[str, Any]:
        """Plain dict for sidecars: folder, folds, checkpoint and checksums, source, demo flag."""
        return {
            "Name": self.trainer_folder.name,
            "Path": str(self.trainer_folder),
            "Folds": list(self.folds),
            "Checkpoint": self.checkpoint_name,
            "CheckpointSHA256": dict(self.checkpoint_sha256),
            "Source": dict(self.source),
            "URL": self.source.get("url"),
            "IsDemoModel": self.is_demo,
        }


def default_home() -> Path:
    """Cache folder of episeg-bids: ``$EPISEG_HOME``, else ``$XDG_CACHE_HOME/episeg-bids``,
    else ``~/.cache/episeg-bids``."""
    if os.environ.get("EPISEG_HOME"):
        return Path(os.environ["EPISEG_HOME"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "episeg-bids"


def default_model_dir() -> Path:
    """Where ``install-model`` puts the EPISeg weights by default."""
    return default_home() / "models" / EPISEG_NAME


def resolve_model_dir(model_dir: str | os.PathLike | None) -> Path:
    """The model folder to use: ``model_dir``, else ``$EPISEG_MODEL_DIR``, else the default
    install location of the EPISeg weights (:func:`default_model_dir`)."""
    if model_dir:
        return Path(model_dir).expanduser()
    if os.environ.get("EPISEG_MODEL_DIR"):
        return Path(os.environ["EPISEG_MODEL_DIR"]).expanduser()
    return default_model_dir()


def _is_trainer_folder(path: Path) -> bool:
    return (path / "dataset.json").is_file() and (path / "plans.json").is_file()


def find_trainer_folder(model_dir: Path) -> Path:
    """Return the trainer folder inside ``model_dir`` (or ``model_dir`` itself).

    Looks at ``model_dir`` and up to two levels below it for a folder holding both
    ``dataset.json`` and ``plans.json``, so a release zip extracted with or without an extra
    top-level folder is found.

    Raises
    ------
    ModelError
        If there is no such folder, or more than one.
    """
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} does not exist; {INSTALL_HINT}")
    if _is_trainer_folder(model_dir):
        return model_dir
    found = sorted(
        p for pattern in ("*", "*/*") for p in model_dir.glob(pattern)
        if p.is_dir() and _is_trainer_folder(p)
    )
    if not found:
        raise ModelError(
            f"{model_dir} holds no nnUNetv2 trainer folder (a folder with dataset.json and "
            f"plans.json); {INSTALL_HINT}"
        )
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(model_dir)) for p in found)
        raise ModelError(f"{model_dir} holds several trainer folders ({names}); pass one with --model-dir")
    return found[0]


def find_folds(trainer_folder: Path) -> tuple[str, ...]:
    """Folds to ensemble, as SCT chooses them: ``('all',)`` when the only fold folder is
    ``fold_all``, otherwise every ``fold_N`` in numerical order.

    Raises
    ------
    ModelError
        If the folder has no fold folder.
    """
    names = [m.group(1) for p in trainer_folder.iterdir() if p.is_dir() and (m := _FOLD_RE.match(p.name))]
    numbered = sorted((n for n in names if n != "all"), key=int)
    if numbered:
        return tuple(numbered)
    if "all" in names:
        return ("all",)
    raise ModelError(f"{trainer_folder} has no fold_all or fold_N folder; the model is incomplete, reinstall it")


def find_checkpoint_name(trainer_folder: Path, folds: tuple[str, ...]) -> str:
    """``checkpoint_final.pth`` if every fold has it, else ``checkpoint_best.pth``.

    Raises
    ------
    ModelError
        If some fold has neither.
    """
    for name in CHECKPOINT_NAMES:
        if all((trainer_folder / f"fold_{f}" / name).is_file() for f in folds):
            return name
    raise ModelError(
        f"{trainer_folder}: fold folders {', '.join('fold_' + f for f in folds)} lack "
        f"{' and '.join(CHECKPOINT_NAMES)}; the model is incomplete, reinstall it"
    )


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{path} is not readable JSON ({err}); reinstall the model") from err


def _source_of(model_dir: Path, trainer_folder: Path) -> dict[str, Any]:
    """``source.json`` written by install-model (next to or above the trainer folder)."""
    for folder in (trainer_folder, trainer_folder.parent, model_dir):
        if (folder / "source.json").is_file():
            return _read_json(folder / "source.json")
    return {"path": str(trainer_folder)}


def _is_demo(trainer_folder: Path) -> bool:
    """The demo model says so in a ``model_card.json`` next to or above its trainer folder."""
    for folder in (trainer_folder, trainer_folder.parent):
        card = folder / "model_card.json"
        if card.is_file():
            return bool(_read_json(card).get("demo", False))
    return False


def locate_model(model_dir: str | os.PathLike | None = None) -> ModelSpec:
    """Find trainer folder, folds and checkpoint of the model to use; nothing is loaded.

    Parameters
    ----------
    model_dir : path or None
        ``--model-dir``; None means ``$EPISEG_MODEL_DIR`` or the installed EPISeg weights.

    Raises
    ------
    ModelError
        With the fix (install-model / --model-dir) when no usable model is found.
    """
    root = resolve_model_dir(model_dir)
    trainer_folder = find_trainer_folder(root)
    folds = find_folds(trainer_folder)
    checkpoint_name = find_checkpoint_name(trainer_folder, folds)
    sums = {f"fold_{f}": sha256_file(trainer_folder / f"fold_{f}" / checkpoint_name) for f in folds}
    return ModelSpec(
        trainer_folder=trainer_folder.resolve(),
        folds=folds,
        checkpoint_name=checkpoint_name,
        checkpoint_sha256=sums,
        source=_source_of(root, trainer_folder),
        is_demo=_is_demo(trainer_folder),
    )


def image_orientation(spec: ModelSpec) -> tuple[str, str, str]:
    """Orientation the network expects, as nibabel axis codes (default ``('R', 'A', 'S')``).

    SCT reorients to "LPI" (its name for RAS+) unless the model's ``dataset.json`` has an
    ``image_orientation`` key, written in SCT's convention where each letter names the side
    the axis comes *from* (so SCT "LPI" is nibabel ``('R', 'A', 'S')``).
    """
    dataset = _read_json(spec.trainer_folder / "dataset.json")
    sct_code = dataset.get("image_orientation")
    if not sct_code:
        return ("R", "A", "S")
    opposite = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}
    try:
        return tuple(opposite[c] for c in str(sct_code).upper())  # type: ignore[return-value]
    except KeyError:
        raise ModelError(
            f"{spec.trainer_folder / 'dataset.json'}: image_orientation {sct_code!r} is not an "
            "orientation such as 'LPI'"
        ) from None


def select_device(device: str) -> str:
    """``'cpu'`` or ``'cuda'``: ``'auto'`` means CUDA when torch sees a GPU.

    Raises
    ------
    ModelError
        If ``'cuda'`` is asked for and torch sees no GPU.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "--device cuda was given but torch sees no GPU (torch "
            f"{torch.__version__}); use --device cpu, or run the container with --gpus all / --nv"
        )
    return device


def load_predictor(spec: ModelSpec, *, device: str = "cpu", tta: bool = False, threads: int | None = None):
    """Build the ``nnUNetPredictor`` once, with SCT's settings.

    ``tile_step_size=0.5, use_gaussian=True, use_mirroring=tta, perform_everything_on_device=False``,
    every fold's weights kept for ensembling (nnunetv2 averages their softmax).

    Parameters
    ----------
    spec : ModelSpec
        From :func:`locate_model`.
    device : {'cpu', 'cuda'}
        Already resolved by :func:`select_device`.
    tta : bool
        Test-time augmentation by mirroring along the axes the checkpoint allows (as SCT's
        ``-test-time-aug``); about 8× slower.
    threads : int, optional
        Torch intra-op threads (``--omp-nthreads``).

    Raises
    ------
    ModelError
        If a checkpoint or the plans cannot be read.
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if threads:
        torch.set_num_threads(threads)
    dataset_json = _read_json(spec.trainer_folder / "dataset.json")
    plans_manager = PlansManager(_read_json(spec.trainer_folder / "plans.json"))
    parameters = []
    for path in spec.checkpoint_paths:
        try:
            checkpoint = torch.load(path, map_location=torch.device("cpu"), weights_only=False)
        except Exception as err:  # torch raises many types for a damaged file
            raise ModelError(f"{path} cannot be loaded ({err}); reinstall the model") from err
        parameters.append(checkpoint["network_weights"])
        if len(parameters) == 1:
            first = checkpoint
    configuration = plans_manager.get_configuration(first["init_args"]["configuration"])
    network = get_network_from_plans(
        configuration.network_arch_class_name,
        configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import,
        determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        allow_init=False,
        deep_supervision=False,
    )
    network.load_state_dict(parameters[0])
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice for every CPU device
        predictor = nnUNetPredictor(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=tta,
            perform_everything_on_device=False,
            device=torch.device(device),
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
    predictor.manual_initialization(
        network, plans_manager, configuration, parameters, dataset_json,
        first["trainer_name"], first.get("inference_allowed_mirroring_axes"),
    )
    return predictor
