"""gateway.sources.archive.discover: EDF/BDF files, DICOM studies grouped by StudyInstanceUID, named files."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.sources.archive import discover
from gateway.synthetic.dicom_study import write_psg_study
from gateway.synthetic.night import write_synthetic_night


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """An EDF night, a DICOM study of three instances in a sub-folder, a corrupt .dcm, a text file, a
    hidden file and a partial download."""
    root = tmp_path_factory.mktemp("archive")
    write_synthetic_night(root / "night.edf", hours=0.01, seed=1)
    write_psg_study(root / "dicom" / "study-1", hours=0.01, seed=3)
    (root / "bad.dcm").write_bytes(b"not dicom")
    (root / "notes.txt").write_text("scored by hand\n")
    (root / ".hidden.edf").write_bytes(b"0       ")
    (root / "copying.edf.part").write_bytes(b"0       ")
    return root


def test_a_folder_lists_edf_files_and_dicom_studies(archive):
    found = discover([archive])
    assert [(i.kind, i.name) for i in found.items] == [("file", "night.edf"),
                                                        ("dicom", "dicom/study-1/ (3 DICOM objects)")]
    dicom = found.items[1]
    assert dicom.study_uid and len(dicom.paths) == 3 and len(dicom.instances) == 3
    assert all(p.parent == archive / "dicom" / "study-1" for p in dicom.paths)
    assert found.unreadable == [("bad.dcm", "not a readable DICOM file: InvalidDicomError")]
    assert found.skipped == {"not a PSG file": 1}  # hidden files and partial downloads are not even counted
    assert found.items[0].source == f"archive:{archive}"


def test_files_as_items_leaves_folders_as_they_are(archive):
    plain, named = discover([archive]), discover([archive], files_as_items=True)
    assert named.items == plain.items and named.unreadable == plain.unreadable and named.skipped == plain.skipped


def test_a_named_edf_file_is_one_item(archive):
    for files_as_items in (False, True):
        found = discover([archive / "night.edf"], files_as_items=files_as_items)
        (item,) = found.items
        assert (item.kind, item.name, item.paths, item.root) == ("file", "night.edf", (archive / "night.edf",),
                                                                 archive / "night.edf")
        assert item.recorded is not None  # the EDF header's start date


def test_a_named_file_of_another_kind_is_one_item_with_files_as_items(archive):
    notes = archive / "notes.txt"
    assert discover([notes]).items == [] and discover([notes]).skipped == {"not a PSG file": 1}
    (item,) = discover([notes], files_as_items=True).items
    assert (item.kind, item.paths, item.recorded) == ("file", (notes,), None)  # its reader will say why not
    (bad,) = discover([archive / "bad.dcm"], files_as_items=True).items
    assert bad.kind == "file" and discover([archive / "bad.dcm"]).unreadable


def test_a_named_dicom_file_is_read_on_its_own_with_files_as_items(archive):
    eeg = archive / "dicom" / "study-1" / "eeg.dcm"
    (grouped,) = discover([eeg]).items
    assert grouped.kind == "dicom" and grouped.paths == (eeg,) and grouped.study_uid
    (single,) = discover([eeg], files_as_items=True).items
    assert single.kind == "file" and single.paths == (eeg,) and single.study_uid is None


def test_the_same_file_under_two_roots_is_one_item(archive):
    found = discover([archive, archive / "night.edf"])
    assert [i.name for i in found.items].count("night.edf") == 1


def test_filters_apply_to_named_files(archive):
    night = archive / "night.edf"
    found = discover([night], exclude=["*.edf"], files_as_items=True)
    assert found.items == [] and found.skipped == {"excluded (--exclude)": 1}
