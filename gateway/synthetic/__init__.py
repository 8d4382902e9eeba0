"""Synthetic studies for the demo, the tests and the benchmarks: an example night written as EDF/BDF
(``night``) and as a DICOM waveform study (``dicom_study``). Kept apart from the readers, which only read."""
