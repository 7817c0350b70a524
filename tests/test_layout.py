import json

import pytest

from conftest import EXAMPLE
from episeg_bids import layout
from episeg_bids.errors import UsageError


@pytest.fixture(scope="module")
def example_layout(tmp_path_factory):
    return layout.build_layout(EXAMPLE, tmp_path_factory.mktemp("work"))


def names(runs):
    return sorted(r.path.name for r in runs)


def test_default_queries_find_4d_runs_and_3d_means(example_layout):
    runs = layout.find_runs(example_layout, layout.load_filters(None))
    kinds = {r.path.name: r.kind for r in runs}
    assert kinds == {
        "sub-brain01_task-rest_bold.nii.gz": "run",
        "sub-errsm30_ses-01_task-rest_run-01_bold.nii.gz": "run",
        "sub-leipzigR01_task-rest_rec-MoCoMean_bold.nii.gz": "mean",
    }
    errsm = next(r for r in runs if r.subject == "errsm30")
    assert errsm.entities["run"] == "01" and errsm.metadata["RepetitionTime"] == 1.13
    assert errsm.relpath == "sub-errsm30/ses-01/func/sub-errsm30_ses-01_task-rest_run-01_bold.nii.gz"


def test_labels_select_subjects_and_sessions(example_layout):
    filters = layout.load_filters(None)
    runs = layout.find_runs(example_layout, filters, subjects=layout.strip_prefix(["sub-errsm30", "leipzigR01"], "sub-"))
    assert {r.subject for r in runs} == {"errsm30", "leipzigR01"}
    runs = layout.find_runs(example_layout, filters, sessions=["01"])
    assert {r.subject for r in runs} == {"errsm30"}


def test_filter_null_means_entity_absent(example_layout, tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"bold": {"session": None}, "mean": {"reconstruction": None}}))
    runs = layout.find_runs(example_layout, layout.load_filters(path))
    assert names(runs) == ["sub-brain01_task-rest_bold.nii.gz"]


def test_filter_star_means_any_value(example_layout, tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"bold": {"session": "*"}, "mean": {"reconstruction": "*"}}))
    runs = layout.find_runs(example_layout, layout.load_filters(path))
    assert names(runs) == ["sub-errsm30_ses-01_task-rest_run-01_bold.nii.gz",
                           "sub-leipzigR01_task-rest_rec-MoCoMean_bold.nii.gz"]


def test_filter_that_selects_nothing(example_layout, tmp_path):
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"bold": {"task": "motor"}, "mean": {"task": "motor"}}))
    assert layout.find_runs(example_layout, layout.load_filters(path)) == []


@pytest.mark.parametrize("content, match", [("{", "cannot read JSON"), ('{"bold": 3}', "expected")])
def test_bad_filter_files(tmp_path, content, match):
    path = tmp_path / "f.json"
    path.write_text(content)
    with pytest.raises(UsageError, match=match):
        layout.load_filters(path)


def test_database_is_reused_until_the_dataset_changes(tmp_path, example_bids):
    work = tmp_path / "work"
    layout.build_layout(example_bids, work)
    first = sorted((work / "pybids_db").iterdir())
    layout.build_layout(example_bids, work)
    assert sorted((work / "pybids_db").iterdir()) == first
    new = example_bids / "sub-brain01" / "func" / "sub-brain01_task-motor_bold.nii.gz"
    new.write_bytes((example_bids / "sub-brain01" / "func" / "sub-brain01_task-rest_bold.nii.gz").read_bytes())
    rebuilt = layout.build_layout(example_bids, work)
    assert len(list((work / "pybids_db").iterdir())) == 2
    assert "motor" in rebuilt.get_tasks()


def test_missing_subjects(example_layout):
    assert layout.missing_subjects(example_layout, ["errsm30", "nobody"]) == ["nobody"]


def test_other_queries_of_a_shared_filter_file_are_ignored(tmp_path, caplog):
    path = tmp_path / "babs.json"
    path.write_text(json.dumps({"t1w": {"datatype": "anat"}, "fmap": {}, "bold": {"session": "01"}}))
    filters = layout.load_filters(path)
    assert set(filters) == {"bold", "mean"} and filters["bold"]["session"] == "01"
    assert "ignoring queries 'fmap', 't1w'" in caplog.text


def test_only_selected_participants_are_indexed(tmp_path):
    selected = layout.build_layout(EXAMPLE, tmp_path / "work", ["errsm30"])
    assert selected.get_subjects() == ["errsm30"]
    assert layout.missing_subjects(selected, ["errsm30", "nobody"]) == ["nobody"]
    everyone = layout.build_layout(EXAMPLE, tmp_path / "work")
    assert sorted(everyone.get_subjects()) == ["brain01", "errsm30", "leipzigR01"]
    assert len(list((tmp_path / "work" / "pybids_db").iterdir())) == 2   # one database per selection
