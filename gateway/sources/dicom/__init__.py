"""The DICOM source: a C-STORE/C-ECHO receiver (``receiver``)."""
