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

Unlike SCT, checkpoints are read as data only (:func:`episeg_bids.checkpoint.load_checkpoint`,
``torch.load(weights_only=True)`` with an explicit allow-list): a checkpoint carrying code is
refused before any of it runs. The network runs with a fixed number of torch threads
(:func:`episeg_bids.cpus.available_cpus` by default), whatever nnunetv2's ``$nnUNet_def_n_proc``
says (:func:`hold_threads`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import _first_line, load_checkpoint
from .cpus import available_cpus
from .errors import ModelError, UsageError

#: The published EPISeg weights (release v0.2 of sct-pipeline/fmri-segmentation, REFERENCE §1).
EPISEG_URL = (
    "https://github.com/sct-pipeline/fmri-segmentation/releases/download/v0.2/"
    "model-fmri-segmentation-v0.2_nnUNetTrainer.zip"
)
#: Name of the folder that ``install-model`` creates under ``$EPISEG_HOME/models``.
EPISEG_NAME = "episeg-v0.2"

CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_best.pth")
#: The trainer of the EPISeg release; other names are accepted (and recorded).
DEFAULT_TRAINER = "nnUNetTrainer"
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


# --- threads --------------------------------------------------------------------------------------


#: Name of the nnunetv2 global that caps torch's threads during prediction.
_NNUNET_CAP = "default_num_processes"


@contextlib.contextmanager
def hold_threads(threads: int) -> Iterator[None]:
    """Run the block with exactly `threads` torch intra-op threads, even inside nnunetv2.

    nnunetv2's ``nnUNetPredictor.predict_logits_from_preprocessed_data`` lowers torch's threads
    to ``min(default_num_processes, torch.get_num_threads())`` while it runs the network, where
    ``default_num_processes`` is a global of its module copied at import from
    ``nnunetv2.configuration`` (``$nnUNet_def_n_proc``, default 8). This sets torch's threads and
    that global (found in the function's own module, wherever nnunetv2 defines it) to `threads`,
    and restores both afterwards, in the calling thread.
    """
    import torch

    cap_globals = _nnunet_cap_globals()
    saved_threads, saved_cap = torch.get_num_threads(), cap_globals.get(_NNUNET_CAP)
    torch.set_num_threads(threads)
    if saved_cap is not None:
        cap_globals[_NNUNET_CAP] = threads
    try:
        yield
    finally:
        if saved_cap is not None:
            cap_globals[_NNUNET_CAP] = saved_cap
        torch.set_num_threads(saved_threads)


def _nnunet_cap_globals() -> dict[str, Any]:
    """Globals of the module that defines ``predict_logits_from_preprocessed_data``."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    return inspect.unwrap(nnUNetPredictor.predict_logits_from_preprocessed_data).__globals__


@functools.cache
def _predictor_class() -> type:
    """``nnUNetPredictor`` whose network always runs with its own ``threads`` (built on first use,
    so importing this module does not import torch)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    class EpisegPredictor(nnUNetPredictor):
        """nnUNetPredictor with ``threads`` torch threads while the network runs (see
        :func:`hold_threads`); everything else is nnunetv2's own."""

        threads: int = 1

        def predict_logits_from_preprocessed_data(self, data):
            with hold_threads(self.threads):
                return super().predict_logits_from_preprocessed_data(data)

    return EpisegPredictor


def predictor_threads(predictor) -> int:
    """Torch threads the network of a predictor from :func:`load_predictor` runs with."""
    return int(predictor.threads)


def describe_predictor(predictor) -> dict[str, Any]:
    """Plain dict for sidecars: what was loaded and how it runs.

    Returns
    -------
    dict
        ``TrainerName`` (from the checkpoint), ``DefaultTrainer`` (False for any trainer other
        than plain ``nnUNetTrainer``; harmless, the network is built from ``plans.json``),
        ``Threads`` (torch threads of the network), ``Device``, ``TestTimeAugmentation``.
    """
    return {
        "TrainerName": predictor.trainer_name,
        "DefaultTrainer": predictor.trainer_name == DEFAULT_TRAINER,
        "Threads": predictor_threads(predictor),
        "Device": str(predictor.device),
        "TestTimeAugmentation": bool(predictor.use_mirroring),
    }


# --- the predictor --------------------------------------------------------------------------------


def network_from_plans(plans_manager, configuration, dataset_json: dict[str, Any], *, initialise: bool = False):
    """The network a configuration of ``plans.json`` describes, built with nnunetv2's own builder
    (``get_network_from_plans``), without deep supervision, as for inference. ``initialise``
    draws nnunetv2's initial weights (for a random-weight benchmark model); otherwise the weights
    are left for a checkpoint to fill."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    return get_network_from_plans(
        configuration.network_arch_class_name,
        configuration.network_arch_init_kwargs,
        configuration.network_arch_init_kwargs_req_import,
        determine_num_input_channels(plans_manager, configuration, dataset_json),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        allow_init=initialise,
        deep_supervision=False,
    )


def load_predictor(spec: ModelSpec, *, device: str = "cpu", tta: bool = False, threads: int | None = None):
    """Build the ``nnUNetPredictor`` once, with SCT's settings.

    ``tile_step_size=0.5, use_gaussian=True, use_mirroring=tta, perform_everything_on_device=False``,
    every fold's weights kept for ensembling (nnunetv2 averages their softmax). The network is
    built from ``plans.json`` (whatever the checkpoint's ``trainer_name``, see
    :func:`describe_predictor`), and checkpoints are read with
    :func:`episeg_bids.checkpoint.load_checkpoint`.

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
        Torch intra-op threads of the network (``--omp-nthreads``); default
        :func:`episeg_bids.cpus.available_cpus`. They hold while the network runs, whatever
        ``$nnUNet_def_n_proc`` says (:func:`hold_threads`); torch's own setting outside
        prediction is left alone. :func:`predictor_threads` returns the value.

    Returns
    -------
    nnunetv2.inference.predict_from_raw_data.nnUNetPredictor
        Initialised, for :func:`episeg_bids.segment.segment_volume`.

    Raises
    ------
    ModelError
        If a checkpoint or the plans cannot be read, or a checkpoint holds anything but data.
    UsageError
        If `threads` is below 1.
    """
    import torch
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    threads = available_cpus() if threads is None else threads
    if threads < 1:
        raise UsageError(f"threads {threads}: the network needs at least 1 CPU thread (--omp-nthreads)")
    dataset_json = _read_json(spec.trainer_folder / "dataset.json")
    plans_manager = PlansManager(_read_json(spec.trainer_folder / "plans.json"))
    checkpoints = [load_checkpoint(path) for path in spec.checkpoint_paths]
    first = checkpoints[0]
    configuration = plans_manager.get_configuration(first["init_args"]["configuration"])
    network = network_from_plans(plans_manager, configuration, dataset_json)
    parameters = [checkpoint["network_weights"] for checkpoint in checkpoints]
    try:
        network.load_state_dict(parameters[0])
    except RuntimeError as err:
        raise ModelError(
            f"{spec.checkpoint_paths[0]} does not fit the network of {spec.trainer_folder / 'plans.json'} "
            f"({_first_line(err)}); the model folder mixes files of different models, reinstall it"
        ) from None
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a notice for every CPU device
        predictor = _predictor_class()(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=tta,
            perform_everything_on_device=False,
            device=torch.device(device),
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
    predictor.threads = int(threads)
    predictor.manual_initialization(
        network, plans_manager, configuration, parameters, dataset_json,
        str(first.get("trainer_name") or "unknown"), first.get("inference_allowed_mirroring_axes"),
    )
    return predictor
