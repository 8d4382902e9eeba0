"""Bridges between :class:`~gateway.recording.Recording` and other toolkits' types (optional extras)."""
