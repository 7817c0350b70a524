"""Command line: the BIDS-App interface, ``install-model`` and ``validate``.

``episeg-bids BIDS_DIR OUTPUT_DIR {participant,group} [options]``,
``episeg-bids install-model [--url URL] [--sha256 HEX]`` and ``episeg-bids validate BIDS_DIR``. This module only parses arguments into
an :class:`~episeg_bids.options.Options`, sets up logging and maps expected failures
(:class:`~episeg_bids.errors.EpisegError`) to the BIDS-App exit codes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from . import __version__
from .errors import EpisegError, OutputError, UsageError
from .layout import strip_prefix
from .options import Options

log = logging.getLogger("episeg_bids")

EXIT_UNKNOWN_LEVEL = 17
EXIT_USAGE = 64
LEVELS = ("participant", "group")


def get_parser() -> argparse.ArgumentParser:
    """The BIDS-App argument parser (``install-model`` has its own, see :func:`get_install_parser`)."""
    parser = argparse.ArgumentParser(
        prog="episeg-bids",
        description="Segment the spinal cord on EPI-BOLD fMRI (4D runs and 3D mean EPIs) of a BIDS "
                    "dataset with the EPISeg nnUNetv2 model, as sct_deepseg sc_epi does, and write "
                    "BIDS derivatives. 'episeg-bids install-model --help' installs the weights.",
    )
    parser.add_argument("bids_dir", type=Path, help="the root folder of a BIDS dataset (sub-XXXXX folders at the top level)")
    parser.add_argument("output_dir", type=Path, help="the output folder (a BIDS derivative dataset)")
    parser.add_argument("analysis_level", help="'participant': segment each run; 'group': dataset tables and report "
                                               "from what the participant level wrote")
    selection = parser.add_argument_group("selecting inputs")
    selection.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                           help="label(s) of the participant(s) to analyse, with or without 'sub-' "
                                "(default: all participants)")
    selection.add_argument("--session-label", "--session_label", nargs="+", metavar="LABEL",
                           help="session label(s), with or without 'ses-'")
    selection.add_argument("--task-label", "--task_label", nargs="+", metavar="LABEL",
                           help="task label(s), with or without 'task-'")
    selection.add_argument("--bids-filter-file", type=Path, metavar="FILE",
                           help='JSON merged into the default queries "bold" (4D runs) and "mean" (3D mean EPIs), '
                                'e.g. {"bold": {"task": "rest", "session": "01"}}; null = entity absent, "*" = any value')
    selection.add_argument("--skip-bids-validation", action="store_true",
                           help="do not run bids-validator-deno on the input (BOLD_NOT_4D of 3D means is always accepted)")
    model_group = parser.add_argument_group("model and device")
    model_group.add_argument("--model-dir", type=Path, metavar="DIR",
                             help="nnUNetv2 model folder (default: $EPISEG_MODEL_DIR, else the EPISeg weights "
                                  "installed by 'episeg-bids install-model')")
    model_group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                             help="where the network runs; auto = CUDA when torch sees a GPU (default: auto)")
    model_group.add_argument("--tta", action="store_true",
                             help="test-time augmentation by mirroring (as SCT's -test-time-aug; about 8x slower)")
    model_group.add_argument("--moco", choices=("slicewise", "none"), default="slicewise",
                             help="4D runs: slice-wise in-plane motion correction before the mean, in a 35 mm "
                                  "cylinder around a first segmentation of the plain mean (default: slicewise); "
                                  "3D mean EPIs are used as they are")
    post = parser.add_argument_group("post-processing (sct_deepseg semantics and order)")
    post.add_argument("--thr", type=float, metavar="T",
                      help="mask = foreground probability > T instead of the argmax (0-1)")
    post.add_argument("--largest", action="store_true", help="keep the largest connected component (6-connectivity)")
    post.add_argument("--fill-holes", action="store_true", help="fill holes (3x3x3 structure)")
    post.add_argument("--remove-small", metavar="N[vox|mm3]",
                      help="remove objects smaller than N voxels (default unit) or N mm3 (18-connectivity)")
    outputs = parser.add_argument_group("outputs and resources")
    outputs.add_argument("--save-probseg", action="store_true", help="also write the foreground probability map")
    outputs.add_argument("--ground-truth", type=Path, metavar="DIR",
                         help="group level: folder of manual masks (e.g. ds005143's derivatives/label, "
                              "*_desc-spinalcordmask or *_label-SC_mask) matched by entities; adds Dice, HD95 "
                              "and volume difference per run and per slice")
    outputs.add_argument("--overwrite", action="store_true", help="recompute runs whose outputs are complete")
    outputs.add_argument("-w", "--work-dir", type=Path, metavar="DIR",
                         help="work folder for the discovery index (default: $EPISEG_WORK_DIR, else "
                              "OUTPUT_DIR/../episeg_work); keep it on local disk")
    outputs.add_argument("--nprocs", "--n-cpus", type=int, metavar="N",
                         help="CPUs episeg-bids may use in all (default: every CPU this process may use: "
                              "affinity, cgroup quota, SLURM_CPUS_PER_TASK)")
    outputs.add_argument("--omp-nthreads", type=int, metavar="N",
                         help="CPU threads of the network (default: --nprocs); recorded in the mask sidecar")
    outputs.add_argument("--max-image-gb", type=float, default=8.0, metavar="GB",
                         help="refuse input images whose uncompressed data is larger than this (default: 8); "
                              "checked from the header before any data is read")
    parser.add_argument("--version", action="version", version=f"episeg-bids {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    return parser


def get_install_parser() -> argparse.ArgumentParser:
    """Parser of ``episeg-bids install-model``."""
    from .model import EPISEG_URL

    parser = argparse.ArgumentParser(
        prog="episeg-bids install-model",
        description="Download the EPISeg nnUNetv2 weights (release zip) into the cache "
                    "($EPISEG_HOME, default ~/.cache/episeg-bids) and record their checksum.",
    )
    parser.add_argument("--url", default=EPISEG_URL, help="release zip to install (default: EPISeg v0.2)")
    parser.add_argument("--sha256", metavar="HEX", help="expected SHA-256 of the zip; installation fails on mismatch")
    parser.add_argument("--name", help="folder name under $EPISEG_HOME/models (default: derived from the URL)")
    parser.add_argument("--force", action="store_true", help="reinstall even if the model is already installed")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def _labels(values: list[str] | None, prefix: str) -> tuple[str, ...] | None:
    labels = strip_prefix(values, prefix)
    return tuple(labels) if labels else None


def options_from_args(args: argparse.Namespace) -> Options:
    """Check the parsed arguments and freeze them into :class:`Options`.

    Raises
    ------
    UsageError
        For values that cannot work (paths, ranges).
    """
    from .postprocess import parse_size

    bids_dir = args.bids_dir.expanduser().resolve()
    output_dir = args.output_dir.expanduser().resolve()
    if not bids_dir.is_dir():
        raise UsageError(f"BIDS folder {args.bids_dir} does not exist")
    if args.thr is not None and not 0.0 <= args.thr < 1.0:
        raise UsageError(f"--thr {args.thr}: expected a probability in [0, 1)")
    if (args.nprocs is not None and args.nprocs < 1) or (args.omp_nthreads is not None and args.omp_nthreads < 1):
        raise UsageError("--nprocs and --omp-nthreads must be at least 1")
    if not args.max_image_gb > 0:
        raise UsageError(f"--max-image-gb {args.max_image_gb}: expected a positive size in GB")
    _check_output_location(bids_dir, output_dir, args.output_dir)
    if args.bids_filter_file is not None and not args.bids_filter_file.is_file():
        raise UsageError(f"--bids-filter-file {args.bids_filter_file} does not exist")
    if args.ground_truth is not None and not args.ground_truth.is_dir():
        raise UsageError(f"--ground-truth {args.ground_truth} is not a folder")
    default_work = os.environ.get("EPISEG_WORK_DIR") or output_dir.parent / "episeg_work"
    work_dir = Path(args.work_dir or default_work).expanduser().resolve()
    return Options(
        bids_dir=bids_dir,
        output_dir=output_dir,
        analysis_level=args.analysis_level,
        work_dir=work_dir,
        participant_labels=_labels(args.participant_label, "sub-"),
        session_labels=_labels(args.session_label, "ses-"),
        task_labels=_labels(args.task_label, "task-"),
        bids_filter_file=args.bids_filter_file.resolve() if args.bids_filter_file else None,
        skip_bids_validation=args.skip_bids_validation,
        model_dir=args.model_dir.expanduser().resolve() if args.model_dir else None,
        device=args.device,
        tta=args.tta,
        moco=args.moco,
        nprocs=args.nprocs,
        omp_nthreads=args.omp_nthreads,
        thr=args.thr,
        largest=args.largest,
        fill_holes=args.fill_holes,
        remove_small=parse_size(args.remove_small) if args.remove_small else None,
        save_probseg=args.save_probseg,
        ground_truth=args.ground_truth.expanduser().resolve() if args.ground_truth else None,
        overwrite=args.overwrite,
        max_image_bytes=int(args.max_image_gb * 1024**3),
        verbose=args.verbose,
    )


def _check_output_location(bids_dir: Path, output_dir: Path, given: Path) -> None:
    """Refuse an output folder inside the dataset anywhere but under ``derivatives/`` (the next run
    would segment its own outputs), and the dataset folder itself."""
    if output_dir == bids_dir:
        raise UsageError(f"output folder {given} is the BIDS folder; use e.g. BIDS_DIR/derivatives/episeg")
    if output_dir.is_relative_to(bids_dir):
        inside = output_dir.relative_to(bids_dir).parts
        if inside[0] != "derivatives":
            raise UsageError(f"output folder {given} is inside the BIDS folder but not under derivatives/; "
                             f"use {bids_dir / 'derivatives' / 'episeg-bids'} or a folder outside the dataset")
    if bids_dir.is_relative_to(output_dir):
        raise UsageError(f"output folder {given} contains the BIDS folder; choose a folder beside or under "
                         "BIDS_DIR/derivatives")


def setup_logging(verbose: int) -> None:
    """Log lines ``HH:MM:SS LEVEL message`` on stderr; -v INFO for dependencies, -vv DEBUG."""
    level = logging.DEBUG if verbose >= 2 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if verbose == 0 else level)
    logging.getLogger("episeg_bids").setLevel(level if verbose else logging.INFO)


def install_main(argv: list[str]) -> int:
    """``episeg-bids install-model``: prints the installed folder on stdout."""
    from .install import install_model

    args = get_install_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        folder = install_model(args.url, sha256=args.sha256, name=args.name, force=args.force,
                               log=lambda message: log.info("%s", message))
    except EpisegError as err:
        print(f"episeg-bids install-model: error: {err}", file=sys.stderr)
        return err.exit_code
    print(folder)
    return 0


def get_validate_parser() -> argparse.ArgumentParser:
    """Parser of ``episeg-bids validate``."""
    parser = argparse.ArgumentParser(
        prog="episeg-bids validate",
        description="Validate a BIDS dataset once (bids-validator-deno; BOLD_NOT_4D of 3D mean EPIs accepted), "
                    "e.g. before submitting one job per participant with --skip-bids-validation "
                    "(scripts/submit.sh does this). Exit code 0 when valid, 16 when not.")
    parser.add_argument("bids_dir", type=Path, help="the root folder of a BIDS dataset")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    return parser


def validate_main(argv: list[str]) -> int:
    """``episeg-bids validate BIDS_DIR``."""
    from .validate import check_dataset

    try:
        args = get_validate_parser().parse_args(argv)
    except SystemExit as exit_:
        return EXIT_USAGE if exit_.code not in (0, None) else 0
    setup_logging(args.verbose)
    if not args.bids_dir.is_dir():
        print(f"episeg-bids validate: error: BIDS folder {args.bids_dir} does not exist", file=sys.stderr)
        return EXIT_USAGE
    try:
        check_dataset(args.bids_dir.resolve())
    except EpisegError as err:
        print(f"episeg-bids validate: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


def prepare_folders(options: Options) -> None:
    """Create the output and work folders (exit code 73 when impossible)."""
    for folder in (options.output_dir, options.work_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create {folder} ({err.strerror}); choose a writable folder") from err


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (never calls ``sys.exit``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["install-model"]:
        return install_main(argv[1:])
    if argv[:1] == ["validate"]:
        return validate_main(argv[1:])
    parser = get_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on usage errors, 0 for --help/--version
        return EXIT_USAGE if exit_.code not in (0, None) else 0
    setup_logging(args.verbose)
    if args.analysis_level not in LEVELS:
        print(f"episeg-bids: error: unknown analysis level {args.analysis_level!r}; use 'participant' or 'group'",
              file=sys.stderr)
        return EXIT_UNKNOWN_LEVEL
    try:
        options = options_from_args(args)
        prepare_folders(options)
        if options.analysis_level == "participant":
            from .participant import participant

            summary = participant(options)
            for line in summary.lines():
                (log.error if line.startswith("FAILED") else log.info)("%s", line)
            log.info("outputs in %s", options.output_dir)
            return summary.exit_code
        from .group import group

        return group(options)
    except EpisegError as err:
        print(f"episeg-bids: error: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
