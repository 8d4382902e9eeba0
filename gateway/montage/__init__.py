"""The montage: which of a site's channel labels feed which SleepFM modality.

Modules:

* ``table``: montage tables: rules, loading and validation (``extends``, conflicts, versions), and
  matching labels to modalities (what the pipeline uses);
* ``editing``: changing a site table file in place (``montage add|remove``): the rule as text, comments
  and layout kept, the folder lock, validation before an atomic write;
* ``holder``: the table the daemon serves, re-read when the site's file changes (last good one kept);
* ``audit``: the audit log beside a table, one JSON line per change;
* ``recordings``: the recordings a table is tried on (``montage test|unmapped``), found by the archive
  discovery (:mod:`gateway.sources.archive`).
"""
