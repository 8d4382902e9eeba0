"""The optional reader for formats MNE reads and we do not (the ``mne`` extra).

BrainVision (``.vhdr``), Nihon Kohden (``.eeg``), GDF, EGI (``.mff`` folders, ``.raw``), EEGLAB
(``.set``), FIF, Neuroscan (``.cnt``) ... are opened with ``mne.io.read_raw`` (not preloaded) and turned
into a :class:`~gateway.recording.Recording` by :func:`gateway.interop.mne.from_mne`; each channel is read
from the file when the pipeline asks for it. EDF/BDF and DICOM stay on our own readers. Without MNE
installed, a file with one of these suffixes is refused with one line naming the extra.
"""

from __future__ import annotations

from pathlib import Path

from ..recording import Recording
from .errors import ReaderError, os_error

# Suffixes (lower case) handed to MNE: mne.io.read_raw's own, less those we read ourselves, plus EGI's .raw.
MNE_SUFFIXES = (".vhdr", ".ahdr", ".eeg", ".gdf", ".mff", ".raw", ".set", ".fif", ".fif.gz", ".cnt", ".nxe",
                ".cdt", ".lay", ".mefd", ".nedf", ".sqd", ".con", ".ds", ".snirf")


def mne_suffix(path: Path) -> str | None:
    """The suffix of ``path`` that MNE reads for us, or None."""
    name = path.name.lower()
    return next((s for s in sorted(MNE_SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def read_with_mne(path: str | Path) -> Recording:
    """Read ``path`` with MNE into a :class:`Recording` (channels read lazily from the file)."""
    path = Path(path)
    suffix = mne_suffix(path) or path.suffix.lower()
    try:
        import mne
    except ImportError:
        raise ReaderError(path, f"install psg-gateway[mne] to read {suffix} files", kind="unsupported") from None
    from ..interop.mne import from_mne, with_source_path

    try:
        if suffix == ".raw":
            raw = mne.io.read_raw_egi(path, preload=False, verbose="error")
        else:
            raw = mne.io.read_raw(path, preload=False, verbose="error")
    except OSError as exc:
        raise os_error(path, exc) from None
    except (ValueError, RuntimeError, KeyError, IndexError, TypeError, NotImplementedError) as exc:
        # MNE's own errors; its message may quote the path (PHI), so name the type only
        raise ReaderError(path, f"MNE could not read the file ({type(exc).__name__})", kind="corrupt") from None
    return with_source_path(from_mne(raw), path)
