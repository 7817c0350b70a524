"""Checkpoints are read as data, never run: the demo checkpoint and real nnUNetTrainer checkpoints
load and predict as the demo model; a checkpoint carrying code is refused before any of it runs."""

import builtins
import io
import json
import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import DEMO_MODEL, LEIPZIG, small_mask
from episeg_bids import model
from episeg_bids.checkpoint import load_checkpoint
from episeg_bids.errors import ModelError
from episeg_bids.segment import segment_volume

DEMO_TRAINER = model.find_trainer_folder(DEMO_MODEL)


def leipzig_mask(predictor) -> np.ndarray:
    img = nib.load(LEIPZIG)
    return segment_volume(predictor, img.get_fdata(dtype=np.float32), img.affine, img.header.get_zooms()[:3]).mask


@pytest.fixture(scope="module")
def demo_leipzig_mask(predictor) -> np.ndarray:
    return leipzig_mask(predictor)


def copy_demo(folder):
    """The demo trainer folder with an empty fold_all (tests write their own checkpoint)."""
    shutil.copytree(DEMO_TRAINER, folder, ignore=shutil.ignore_patterns("*.pth"))
    return folder


@pytest.fixture(scope="module")
def full_checkpoints(tmp_path_factory):
    """Two model folders whose checkpoints nnunetv2's own nnUNetTrainer wrote after one real epoch.

    The trainer is built from the demo model's plans.json and dataset.json, trained for one step on
    a random batch with a gradient scaler, validated, and its epoch closed through its own hooks (so
    the optimizer has momentum buffers, the scaler a state and the log numpy floats); then the demo weights are put into its
    network and ``save_checkpoint`` writes ``fold_all/checkpoint_final.pth``. The second folder's
    checkpoint comes from a subclass, so its ``trainer_name`` is not ``nnUNetTrainer``.
    """
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    root = tmp_path_factory.mktemp("full")
    plans = json.loads((DEMO_TRAINER / "plans.json").read_text())
    dataset_json = json.loads((DEMO_TRAINER / "dataset.json").read_text())
    # initialize() infers the dataset class from the file endings of the preprocessed folder
    preprocessed = root / "pre" / plans["dataset_name"] / plans["configurations"]["3d_fullres"]["data_identifier"]
    preprocessed.mkdir(parents=True)
    (preprocessed / "case_000.b2nd").write_bytes(b"")
    saved_threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("nnUNet_results", str(root / "results"))
        mp.setenv("nnUNet_preprocessed", str(root / "pre"))
        torch.manual_seed(0)
        trainer = nnUNetTrainer({**plans, "continue_training": False}, "3d_fullres", "all", dataset_json,
                                device=torch.device("cpu"))
        trainer.initialize()
        trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        trainer.grad_scaler = torch.amp.GradScaler("cpu")  # as on a GPU, where the trainer makes one
        data = torch.randn(1, 1, *trainer.configuration_manager.patch_size)
        with torch.no_grad():
            targets = [(torch.rand(1, 1, *out.shape[2:]) > 0.9).float() for out in trainer.network(data)]
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        trainer.on_train_epoch_end([trainer.train_step({"data": data, "target": targets})])
        trainer.on_validation_epoch_start()
        with torch.no_grad():
            trainer.on_validation_epoch_end([trainer.validation_step({"data": data, "target": targets})])
        trainer.on_epoch_end()
        demo = load_checkpoint(DEMO_TRAINER / "fold_all" / "checkpoint_final.pth")
        trainer.network.load_state_dict(demo["network_weights"])
        folders = {}
        for name in ("nnUNetTrainer", "nnUNetTrainerCustom"):
            if name != "nnUNetTrainer":
                trainer.__class__ = type(name, (nnUNetTrainer,), {})
            folders[name] = copy_demo(root / name / "nnUNetTrainer__nnUNetPlans__3d_fullres")
            trainer.save_checkpoint(str(folders[name] / "fold_all" / "checkpoint_final.pth"))
    torch.set_num_threads(saved_threads)
    return folders


def test_full_trainer_checkpoint_holds_everything_save_checkpoint_writes(full_checkpoints):
    path = full_checkpoints["nnUNetTrainer"] / "fold_all" / "checkpoint_final.pth"
    checkpoint = load_checkpoint(path)
    assert set(checkpoint) == {"network_weights", "optimizer_state", "grad_scaler_state", "logging", "_best_ema",
                               "current_epoch", "init_args", "trainer_name", "inference_allowed_mirroring_axes"}
    assert checkpoint["optimizer_state"]["state"]  # momentum buffers after one step
    assert checkpoint["grad_scaler_state"]["scale"] > 0
    assert isinstance(checkpoint["_best_ema"], np.floating)
    assert isinstance(checkpoint["logging"]["train_losses"][0], np.floating)
    assert checkpoint["init_args"]["device"] == torch.device("cpu")
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    # without the numpy entries of the allow-list, torch refuses it
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)


def test_full_trainer_checkpoint_predicts_as_the_demo_checkpoint(full_checkpoints, demo_leipzig_mask):
    loaded = model.load_predictor(model.locate_model(full_checkpoints["nnUNetTrainer"]), threads=2)
    assert model.describe_predictor(loaded)["DefaultTrainer"] is True
    assert demo_leipzig_mask.sum() > 100
    assert np.array_equal(leipzig_mask(loaded), demo_leipzig_mask)


def test_other_trainer_name_is_recorded_and_does_not_matter(full_checkpoints, predictor):
    loaded = model.load_predictor(model.locate_model(full_checkpoints["nnUNetTrainerCustom"]), threads=2)
    described = model.describe_predictor(loaded)
    assert described["TrainerName"] == "nnUNetTrainerCustom" and described["DefaultTrainer"] is False
    reference = small_mask(predictor)
    assert reference.sum() > 20 and np.array_equal(small_mask(loaded), reference)


class Payload:
    """Unpickling this opens (creates) the marker file: stands for any code in a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_checkpoint_with_a_payload_is_refused_and_never_runs(tmp_path, zip_format):
    folder = copy_demo(tmp_path / "model" / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    path = folder / "fold_all" / "checkpoint_final.pth"
    marker = tmp_path / "payload-ran"
    demo = load_checkpoint(DEMO_TRAINER / "fold_all" / "checkpoint_final.pth")
    torch.save({**demo, "logging": {"note": Payload(marker)}}, path, _use_new_zipfile_serialization=zip_format)

    with pytest.raises(ModelError) as info:
        model.load_predictor(model.locate_model(tmp_path / "model"), threads=1)

    message = str(info.value)
    assert str(path) in message and "\n" not in message
    assert re.search(r"holds objects a model checkpoint does not \((io|builtins)\.open\)", message)
    assert "nothing from it was run" in message
    assert not marker.exists()
    # the file really carries a payload: pickle's ordinary loader runs it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_checkpoint_written_with_numpy_1_names_loads(tmp_path):
    # numpy 1.x pickles its scalars as numpy.core.multiarray.scalar (the EPISeg release predates numpy 2)
    buffer = io.BytesIO()
    torch.save({"network_weights": {"w": torch.ones(2)}, "init_args": {"configuration": "3d_fullres"},
                "logging": {"ema_fg_dice": [np.float16(0.5), np.float32(0.6)]}, "_best_ema": np.float64(0.7)},
               buffer, _use_new_zipfile_serialization=False)  # protocol 2: names as plain text lines
    assert b"numpy._core.multiarray\n" in buffer.getvalue()
    path = tmp_path / "numpy1.pth"
    path.write_bytes(buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))

    checkpoint = load_checkpoint(path)
    assert checkpoint["logging"]["ema_fg_dice"] == [np.float16(0.5), np.float32(0.6)]
    assert checkpoint["_best_ema"] == np.float64(0.7)


def test_not_a_checkpoint_or_damaged(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="other.pth is not an nnUNetv2 checkpoint"):
        load_checkpoint(tmp_path / "other.pth")
    (tmp_path / "cut.pth").write_bytes((DEMO_TRAINER / "fold_all" / "checkpoint_final.pth").read_bytes()[:5000])
    with pytest.raises(ModelError, match="cut.pth cannot be loaded .*; reinstall the model"):
        load_checkpoint(tmp_path / "cut.pth")


def test_demo_checkpoint_loads_as_data():
    checkpoint = load_checkpoint(DEMO_TRAINER / "fold_all" / "checkpoint_final.pth")
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert checkpoint["init_args"]["configuration"] == "3d_fullres"
