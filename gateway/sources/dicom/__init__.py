"""The DICOM source: a C-STORE/C-ECHO receiver (``receiver``) and its pynetdicom speed-ups (``fastpaths``)."""
