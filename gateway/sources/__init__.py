"""Study sources: adapters that put received studies into the spool and hand them to the intake.

``base`` defines the :class:`~gateway.sources.base.Source` protocol (start, poll, stop, health) and the
:class:`~gateway.sources.base.Intake` they hand arrivals to; ``dropfolder`` watches folders and claims
stable files; ``dicom`` receives C-STORE waveform studies; ``archive`` lists a PSG archive for the batch
and ``montage test`` (a one-shot listing, not a live source). The pipeline does the rest.
"""
