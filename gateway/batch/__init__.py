"""Retrospective batch over a PSG archive: discovery, the batch runner and the researcher export."""
