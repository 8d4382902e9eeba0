"""The pipeline: what happens to one study between its arrival and its result.

``intake`` registers what the sources hand over; ``states`` holds the study state machine (one
transition table, checked by the repository); ``steps`` decodes (``identifiers``: sidecars and
file-name patterns), prepares (``prepare``: map + preprocess into one ``ReadyStudy``), infers and
stores; ``outputs`` writes and reads the result files; ``flags`` decides the quiet risk flag;
``errors`` classifies a failure (retry later or FAILED); ``inputs`` moves the input files to where a
study's state says; ``runner`` records each step as a committed state (``StudySteps``, shared with the
archive batch) and carries a claimed study through all of them (``Pipeline``, the daemon's);
``scoring`` compares the hypnogram with a scored one. The daemon, the archive batch and
``psg-gateway infer`` call the same steps.
"""
