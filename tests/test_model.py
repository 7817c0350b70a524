"""Model discovery follows sct_deepseg (trainer folder, folds, checkpoint fallback); checkpoints are
read as data only; the network runs with the threads asked for; the CPUs a process may use."""

import builtins
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import DEMO_MODEL, LEIPZIG, REPO, SCT_RUN
from episeg_bids import model
from episeg_bids.errors import ModelError, UsageError
from episeg_bids.segment import segment_volume


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


# --- checkpoints are read as data, never run ------------------------------------------------------

DEMO_TRAINER = model.find_trainer_folder(DEMO_MODEL)


def leipzig_mask(predictor) -> np.ndarray:
    img = nib.load(LEIPZIG)
    return segment_volume(predictor, img.get_fdata(dtype=np.float32), img.affine, img.header.get_zooms()[:3]).mask


def small_mask(predictor) -> np.ndarray:
    """Mask of the first volume of the real 4D SCT run (68x68x6): a quick prediction."""
    img = nib.load(SCT_RUN)
    return segment_volume(predictor, np.asarray(img.dataobj[..., 0], dtype=np.float32), img.affine,
                          img.header.get_zooms()[:3]).mask


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
        demo = model.load_checkpoint(DEMO_TRAINER / "fold_all" / "checkpoint_final.pth")
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
    checkpoint = model.load_checkpoint(path)
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
    demo = model.load_checkpoint(DEMO_TRAINER / "fold_all" / "checkpoint_final.pth")
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

    checkpoint = model.load_checkpoint(path)
    assert checkpoint["logging"]["ema_fg_dice"] == [np.float16(0.5), np.float32(0.6)]
    assert checkpoint["_best_ema"] == np.float64(0.7)


def test_not_a_checkpoint_or_damaged(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="other.pth is not an nnUNetv2 checkpoint"):
        model.load_checkpoint(tmp_path / "other.pth")
    (tmp_path / "cut.pth").write_bytes((DEMO_TRAINER / "fold_all" / "checkpoint_final.pth").read_bytes()[:5000])
    with pytest.raises(ModelError, match="cut.pth cannot be loaded .*; reinstall the model"):
        model.load_checkpoint(tmp_path / "cut.pth")


def test_demo_checkpoint_loads_as_data():
    checkpoint = model.load_checkpoint(DEMO_TRAINER / "fold_all" / "checkpoint_final.pth")
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    assert checkpoint["init_args"]["configuration"] == "3d_fullres"


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
plain.initialize_from_trained_model_folder(str(t.DEMO_TRAINER), use_folds="all", checkpoint_name="checkpoint_final.pth")
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
    assert model.predictor_threads(predictor) == model.available_cpus()
    with pytest.raises(UsageError, match="at least 1"):
        model.load_predictor(model.locate_model(DEMO_MODEL), threads=0)


# --- available CPUs -----------------------------------------------------------------------------

CPUS_SCRIPT = "from episeg_bids.model import available_cpus; print(available_cpus())"


def cpus_in_subprocess(env_extra=None, *, one_cpu=False) -> int:
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CPUS_PER_TASK"}
    env.update(env_extra or {}, PYTHONPATH=str(REPO))
    command = [sys.executable, "-c", CPUS_SCRIPT]
    first = min(os.sched_getaffinity(0))
    if one_cpu and shutil.which("taskset"):
        command = ["taskset", "-c", str(first), *command]
    preexec = (lambda: os.sched_setaffinity(0, {first})) if one_cpu and not shutil.which("taskset") else None
    proc = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=60, preexec_fn=preexec)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def test_available_cpus_follows_affinity_and_slurm():
    allowed = len(os.sched_getaffinity(0))
    unrestricted = cpus_in_subprocess()
    assert 1 <= unrestricted <= allowed
    assert cpus_in_subprocess(one_cpu=True) == 1
    assert cpus_in_subprocess({"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert cpus_in_subprocess({"SLURM_CPUS_PER_TASK": "4096"}) == unrestricted  # the smallest limit wins
    assert cpus_in_subprocess({"SLURM_CPUS_PER_TASK": "not a number"}) == unrestricted


def fake_proc(tmp_path, cgroup: str, mounts: list[str]):
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text("".join(line + "\n" for line in mounts))
    return proc


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_the_smallest_along_the_path_rounded_up(tmp_path):
    fs = tmp_path / "cg2"
    write(fs / "cpu.max", "max 100000\n")
    write(fs / "job" / "cpu.max", "150000 100000\n")  # 1.5 CPUs (docker --cpus 1.5)
    write(fs / "job" / "step" / "cpu.max", "max 100000\n")
    proc = fake_proc(tmp_path, "0::/job/step\n", [f"30 23 0:26 / {fs} rw - cgroup2 cgroup2 rw"])
    assert model.cgroup_cpu_limit(proc) == 2
    write(fs / "job" / "step" / "cpu.max", "50000 100000\n")
    assert model.cgroup_cpu_limit(proc) == 1  # never 0


def test_cgroup_v1_quota_and_unlimited(tmp_path):
    fs = tmp_path / "cpu,cpuacct"
    write(fs / "cpu.cfs_quota_us", "-1\n")
    write(fs / "cpu.cfs_period_us", "100000\n")
    write(fs / "docker" / "abc" / "cpu.cfs_quota_us", "300000\n")
    write(fs / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    mounts = [f"32 31 0:29 / {fs} rw,relatime - cgroup cgroup rw,cpu,cpuacct",
              f"34 31 0:31 / {tmp_path / 'cpuset'} rw,relatime - cgroup cgroup rw,cpuset"]
    proc = fake_proc(tmp_path, "4:cpu,cpuacct:/docker/abc\n3:cpuset:/\n", mounts)
    assert model.cgroup_cpu_limit(proc) == 3
    (proc / "cgroup").write_text("4:cpu,cpuacct:/\n")
    assert model.cgroup_cpu_limit(proc) is None  # -1: no quota


def test_cgroup_seen_from_a_container_without_cgroup_namespace(tmp_path):
    # mountinfo's root is the container's cgroup, /proc/self/cgroup names it from the host
    fs = tmp_path / "cgroup"
    write(fs / "cpu.max", "200000 100000\n")
    proc = fake_proc(tmp_path, "0::/system.slice/docker-abc.scope\n",
                     [f"30 23 0:26 /system.slice/docker-abc.scope {fs} ro - cgroup2 cgroup2 rw"])
    assert model.cgroup_cpu_limit(proc) == 2
    assert model.cgroup_cpu_limit(tmp_path / "no-proc") is None
