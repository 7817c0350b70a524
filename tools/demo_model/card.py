"""The demo model's ``model_card.json``: how it was trained and what it measured.

Training writes the ``training`` section; evaluation writes the ``evaluation`` section. Keys are
sorted and floats rounded so two runs can be diffed.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

CARD_NAME = "model_card.json"
WARNING = ("DEMO model for tests and the offline demo of episeg-bids; NOT for research use. "
           "Install the real EPISeg weights (sct-pipeline/fmri-segmentation release v0.2) for any analysis.")


def _round(obj, ndigits: int = 4):
    """Round floats in nested dicts/lists."""
    if isinstance(obj, float):
        return round(obj, ndigits)
    if isinstance(obj, dict):
        return {k: _round(v, ndigits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_round(v, ndigits) for v in obj]
    return obj


def training_record(*, settings: dict, plans: dict, n_parameters: int, final_log: dict,
                    seconds: dict, command: str) -> dict:
    """Training section: settings, data, plans summary, timings (s), environment."""
    import torch
    from importlib.metadata import version

    cfg = plans["configurations"]["3d_fullres"]
    arch = cfg["architecture"]["arch_kwargs"]
    return _round({
        "command": command,
        "settings": settings,
        "data": {
            "real_views": settings["n_real"],
            "phantoms": settings["n_phantoms"],
            "real_source": "tests/data/ds-example sub-leipzigR01 rec-MoCoMean bold + manual spinalcordmask "
                           "(fmri-segmentation MIT / OpenNeuro ds005143 CC0)",
            "never_used_for_training": ["tests/data/heldout_sct_example_data_r20161128",
                                        "tests/data/ds-example/sub-errsm30"],
        },
        "plans": {"identifier": plans["plans_name"], "spacing_zyx_mm": cfg["spacing"],
                  "patch_size_zyx": cfg["patch_size"], "batch_size": cfg["batch_size"],
                  "features_per_stage": arch["features_per_stage"], "strides": arch["strides"],
                  "normalization": cfg["normalization_schemes"]},
        "network_parameters": n_parameters,
        "final_training_log": final_log,
        "seconds": seconds,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "nnunetv2": version("nnunetv2"), "cpu_threads": settings["threads"],
                        "machine": platform.machine()},
    })


def _load(out_dir: Path) -> dict:
    path = out_dir / CARD_NAME
    return json.loads(path.read_text()) if path.exists() else {}


def _save(out_dir: Path, card: dict) -> None:
    card["warning"] = WARNING
    card["demo"] = True  # episeg_bids.model reads this: sidecars then say the masks are a demo model's
    card["name"] = "episeg-bids demo spinal-cord model"
    card["layout"] = "nnUNetTrainer__nnUNetPlans__3d_fullres/{dataset.json,plans.json,fold_all/checkpoint_final.pth}"
    (out_dir / CARD_NAME).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


def write_training(out_dir: Path, record: dict) -> None:
    """Store the training section (drops a stale evaluation section)."""
    card = _load(out_dir)
    card["training"] = record
    card.pop("evaluation", None)
    _save(out_dir, card)
    write_readme(out_dir)


def write_evaluation(out_dir: Path, record: dict) -> None:
    """Store the evaluation section."""
    card = _load(out_dir)
    card["evaluation"] = _round(record)
    _save(out_dir, card)
    write_readme(out_dir)


def render_readme(card: dict) -> str:
    """Markdown README of the demo model from its card (training and, if present, evaluation)."""
    tr = card.get("training", {})
    ev = card.get("evaluation")
    s = tr.get("settings", {})
    p = tr.get("plans", {})
    sec = tr.get("seconds", {})
    lines = [
        "# episeg-bids demo spinal-cord model",
        "",
        f"> **{WARNING}**",
        "",
        "A small but real nnUNetv2 `3d_fullres` model, trained by this project on the CPU, so that the",
        "tests and `make demo` run the genuine nnUNetv2 inference path offline. It is laid out exactly",
        "like the EPISeg release (one trainer folder; `fold_all`; `checkpoint_final.pth`):",
        "",
        "```",
        "nnUNetTrainer__nnUNetPlans__3d_fullres/",
        "    dataset.json        channel_names {\"0\": \"bold\"} (z-score); labels {background: 0, spinal_cord: 1}",
        "    plans.json          plans identifier nnUNetPlans, configuration 3d_fullres",
        "    fold_all/checkpoint_final.pth",
        "episeg-demo-model.zip  the same folder as one top-level entry (sorted, fixed timestamps)",
        "model_card.json        everything below, machine-readable",
        "```",
        "",
        "The checkpoint keeps only what `nnUNetPredictor.initialize_from_trained_model_folder` reads:",
        "`network_weights` (float16 unless trained with `--fp32`; loading casts them to float32),",
        "`init_args`, `trainer_name` = `\"nnUNetTrainer\"` (so the class lookup never imports the other",
        "trainers) and `inference_allowed_mirroring_axes`.",
        "",
        "## How it was trained",
        "",
        "`make model` runs `python tools/train_demo_model.py` (defaults below), which trains and then",
        "runs `python tools/evaluate_demo_model.py`; both refresh this README and model_card.json.",
        f"This copy was produced by: `{tr.get('command', 'python tools/train_demo_model.py')}`.",
        "",
        f"- Seed {s.get('seed')} for every random draw (data: seed + fixed offset + case index; training:",
        "  torch/numpy seeded, augmentation in the main process).",
        f"- Data: {s.get('n_real')} heavily augmented re-acquisitions of the real sub-leipzigR01 moco-mean",
        "  EPI and its manual mask (tests/data/ds-example; MIT/CC0), plus",
        f"  {s.get('n_phantoms')} synthetic EPI-like neck phantoms. Both simulate varied acquisitions before",
        "  nnUNet's preprocessing: in-plane 0.8-2.5 mm, slices 3-17 mm (partial-volume averaging, gaps),",
        "  5-30 slices, field of view 36-140 mm (narrow anterior-posterior ones too), tilt, rotation,",
        "  elastic deformation, bias field, gamma, Nyquist ghost, dropout, Rician noise, varied on-disk",
        "  axis orders. Every case is reoriented to RAS+ and fed as `(Z, Y, X)` exactly like the predictor.",
        "- Never used for training or tuning: `tests/data/heldout_sct_example_data_r20161128` and",
        "  `tests/data/ds-example/sub-errsm30` (same subject).",
        f"- Plans: nnUNet's default planner with target spacing {p.get('spacing_zyx_mm')} mm (Z, Y, X),",
        f"  patch {p.get('patch_size_zyx')}, batch {p.get('batch_size')}, PlainConvUNet features",
        f"  {p.get('features_per_stage')} ({tr.get('network_parameters')} parameters).",
        f"- Trainer: `nnUNetTrainer` subclass, {s.get('epochs')} epochs x {s.get('iterations')} iterations,",
        "  rotation limited to +-30 degrees, mirroring on S-I and L-R only; CPU, "
        f"{s.get('threads')} threads.",
        f"- Time: data {sec.get('data', 0):.0f} s, planning+preprocessing {sec.get('plan_preprocess', 0):.0f} s,",
        f"  training {sec.get('train', 0):.0f} s, total {sec.get('total', 0):.0f} s (wall clock on a 2-core",
        "  machine; longer when other jobs share the cores). Training is deterministic: a rerun with the",
        "  same seed gives a byte-identical checkpoint and zip.",
    ]
    if ev:
        syn, real, cpu = ev["synthetic_heldout"], ev["real_heldout"], ev["cpu_inference"]
        lines += [
            "",
            "## Measured (`python tools/evaluate_demo_model.py`)",
            "",
            "Inference as SCT runs it: RAS+ by permutation/flip, `(Z, Y, X)`, spacing reversed,",
            "`predict_single_npy_array`, tile step 0.5, Gaussian, no mirroring, CPU, model loaded once.",
            "",
            "| figure | value |",
            "|---|---|",
            f"| Dice, {syn['n']} held-out synthetic phantoms (seeds {syn['seeds'][0]}-{syn['seeds'][1]}) "
            f"| mean {syn['dice_mean']:.3f}, median {syn['dice_median']:.3f}, min {syn['dice_min']:.3f} |",
            f"| Dice, held-out real run (SCT example data, temporal mean of 30 volumes) | {real['dice']:.3f} "
            f"(per slice {', '.join(f'{d:.2f}' for d in real['dice_per_slice'])}) |",
            f"| CPU time per volume, 68x68x5 | {cpu['heldout_run_mean']['median_seconds']:.2f} s |",
            f"| CPU time per volume, 128x128x24 | {cpu['leipzig_128x128x24']['median_seconds']:.2f} s |",
            f"| model load (checkpoint + network build, once) | {cpu['model_load_seconds']:.2f} s |",
            f"| import of nnunetv2's predictor (0 if already imported) | {cpu.get('import_seconds', 0):.2f} s |",
            f"| size on disk (all files here) | {ev['sizes']['total_bytes'] / 1e6:.2f} MB |",
        ]
    lines += ["", "Licence of the training data: see tests/data/sources/.", ""]
    return "\n".join(lines)


def write_readme(out_dir: Path) -> None:
    """Render README.md from model_card.json."""
    (out_dir / "README.md").write_text(render_readme(_load(out_dir)))
