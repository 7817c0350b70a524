"""Model discovery follows sct_deepseg: trainer folder, folds, checkpoint fallback."""

import shutil

import pytest

from conftest import DEMO_MODEL
from episeg_bids import model
from episeg_bids.errors import ModelError


def make_tree(root, folds, checkpoint="checkpoint_final.pth", wrapper="nnUNetTrainer__nnUNetPlans__3d_fullres"):
    trainer = root / wrapper
    trainer.mkdir(parents=True)
    (trainer / "dataset.json").write_text('{"channel_names": {"0": "bold"}}')
    (trainer / "plans.json").write_text("{}")
    for fold in folds:
        (trainer / f"fold_{fold}").mkdir()
        (trainer / f"fold_{fold}" / checkpoint).write_bytes(b"weights " + fold.encode())
    return trainer


def test_fold_all_alone_means_all(tmp_path):
    trainer = make_tree(tmp_path, ["all"])
    spec = model.locate_model(tmp_path)
    assert spec.trainer_folder == trainer and spec.folds == ("all",)
    assert spec.checkpoint_name == "checkpoint_final.pth"
    assert spec.checkpoint_sha256["fold_all"] == model.sha256_file(trainer / "fold_all" / "checkpoint_final.pth")


def test_numbered_folds_are_all_used_in_order(tmp_path):
    make_tree(tmp_path, ["10", "2", "0", "all"])
    assert model.locate_model(tmp_path).folds == ("0", "2", "10")


def test_best_checkpoint_is_the_fallback(tmp_path):
    make_tree(tmp_path, ["all"], checkpoint="checkpoint_best.pth")
    assert model.locate_model(tmp_path).checkpoint_name == "checkpoint_best.pth"


def test_trainer_folder_given_directly_or_zip_without_wrapper(tmp_path):
    trainer = make_tree(tmp_path, ["all"])
    assert model.locate_model(trainer).trainer_folder == trainer


def test_missing_model_says_how_to_install(tmp_path):
    with pytest.raises(ModelError, match="install-model"):
        model.locate_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no nnUNetv2 trainer folder"):
        model.locate_model(tmp_path / "empty")


def test_incomplete_model(tmp_path):
    trainer = make_tree(tmp_path, [])
    with pytest.raises(ModelError, match="no fold_all or fold_N"):
        model.locate_model(tmp_path)
    (trainer / "fold_0").mkdir()
    with pytest.raises(ModelError, match="lack checkpoint_final.pth and checkpoint_best.pth"):
        model.locate_model(tmp_path)


def test_environment_variable(tmp_path, monkeypatch):
    trainer = make_tree(tmp_path, ["all"])
    monkeypatch.setenv("EPISEG_MODEL_DIR", str(tmp_path))
    assert model.locate_model(None).trainer_folder == trainer


def test_default_location_is_under_episeg_home(tmp_path, monkeypatch):
    monkeypatch.setenv("EPISEG_HOME", str(tmp_path))
    monkeypatch.delenv("EPISEG_MODEL_DIR", raising=False)
    assert model.resolve_model_dir(None) == tmp_path / "models" / model.EPISEG_NAME


def test_demo_model_is_marked_as_demo():
    spec = model.locate_model(DEMO_MODEL)
    assert spec.is_demo and spec.folds == ("all",)
    assert spec.describe()["IsDemoModel"] is True


def test_image_orientation_key_in_sct_convention(tmp_path):
    shutil.copytree(model.find_trainer_folder(DEMO_MODEL), tmp_path / "m")
    spec = model.locate_model(tmp_path / "m")
    assert model.image_orientation(spec) == ("R", "A", "S")
    import json
    ds = json.loads((tmp_path / "m" / "dataset.json").read_text())
    (tmp_path / "m" / "dataset.json").write_text(json.dumps({**ds, "image_orientation": "RPI"}))
    assert model.image_orientation(spec) == ("L", "A", "S")


def test_load_predictor_builds_the_network_from_plans(predictor):
    assert predictor.network is not None and len(predictor.list_of_parameters) == 1
    assert predictor.use_mirroring is False and predictor.tile_step_size == 0.5
