"""Model discovery follows sct_deepseg (trainer folder, folds, checkpoint fallback); the network runs
with the threads asked for (checkpoints: test_checkpoint.py; CPUs: test_cpus.py)."""

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from conftest import DEMO_MODEL, REPO, small_mask
from episeg_bids import cpus, model
from episeg_bids.errors import ModelError, UsageError


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
    ds = json.loads((tmp_path / "m" / "dataset.json").read_text())
    (tmp_path / "m" / "dataset.json").write_text(json.dumps({**ds, "image_orientation": "RPI"}))
    assert model.image_orientation(spec) == ("L", "A", "S")


def test_load_predictor_builds_the_network_from_plans(predictor):
    assert predictor.network is not None and len(predictor.list_of_parameters) == 1
    assert predictor.use_mirroring is False and predictor.tile_step_size == 0.5


# --- threads ------------------------------------------------------------------------------------


def threads_in_forward(predictor, *, in_worker_thread=False) -> set[int]:
    """torch.get_num_threads() seen by a forward pre-hook on the real network during a prediction."""
    seen: list[int] = []
    hook = predictor.network.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    try:
        if in_worker_thread:
            worker = threading.Thread(target=small_mask, args=(predictor,))
            worker.start()
            worker.join()
        else:
            small_mask(predictor)
    finally:
        hook.remove()
    assert seen, "the network never ran"
    return set(seen)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_hold_inside_the_forward_pass(threads):
    predictor = model.load_predictor(model.locate_model(DEMO_MODEL), threads=threads)
    assert model.predictor_threads(predictor) == threads
    saved = torch.get_num_threads()
    outside = 3 - threads  # torch's setting elsewhere in the process is left as it was
    torch.set_num_threads(outside)
    try:
        assert threads_in_forward(predictor) == {threads}
        assert threads_in_forward(predictor, in_worker_thread=True) == {threads}
        assert torch.get_num_threads() == outside
    finally:
        torch.set_num_threads(saved)


THREADS_SCRIPT = """
import json, sys, torch
import nnunetv2.inference.predict_from_raw_data as nnunet   # imported before episeg_bids
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
sys.path.insert(0, "tests")
import test_model as t
from episeg_bids import model
ours = model.load_predictor(model.locate_model(t.DEMO_MODEL), threads=2)
plain = nnUNetPredictor(use_mirroring=False, perform_everything_on_device=False, device=torch.device("cpu"))
plain.initialize_from_trained_model_folder(str(model.find_trainer_folder(t.DEMO_MODEL)), use_folds="all",
                                         checkpoint_name="checkpoint_final.pth")
torch.set_num_threads(2)
print(json.dumps({"cap": nnunet.default_num_processes, "ours": sorted(t.threads_in_forward(ours)),
                  "plain": sorted(t.threads_in_forward(plain))}))
"""


def test_threads_hold_when_nnunet_caps_them_at_one():
    env = {**os.environ, "nnUNet_def_n_proc": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {"cap": 1, "ours": [2], "plain": [1]}  # plain nnunetv2 shows the cap is real


def test_default_threads_are_the_available_cpus():
    predictor = model.load_predictor(model.locate_model(DEMO_MODEL))
    assert model.predictor_threads(predictor) == cpus.available_cpus()
    with pytest.raises(UsageError, match="at least 1"):
        model.load_predictor(model.locate_model(DEMO_MODEL), threads=0)
