"""Discovery on real files: tiny NIfTI images written with nibabel, real sidecars, real symbolic
links, real concurrent and killed processes. No timings here (see benchmarks/bench_discovery.py)."""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import EXAMPLE, REPO
from episeg_bids import layout
from episeg_bids.errors import EpisegError, UsageError

#: What the output naming relies on for every input that is not invalid.
BIDS_BOLD_NAME = re.compile(r"sub-[a-zA-Z0-9]+(_[a-z]+-[a-zA-Z0-9]+)*_bold\.nii(\.gz)?")
HOUR_AGO = time.time() - 3600
RUN_4D, MEAN_3D = (4, 4, 3, 5), (4, 4, 3)

FILTERS = layout.load_filters(None)


def write_image(path: Path, shape=RUN_4D, dtype=np.int16) -> Path:
    """A real NIfTI file whose voxel values all differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 5.0, 1.0])), path)
    return path


def write_json(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return path


def age(root: Path) -> None:
    """Set every file's mtime an hour back: a dataset that has not changed lately (files
    written less than ``discovery_index.RACY_NS`` ago are read again on every discovery, see below)."""
    for folder, _, files in os.walk(root):
        for name in files:
            os.utime(Path(folder) / name, (HOUR_AGO, HOUR_AGO), follow_symlinks=False)


def small_dataset(root: Path) -> Path:
    """Two subjects, one with two sessions (4 inputs: three 4D runs, one 3D mean), a root and a
    run sidecar, an anat image; files dated an hour back."""
    write_json(root / "dataset_description.json", {"Name": "t", "BIDSVersion": "1.10.0"})
    write_json(root / "task-rest_bold.json", {"RepetitionTime": 2.0, "TaskName": "rest"})
    write_image(root / "sub-01/func/sub-01_task-rest_bold.nii.gz")
    write_json(root / "sub-01/func/sub-01_task-rest_bold.json", {"EchoTime": 0.03})
    write_image(root / "sub-01/func/sub-01_task-rest_rec-MoCoMean_bold.nii.gz", MEAN_3D)
    for ses in ("01", "02"):
        write_image(root / f"sub-02/ses-{ses}/func/sub-02_ses-{ses}_task-rest_run-01_bold.nii.gz")
    write_image(root / "sub-02/ses-01/anat/sub-02_ses-01_T1w.nii.gz", MEAN_3D)
    age(root)
    return root


def relpaths(found: layout.Discovery) -> list[str]:
    return [r.relpath for r in found.runs]


def summary(found: layout.Discovery) -> list[tuple]:
    return [(r.relpath, r.kind, r.shape, r.metadata, r.problem) for r in found.runs]


def printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


@pytest.fixture
def dataset(tmp_path) -> Path:
    return small_dataset(tmp_path / "ds")


# --- the example dataset and the filters ------------------------------------------------------

@pytest.fixture(scope="module")
def example(tmp_path_factory):
    return layout.discover(EXAMPLE, tmp_path_factory.mktemp("work"), FILTERS)


def test_default_queries_find_4d_runs_and_3d_means(example):
    assert {r.path.name: r.kind for r in example.runs} == {
        "sub-brain01_task-rest_bold.nii.gz": "run",
        "sub-errsm30_ses-01_task-rest_run-01_bold.nii.gz": "run",
        "sub-leipzigR01_task-rest_rec-MoCoMean_bold.nii.gz": "mean",
    }
    errsm = next(r for r in example.runs if r.subject == "errsm30")
    assert errsm.entities["run"] == "01" and errsm.metadata["RepetitionTime"] == 1.13
    assert errsm.relpath == "sub-errsm30/ses-01/func/sub-errsm30_ses-01_task-rest_run-01_bold.nii.gz"
    assert errsm.path == EXAMPLE.absolute() / errsm.relpath and errsm.shape == (68, 68, 6, 30)
    assert relpaths(example) == sorted(relpaths(example)) and example.missing_subjects == []


def test_entities_and_metadata_equal_pybids_on_the_example(example):
    """Same entities and inherited metadata as pybids' own layout (the dataset's path is neutral)."""
    from bids import BIDSLayout

    reference = BIDSLayout(EXAMPLE, validate=False)
    for run in example.runs:
        assert run.metadata == reference.get_metadata(str(run.path))
        assert run.entities == {k: str(v) for k, v in reference.get_file(str(run.path)).get_entities().items()}


def test_labels_select_subjects_sessions_and_tasks(dataset, tmp_path):
    found = layout.discover(dataset, tmp_path / "w", FILTERS, subjects=layout.strip_prefix(["sub-02"], "sub-"),
                            sessions=["02"])
    assert relpaths(found) == ["sub-02/ses-02/func/sub-02_ses-02_task-rest_run-01_bold.nii.gz"]
    assert layout.discover(dataset, tmp_path / "w", FILTERS, tasks=["motor"]).runs == []
    assert len(layout.discover(dataset, tmp_path / "w", FILTERS, tasks=["rest"]).runs) == 4


def write_filters(tmp_path: Path, content) -> Path:
    return write_json(tmp_path / "filters.json", content)


@pytest.mark.parametrize("content, expected", [
    ({"bold": {"session": None}, "mean": {"reconstruction": None}}, ["sub-01_task-rest_bold.nii.gz"]),
    ({"bold": {"session": "*"}, "mean": {"reconstruction": "*"}},
     ["sub-01_task-rest_rec-MoCoMean_bold.nii.gz", "sub-02_ses-01_task-rest_run-01_bold.nii.gz",
      "sub-02_ses-02_task-rest_run-01_bold.nii.gz"]),
    ({"bold": {"ses": ["02", None]}, "mean": {"rec": "x"}},          # BIDS keys, a list with null
     ["sub-01_task-rest_bold.nii.gz", "sub-02_ses-02_task-rest_run-01_bold.nii.gz"]),
    ({"bold": {"run": 1, "session": "01"}}, ["sub-01_task-rest_rec-MoCoMean_bold.nii.gz",   # run-1 is run-01
                                             "sub-02_ses-01_task-rest_run-01_bold.nii.gz"]),
    ({"bold": {"task": "motor"}, "mean": {"task": "motor"}}, []),
])
def test_filters(dataset, tmp_path, content, expected):
    found = layout.discover(dataset, tmp_path / "w", layout.load_filters(write_filters(tmp_path, content)))
    assert sorted(r.path.name for r in found.runs) == expected


def test_bids_keys_are_translated_to_pybids_names(tmp_path):
    filters = layout.load_filters(write_filters(tmp_path, {"bold": {"ses": "01", "acq": "*", "rec": None}}))
    assert filters["bold"]["session"] == "01" and filters["bold"]["acquisition"] == "*"
    assert "reconstruction" in filters["bold"] and "ses" not in filters["bold"]


@pytest.mark.parametrize("content, match", [
    ("{", "cannot read JSON"),
    ('{"bold": 3}', "expected"),
    ('{"bold": {"foo": "x"}}', r"query 'bold': unknown entity 'foo'; use a pybids entity name \(subject, session"),
    ('{"bold": {"task": 5}}', r"query 'bold', entity 'task': value 5 is not allowed; use a label of letters"),
    ('{"mean": {"task": {"a": 1}}}', r"query 'mean', entity 'task': value \{\"a\": 1\} is not allowed"),
    ('{"bold": {"task": [{"a": 1}]}}', r"entity 'task': value \{\"a\": 1\} is not allowed"),
    ('{"bold": {"task": [["rest"]]}}', r"entity 'task': value \[\"rest\"\] is not allowed"),
    ('{"bold": {"run": true}}', r"entity 'run': value true is not allowed; use a number"),
    ('{"bold": {"task": []}}', "an empty list selects nothing"),
    ('{"bold": {"task": "rest-eyesopen"}}', r"value \"rest-eyesopen\" is not allowed"),
    ('{"bold": {"part": "foo"}}', r"use one of imag, mag, phase, real"),
    ('{"bold": {"suffix": "T1w"}}', r"entity 'suffix': value \"T1w\" is not allowed; use 'bold' or \"\*\""),
    ('{"bold": {"datatype": "anat"}}', r"entity 'datatype'"),
    ('{"bold": {"extension": null}}', r"entity 'extension': value null is not allowed"),
    ('{"bold": {"ses": "01", "session": "02"}}', r"gives entity 'session' twice"),
])
def test_bad_filter_files(tmp_path, content, match):
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=match):
        layout.load_filters(path)


def test_other_queries_of_a_shared_filter_file_are_ignored(tmp_path, caplog):
    path = write_filters(tmp_path, {"t1w": {"datatype": "anat", "foo": 5}, "fmap": {}, "bold": {"session": "01"}})
    filters = layout.load_filters(path)
    assert set(filters) == {"bold", "mean"} and filters["bold"]["session"] == "01"
    assert "ignoring queries 'fmap', 't1w'" in caplog.text


def test_missing_subjects_and_bad_labels(dataset, tmp_path):
    found = layout.discover(dataset, tmp_path / "w", FILTERS, subjects=["02", "nobody"])
    assert found.missing_subjects == ["nobody"] and {r.subject for r in found.runs} == {"02"}
    for bad in ("../ds", "01/func", "0 1"):
        with pytest.raises(UsageError, match="not a BIDS label"):
            layout.discover(dataset, tmp_path / "w", FILTERS, subjects=[bad])
    with pytest.raises(EpisegError, match="does not exist"):
        layout.discover(tmp_path / "nowhere", tmp_path / "w", FILTERS)


def test_only_the_selected_participants_are_read(dataset, tmp_path):
    (dataset / "sub-01/func/sub-01_task-rest_bold.nii.gz").write_bytes(b"not a NIfTI")
    found = layout.discover(dataset, tmp_path / "w", FILTERS, subjects=["02"])
    assert all(r.kind == "run" for r in found.runs) and len(found.runs) == 2
    assert "sub-01" not in found.database.read_text()   # the other subject was not even listed


# --- the index: reuse, keys, refresh, integrity ------------------------------------------------

def cached(found) -> dict:
    return json.loads(found.database.read_text())


def test_index_is_reused_until_a_file_changes(dataset, tmp_path):
    first = layout.discover(dataset, tmp_path / "w", FILTERS)
    again = layout.discover(dataset, tmp_path / "w", FILTERS)
    assert not first.reused and again.reused and summary(again) == summary(first)
    assert again.database == first.database and again.database.is_relative_to(tmp_path / "w")
    write_image(dataset / "sub-01/func/sub-01_task-motor_bold.nii.gz")
    changed = layout.discover(dataset, tmp_path / "w", FILTERS)
    assert not changed.reused and "sub-01/func/sub-01_task-motor_bold.nii.gz" in relpaths(changed)


@pytest.mark.parametrize("sidecar", [
    "task-rest_bold.json",                                        # dataset root
    "sub-02/task-rest_bold.json",                                 # subject level
    "sub-02/ses-01/sub-02_ses-01_task-rest_bold.json",            # session level
    "sub-02/ses-01/func/sub-02_ses-01_task-rest_run-01_bold.json",  # the run's own
])
def test_editing_a_sidecar_at_any_level_is_seen(dataset, tmp_path, sidecar):
    path = write_json(dataset / sidecar, {"RepetitionTime": 2.0, "TaskName": "rest"})
    age(dataset)
    run = "sub-02/ses-01/func/sub-02_ses-01_task-rest_run-01_bold.nii.gz"
    before = {r.relpath: r for r in layout.discover(dataset, tmp_path / "w", FILTERS, subjects=["02"]).runs}
    assert before[run].metadata["RepetitionTime"] == 2.0
    path.write_text(json.dumps({"RepetitionTime": 2.5, "TaskName": "rest"}))  # same size, new content
    after = {r.relpath: r for r in layout.discover(dataset, tmp_path / "w", FILTERS, subjects=["02"]).runs}
    assert after[run].metadata["RepetitionTime"] == 2.5


def tamper(found, table: str, rel: str, position: int, value) -> None:
    """Change a cached fact in the index on disk, keeping its key: shows what is read from it."""
    index = cached(found)
    index[table][rel][position] = value
    found.database.write_text(json.dumps(index))


def test_warm_discovery_answers_from_the_index_and_refresh_reads_again(dataset, tmp_path):
    found = layout.discover(dataset, tmp_path / "w", FILTERS)
    tamper(found, "sidecars", "task-rest_bold.json", 1, {"RepetitionTime": 9.0, "TaskName": "rest"})
    warm = layout.discover(dataset, tmp_path / "w", FILTERS)
    assert warm.reused and {r.metadata["RepetitionTime"] for r in warm.runs} == {9.0}
    refreshed = layout.discover(dataset, tmp_path / "w", FILTERS, refresh=True)
    assert not refreshed.reused and {r.metadata["RepetitionTime"] for r in refreshed.runs} == {2.0}
    assert layout.discover(dataset, tmp_path / "w", FILTERS).reused


def test_only_changed_files_are_read_again(dataset, tmp_path):
    found = layout.discover(dataset, tmp_path / "w", FILTERS)
    kept, touched = (f"sub-02/ses-{s}/func/sub-02_ses-{s}_task-rest_run-01_bold.nii.gz" for s in ("01", "02"))
    for rel in (kept, touched):
        tamper(found, "images", rel, 1, [9, 9, 9, 9])
    os.utime(dataset / touched, (HOUR_AGO + 60, HOUR_AGO + 60))
    shapes = {r.relpath: r.shape for r in layout.discover(dataset, tmp_path / "w", FILTERS).runs}
    assert shapes[kept] == (9, 9, 9, 9) and shapes[touched] == RUN_4D


def test_files_changed_just_before_they_were_read_are_read_again(dataset, tmp_path):
    """A file modified less than RACY_NS before it was read could change again within the same
    timestamp tick, same size, without changing its signature: an index holding such a file is
    never reused as it is, until the file has aged."""
    sidecar = write_json(dataset / "task-rest_bold.json", {"RepetitionTime": 2.0, "TaskName": "rest"})
    first = layout.discover(dataset, tmp_path / "w", FILTERS)
    assert cached(first)["racy"] == ["task-rest_bold.json"]
    assert not layout.discover(dataset, tmp_path / "w", FILTERS).reused
    os.utime(sidecar, (HOUR_AGO, HOUR_AGO))
    assert not layout.discover(dataset, tmp_path / "w", FILTERS).reused
    assert layout.discover(dataset, tmp_path / "w", FILTERS).reused


@pytest.mark.parametrize("damage", [
    lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]),     # half written
    lambda p: p.write_text(""),
    lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "format": 0})),
    lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "images": {"x": [1]}})),
])
def test_a_damaged_index_is_never_trusted(dataset, tmp_path, damage):
    clean = layout.discover(dataset, tmp_path / "w", FILTERS)
    damage(clean.database)
    found = layout.discover(dataset, tmp_path / "w", FILTERS)
    assert not found.reused and summary(found) == summary(clean)


def test_one_index_per_selection(dataset, tmp_path):
    one = layout.discover(dataset, tmp_path / "w", FILTERS, subjects=["01"])
    everyone = layout.discover(dataset, tmp_path / "w", FILTERS)
    assert one.database != everyone.database and one.database.parent == everyone.database.parent
    assert layout.discover(dataset, tmp_path / "w", FILTERS, subjects=["01"], sessions=["01"]).reused


# --- odd inputs: each one an invalid run, never an exception --------------------------------------

ODD_NAMES = {
    "quote": "sub-01_task-re'st_bold.nii.gz",
    "double quote": 'sub-01_task-re"st_bold.nii.gz',
    "markup": "sub-01_task-<b>x_bold.nii.gz",
    "newline": "sub-01_task-rest\n_bold.nii.gz",
    "space": "sub-01_task-rest_bold (copy).nii.gz",
    "dash in label": "sub-01_task-rest-eyesopen_bold.nii.gz",
    "unicode": "sub-01_task-répos_bold.nii.gz",
    "undecodable bytes": os.fsdecode(b"sub-01_task-r\xe9st_bold.nii.gz"),
    "unknown entity": "sub-01_task-rest_foo-bar_bold.nii.gz",
    "entity twice": "sub-01_task-rest_task-motor_bold.nii.gz",
    "other subject": "sub-02_task-rest_bold.nii.gz",
    "no subject": "task-rest_bold.nii.gz",
    "run not a number": "sub-01_task-rest_run-a_bold.nii.gz",
    "upper-case suffix": "sub-01_task-rest_BOLD.nii.gz",
    "no key": "sub-01_rest_bold.nii.gz",
}


@pytest.mark.parametrize("name", ODD_NAMES.values(), ids=ODD_NAMES.keys())
def test_a_name_bids_cannot_parse_is_an_invalid_run(tmp_path, name):
    root = tmp_path / "ds"
    good = write_image(root / "sub-01/func/sub-01_task-rest_bold.nii.gz")
    write_json(root / "sub-01/func/sub-01_task-rest_bold.json", {"RepetitionTime": 2.0})
    write_image(root / "sub-01/func" / name)
    found = layout.discover(root, tmp_path / "w", FILTERS)
    runs = {r.path.name: r for r in found.runs}
    assert set(runs) == {good.name, name} and runs[good.name].kind == "run"
    odd = runs[name]
    assert odd.kind == "invalid" and odd.subject == "01" and odd.relpath == f"sub-01/func/{name}"
    assert odd.problem.startswith(printable(odd.relpath) + ": ") and "\n" not in odd.problem
    assert re.search(r"rename|shorten", odd.problem)
    assert BIDS_BOLD_NAME.fullmatch(runs[good.name].path.name)


def test_invalid_names_only_unsure_entities_escape_the_filters(tmp_path):
    """A filter still applies to what an invalid name says clearly (task-motor), not to what it
    garbles (task-rest-eyesopen)."""
    root = tmp_path / "ds"
    write_image(root / "sub-01/func/sub-01_task-motor_bold (copy).nii.gz")
    write_image(root / "sub-01/func/sub-01_task-rest-eyesopen_bold.nii.gz")
    found = layout.discover(root, tmp_path / "w", FILTERS, tasks=["rest"])
    assert [r.path.name for r in found.runs] == ["sub-01_task-rest-eyesopen_bold.nii.gz"]
    assert len(layout.discover(root, tmp_path / "w", FILTERS).runs) == 2


@pytest.mark.parametrize("rel, match", [
    ("sub-01/ses-01/func/sub-01_task-rest_bold.nii.gz", "the name has no ses- but the folder is ses-01"),
    ("sub-01/func/sub-01_ses-01_task-rest_bold.nii.gz", "the name has ses-01 but the folder is not a ses- folder"),
    ("sub-01 copy/func/sub-01_task-rest_bold.nii.gz", "the folder 'sub-01 copy' is not sub-<label>"),
    ("sub-01/ses-a.b/func/sub-01_ses-a.b_task-rest_bold.nii.gz", "the folder 'ses-a.b' is not ses-<label>"),
])
def test_folders_that_disagree_with_the_name(tmp_path, rel, match):
    write_image(tmp_path / "ds" / rel)
    [run] = layout.discover(tmp_path / "ds", tmp_path / "w", FILTERS).runs
    assert run.kind == "invalid" and match in run.problem
    assert run.subject == ("" if "copy" in rel else "01")


def test_the_same_run_as_nii_and_nii_gz(tmp_path):
    for extension in (".nii", ".nii.gz"):
        write_image(tmp_path / "ds" / f"sub-01/func/sub-01_task-rest_bold{extension}")
    runs = layout.discover(tmp_path / "ds", tmp_path / "w", FILTERS).runs
    assert [r.kind for r in runs] == ["invalid", "invalid"] and "keep one" in runs[0].problem


SIDECARS = {
    "not JSON": (b'{"RepetitionTime": 2.0', "not valid JSON (Expecting ',' delimiter, line 1 column 23)"),
    "a list": (b"[1, 2]", "holds a JSON list where BIDS expects an object"),
    "a number": (b"2.0", "holds a JSON float"),
    "undecodable": (b'{"TaskName": "r\xe9st"}', "not valid JSON"),
    "empty": (b"", "not valid JSON"),
}


@pytest.mark.parametrize("content, match", SIDECARS.values(), ids=SIDECARS.keys())
def test_a_broken_sidecar_invalidates_only_the_runs_it_applies_to(dataset, tmp_path, content, match):
    """sub-01_task-rest_bold.json applies to sub-01_task-rest_bold and (by inheritance) to
    sub-01_task-rest_rec-MoCoMean_bold, not to sub-02's runs."""
    write_json(dataset / "sub-01/func/sub-01_task-rest_bold.json", content)
    runs = layout.discover(dataset, tmp_path / "w", FILTERS).runs
    assert [(r.subject, r.kind, r.shape) for r in runs] == [
        ("01", "invalid", RUN_4D), ("01", "invalid", MEAN_3D), ("02", "run", RUN_4D), ("02", "run", RUN_4D)]
    for broken in runs[:2]:
        assert broken.problem.startswith("sub-01/func/sub-01_task-rest_bold.json: ") and match in broken.problem


def test_a_broken_inherited_sidecar_names_itself(dataset, tmp_path):
    write_json(dataset / "task-rest_bold.json", b"{")
    runs = layout.discover(dataset, tmp_path / "w", FILTERS).runs
    assert len(runs) == 4 and all(r.kind == "invalid" and r.problem.startswith("task-rest_bold.json: ") for r in runs)


def truncated_gzip(path: Path) -> None:
    write_image(path)
    path.write_bytes(path.read_bytes()[:40])


def truncated_nii(path: Path) -> None:
    write_image(path)
    path.write_bytes(path.read_bytes()[:-30])


BAD_HEADERS = {
    "empty file": (lambda p: p.write_bytes(b""), ".nii.gz", "cannot be read as NIfTI"),
    "text": (lambda p: p.write_text("hello"), ".nii.gz", "cannot be read as NIfTI"),
    "truncated gzip header": (truncated_gzip, ".nii.gz", "cannot be read as NIfTI"),
    "2D image": (lambda p: write_image(p, (4, 4)), ".nii.gz", "is 2D (4, 4)"),
    "truncated data": (truncated_nii, ".nii", "is truncated: its header describes"),
}


@pytest.mark.parametrize("damage, extension, match", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_an_unusable_header_is_an_invalid_run(dataset, tmp_path, damage, extension, match):
    path = dataset / f"sub-01/func/sub-01_task-motor_bold{extension}"
    path.parent.mkdir(parents=True, exist_ok=True)
    damage(path)
    runs = {r.path.name: r for r in layout.discover(dataset, tmp_path / "w", FILTERS).runs}
    bad = runs[path.name]
    assert bad.kind == "invalid" and match in bad.problem and path.name in bad.problem
    assert sum(r.kind == "invalid" for r in runs.values()) == 1 and len(runs) == 5


# --- paths: datatype and entities from the relative path, symbolic links ----------------------

@pytest.mark.parametrize("parents", ["perf", "anat", "func", "dwi", "derivatives", "sub-07", "ses-09",
                                     "task-motor_run-3", "sub-x/ses-y/func", ".hidden", "code"])
def test_entities_come_from_the_path_inside_the_dataset(tmp_path, parents):
    root = small_dataset(tmp_path / parents / "study")
    runs = layout.discover(root, tmp_path / "w", FILTERS).runs
    assert len(runs) == 4 and all(r.kind in ("run", "mean") for r in runs)
    assert {(r.subject, r.entities.get("session"), r.entities["task"], r.entities["datatype"]) for r in runs} == {
        ("01", None, "rest", "func"), ("02", "01", "rest", "func"), ("02", "02", "rest", "func")}


def test_a_folder_link_loop_gives_each_run_once(dataset, tmp_path):
    os.symlink("..", dataset / "sub-01/func/loop")
    os.symlink(".", dataset / "sub-01/func/self")
    os.symlink("..", dataset / "sub-02/ses-01/func/up")
    assert len(layout.discover(dataset, tmp_path / "w", FILTERS).runs) == 4


def test_git_annex_file_links_and_a_linked_root(tmp_path):
    """DataLad datasets: every file a link into .git/annex/objects; one not retrieved."""
    root, store = tmp_path / "ds", tmp_path / "ds/.git/annex/objects"
    for rel, make in (("sub-01/func/sub-01_task-rest_bold.nii.gz", write_image),
                      ("sub-01/func/sub-01_task-rest_bold.json", lambda p: write_json(p, {"RepetitionTime": 2.5}))):
        target = make(store / rel.replace("/", "_"))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(target, (root / rel).parent), root / rel)
    os.symlink("../../.git/annex/objects/missing", root / "sub-01/func/sub-01_task-motor_bold.nii.gz")
    (tmp_path / "link").symlink_to(root)
    found = layout.discover(tmp_path / "link", tmp_path / "w", FILTERS)
    motor, rest = found.runs
    assert rest.kind == "run" and rest.metadata == {"RepetitionTime": 2.5}
    assert rest.path == tmp_path / "link/sub-01/func/sub-01_task-rest_bold.nii.gz"
    assert motor.kind == "invalid" and "symbolic link to missing content" in motor.problem
    assert "datalad get" in motor.problem


def test_a_linked_subject_folder_is_followed(dataset, tmp_path):
    shutil.move(dataset / "sub-02", tmp_path / "storage")
    os.symlink(tmp_path / "storage", dataset / "sub-02")
    runs = layout.discover(dataset, tmp_path / "w", FILTERS, subjects=["02"]).runs
    assert [(r.relpath, r.kind) for r in runs] == [
        ("sub-02/ses-01/func/sub-02_ses-01_task-rest_run-01_bold.nii.gz", "run"),
        ("sub-02/ses-02/func/sub-02_ses-02_task-rest_run-01_bold.nii.gz", "run")]
    assert runs[0].path == dataset / runs[0].relpath


def test_a_linked_folder_must_agree_with_the_names_inside(dataset, tmp_path):
    os.symlink(dataset / "sub-02/ses-01", dataset / "sub-01/ses-03")
    linked = [r for r in layout.discover(dataset, tmp_path / "w", FILTERS).runs if "ses-03" in r.relpath]
    assert [r.kind for r in linked] == ["invalid"]
    assert "the name has sub-02 but the folder is sub-01" in linked[0].problem


def test_output_is_sorted_and_deterministic(dataset, tmp_path):
    for label in ("10", "9", "B", "a"):
        write_image(dataset / f"sub-{label}/func/sub-{label}_task-rest_bold.nii.gz")
    first = layout.discover(dataset, tmp_path / "w1", FILTERS)
    assert relpaths(first) == sorted(relpaths(first))
    assert summary(layout.discover(dataset, tmp_path / "w2", FILTERS)) == summary(first)


# --- concurrent and killed processes --------------------------------------------------------

CHILD = """
import json, sys
from pathlib import Path
from episeg_bids import layout
args = json.loads(sys.argv[1])
found = layout.discover(Path(args["bids"]), Path(args["work"]), layout.load_filters(None),
                        subjects=args.get("subjects"), sessions=args.get("sessions"))
print(json.dumps([[r.relpath, r.kind, r.metadata.get("RepetitionTime"), r.problem] for r in found.runs]))
"""


def child(bids: Path, work: Path, **selection) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argument = json.dumps({"bids": str(bids), "work": str(work), **selection})
    return subprocess.Popen([sys.executable, "-c", CHILD, argument], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def in_process(bids: Path, work: Path, **selection) -> list:
    found = layout.discover(bids, work, FILTERS, **selection)
    return [[r.relpath, r.kind, r.metadata.get("RepetitionTime"), r.problem] for r in found.runs]


def bulk_dataset(root: Path, subjects: int) -> Path:
    """``subjects`` × 2 sessions × 2 runs of one tiny 4D image, each with its sidecar."""
    template = write_image(root / "template.nii.gz").read_bytes()
    (root / "template.nii.gz").unlink()
    write_json(root / "task-rest_bold.json", {"RepetitionTime": 2.0, "TaskName": "rest"})
    for s in range(subjects):
        for ses in ("1", "2"):
            func = root / f"sub-{s:04d}/ses-{ses}/func"
            func.mkdir(parents=True)
            for run in ("1", "2"):
                stem = f"sub-{s:04d}_ses-{ses}_task-rest_run-{run}_bold"
                (func / f"{stem}.nii.gz").write_bytes(template)
                (func / f"{stem}.json").write_text('{"EchoTime": 0.03}')
    age(root)
    return root


def test_concurrent_jobs_share_one_work_dir(tmp_path):
    """Same participant twice, same participant with two sessions, everyone twice: all at once."""
    bids = bulk_dataset(tmp_path / "ds", 150)
    selections = [{"subjects": ["0001"]}, {"subjects": ["0001"]}, {"subjects": ["0001"], "sessions": ["1"]},
                  {"subjects": ["0001"], "sessions": ["2"]}, {}, {}]
    for round_ in range(2):
        if round_:  # the same again after an edit: every job now finds a stale index
            write_json(bids / "task-rest_bold.json", {"RepetitionTime": 2.5, "TaskName": "rest"})
            age(bids)
        jobs = [child(bids, tmp_path / "shared", **s) for s in selections]
        results = [job.communicate(timeout=300) for job in jobs]
        for job, (out, err), selection in zip(jobs, results, selections):
            assert job.returncode == 0, err
            assert json.loads(out) == in_process(bids, tmp_path / f"alone{round_}", **selection)
            assert {rt for _, _, rt, _ in json.loads(out)} == {2.5 if round_ else 2.0}


def lock_is_held(work: Path) -> bool:
    """True while another process holds a discovery lock in ``work`` (it is indexing)."""
    for lock in work.glob("discovery/*/index-all.lock"):
        with open(lock, "a+b") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def test_a_job_killed_while_indexing_leaves_nothing_a_rerun_trusts(tmp_path):
    bids = bulk_dataset(tmp_path / "ds", 300)
    work = tmp_path / "work"
    index = layout.discover(bids, work, FILTERS).database       # an index that is about to go stale
    write_json(bids / "task-rest_bold.json", {"RepetitionTime": 3.0, "TaskName": "rest"})
    write_image(bids / "sub-0007/ses-1/func/sub-0007_ses-1_task-rest_run-1_bold.nii.gz", MEAN_3D)
    age(bids)
    expected = in_process(bids, tmp_path / "clean")
    rng, killed_while_indexing = random.Random(0), 0
    for _ in range(8):
        job = child(bids, work)
        deadline = time.monotonic() + 60
        while not lock_is_held(work) and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.25))
        job.send_signal(signal.SIGKILL)
        job.communicate()
        stale = json.loads(index.read_text())["sidecars"]["task-rest_bold.json"][1]["RepetitionTime"] == 2.0
        killed_while_indexing += job.returncode == -signal.SIGKILL and stale
        for path in work.glob("discovery/*/index-*.json"):
            json.loads(path.read_text())                        # any final name holds a whole index
    assert killed_while_indexing >= 4
    assert in_process(bids, work) == expected
    assert layout.discover(bids, work, FILTERS).reused
    assert not list(work.glob("discovery/*/.index-*"))         # temporaries of killed writers removed
