"""The pipeline: what happens to one study between its arrival and its result.

``states`` holds the study state machine (one transition table, checked by the repository);
``steps`` decodes, maps and prepares a recording into one value ready for the engine; ``outputs``
writes and reads the result files; ``flags`` decides the quiet risk flag; ``inputs`` moves the input
files to where a study's state says; ``runner`` drives a claimed study through the steps. The daemon,
the archive batch and ``psg-gateway infer`` call the same steps.
"""
