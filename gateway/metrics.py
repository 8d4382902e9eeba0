"""Prometheus metrics of one daemon, in their own registry so tests and several daemons never clash."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]


class Metrics:
    """Every metric the daemon exports; sources and the pipeline increment these."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.studies_by_state = Gauge(
            "psg_studies", "Studies by state", ["state"], registry=r)
        self.study_transitions = Counter(
            "psg_study_transitions_total", "Study state transitions", ["to_state"], registry=r)
        self.stage_seconds = Histogram(
            "psg_stage_seconds", "Time per pipeline step", ["stage"], registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))
        self.dicom_associations = Counter(
            "psg_dicom_associations_total", "DICOM associations by outcome (accepted, rejected, aborted)",
            ["result"], registry=r)
        self.dicom_active_associations = Gauge(
            "psg_dicom_active_associations", "Open DICOM associations", registry=r)
        self.dicom_pending_connections = Gauge(
            "psg_dicom_pending_connections", "DICOM connections that have not yet sent an A-ASSOCIATE-RQ",
            registry=r)
        self.dicom_connections_closed = Counter(
            "psg_dicom_connections_closed_total",
            "DICOM connections closed before their A-ASSOCIATE-RQ, by reason (acse_timeout, per_host_cap, "
            "peer_closed, invalid_pdu, shutdown)", ["reason"], registry=r)
        self.dicom_instances = Counter(
            "psg_dicom_instances_total", "C-STORE instances by outcome (stored, duplicate, failed, refused)",
            ["result"], registry=r)
        self.dicom_bytes = Counter(
            "psg_dicom_received_bytes_total", "Bytes of DICOM instances written to the spool", registry=r)
        self.dropfolder_files = Counter(
            "psg_dropfolder_files_total", "Drop-folder files by outcome (claimed, duplicate, failed)",
            ["result"], registry=r)
        self.outbox_depth = Gauge(
            "psg_outbox_depth", "Messages waiting in the outbox", registry=r)
        self.hl7_messages = Counter(
            "psg_hl7_deliveries_total", "Delivery tries by outcome (acked, naked, error, not_connected, dead)",
            ["outcome"], registry=r)
        self.hl7_possible_duplicates = Counter(
            "psg_hl7_possible_duplicates_total",
            "Attempts found in flight after a crash or takeover and resent with the same MSH-10", registry=r)
        self.dead_letters = Gauge(
            "psg_dead_letters", "Messages in the dead-letter state", registry=r)
        self.montage_reload_failing = Gauge(
            "psg_montage_reload_failing",
            "1 while the montage table file does not load (the last good table is still in use), else 0",
            registry=r)
        self.flag_outcomes = Counter(
            "psg_flag_outcomes_total",
            "Watched outcomes decided by the flag step: flagged, second_look (in the band below the threshold), "
            "or withheld (the study's risk flags withheld)", ["decision"], registry=r)
        self.report_failures = Counter(
            "psg_report_failures_total",
            "Study reports (report.html/report.pdf) that could not be written; the study's results went on",
            registry=r)
        self.risk_flags_withheld = Counter(
            "psg_risk_flags_withheld_total",
            "Studies whose risk flags were withheld, by reason: quality (signals not interpretable) or modality "
            "(a modality the heads were trained with is missing)", ["reason"], registry=r)
        self.last_scan = Gauge(
            "psg_last_scan_timestamp_seconds", "When the drop folders were last scanned", registry=r)
