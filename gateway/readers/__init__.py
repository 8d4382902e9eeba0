"""Readers: every supported input becomes one :class:`~gateway.recording.Recording`.

:func:`read_recording` picks the reader from the file's content (not only its name): EDF/EDF+
(``0       `` header), BDF/BDF+ (``\\xffBIOSEMI``), DICOM (``DICM`` at byte 128), or a folder of
DICOM waveform files belonging to one study. Formats MNE reads and we do not (BrainVision ``.vhdr``,
Nihon Kohden ``.eeg``, GDF, EGI, EEGLAB, FIF ...) go to MNE when the ``mne`` extra is installed
(:mod:`.mne_reader`).
"""

from __future__ import annotations

from pathlib import Path

from ..recording import Recording
from .errors import ReaderError

EDF_SUFFIXES = (".edf", ".bdf", ".rec")
DICOM_SUFFIXES = (".dcm", ".dicom")


def sniff_format(path: Path) -> str | None:
    """``"edf"``, ``"dicom"`` or None, from the first bytes of a file."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    if head[:8] == b"0       " or head[:8] == b"\xffBIOSEMI":
        return "edf"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    return None


def read_recording(path: str | Path) -> Recording:
    """Decode an EDF/BDF file, a DICOM waveform file, or a folder of one study's DICOM files."""
    path = Path(path)
    if path.is_dir() and path.name.lower().endswith(".mff"):  # an EGI recording is a folder
        from .mne_reader import read_with_mne

        return read_with_mne(path)
    if path.is_dir():
        from .dicom_waveform import read_dicom_study

        files = sorted(p for p in path.rglob("*") if p.is_file() and sniff_format(p) == "dicom")
        if not files:
            raise ReaderError(path, "folder holds no DICOM files", kind="not_found")
        # A study folder may also hold a DICOMDIR, reports or audio: skip those, read the waveforms.
        return read_dicom_study(files, ignore_unsupported=True)
    if not path.exists():
        raise ReaderError(path, "file not found", kind="not_found")
    kind = sniff_format(path)
    if kind == "dicom":
        from .dicom_waveform import read_dicom_study

        return read_dicom_study([path])
    if kind == "edf" or path.suffix.lower() in EDF_SUFFIXES:
        from .edf import read_edf

        return read_edf(path)
    from .mne_reader import mne_suffix, read_with_mne

    if mne_suffix(path) is not None:  # BrainVision, Nihon Kohden, GDF, EGI ...: MNE reads them (optional)
        return read_with_mne(path)
    raise ReaderError(path, "not an EDF, BDF or DICOM file (unrecognised header)", kind="unsupported")
