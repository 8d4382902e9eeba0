"""The daemon's one configuration file: schema, loading, environment overrides and checks.

A file is YAML (``.yaml``/``.yml``) or TOML (``.toml``). Every key has a default, so an empty file
is a working embedded configuration (SQLite, ``./var`` paths, DICOM on 127.0.0.1). Unknown keys are
errors: a typo must not silently fall back to a default.

Environment overrides keep secrets out of the file: ``PSG__<SECTION>__<KEY>=value`` sets any key
(``PSG__DATABASE__URL``, ``PSG__DICOM__TLS__KEY_FILE``); list items are addressed by index
(``PSG__DROP_FOLDERS__0__PATH``). Values are parsed as YAML scalars, so ``true``/``30`` work.
``PSG_DATABASE_URL`` is accepted as the common short form of ``PSG__DATABASE__URL``.

:func:`load_config` raises :class:`ConfigError` whose ``problems`` each name the key path
(``dicom.allowed_callers[0].ae_title: ...``).
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from inference.quality import QualityThresholds

__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "DatabaseConfig",
    "DicomCaller",
    "DicomConfig",
    "DropFolderConfig",
    "FlagOutcome",
    "FlagsConfig",
    "GatewayConfig",
    "Hl7Config",
    "HttpConfig",
    "LoggingConfig",
    "ModelConfig",
    "MontageConfig",
    "PathsConfig",
    "PipelineConfig",
    "QualityConfig",
    "RetentionConfig",
    "ServiceConfig",
    "SleepFinding",
    "TlsConfig",
    "load_config",
]

ENV_PREFIX = "PSG__"
_AE_TITLE = re.compile(r"^[\x20-\x7e]{1,16}$")


class ConfigError(ValueError):
    """A configuration file that cannot be used; ``problems`` are ``"key.path: message"`` strings."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(_Section):
    """Where the daemon keeps its files; relative paths are relative to the config file's folder."""

    var_dir: Path = Path("var")
    spool: Path | None = None  # default <var_dir>/spool
    outputs: Path | None = None  # default <var_dir>/outputs
    processed: Path | None = None  # default <var_dir>/processed
    quarantine: Path | None = None  # default <var_dir>/quarantine

    def resolved(self, base: Path) -> PathsConfig:
        var = _under(base, self.var_dir)
        return PathsConfig(
            var_dir=var,
            spool=_under(base, self.spool) if self.spool else var / "spool",
            outputs=_under(base, self.outputs) if self.outputs else var / "outputs",
            processed=_under(base, self.processed) if self.processed else var / "processed",
            quarantine=_under(base, self.quarantine) if self.quarantine else var / "quarantine",
        )


class DatabaseConfig(_Section):
    # None: SQLite file <var_dir>/psg-gateway.db. PostgreSQL: postgresql+psycopg://user@host/db
    url: str | None = None
    echo: bool = False

    @field_validator("url")
    @classmethod
    def _known_backend(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^(sqlite|postgresql)(\+\w+)?://", v):
            raise ValueError("must start with sqlite:// or postgresql:// (postgresql+psycopg://)")
        return v


class ModelConfig(_Section):
    bundle: str = "demo"  # "demo" (untrained weights, generated locally) or a bundle folder
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    threads: int = Field(0, ge=0)  # 0: torch's default
    windows_per_batch: int | None = Field(None, ge=1, le=256)  # None: 8 on CPU, 64 on CUDA
    # The site's own heads (psg-gateway heads fit): Cox risk and apnea head folders, and a re-fitted
    # staging head that replaces the bundle's. Each is checked against its checksum and the bundle.
    site_heads: list[Path] = Field(default_factory=list)
    staging_head: Path | None = None


class MontageConfig(_Section):
    # The site's montage table file (it may `extends` others); None: the built-in default table.
    table: Path | None = None
    # How often the table file is re-read; a changed table is used from the next study on.
    reload_check_seconds: float = Field(10.0, gt=0)


class DropFolderConfig(_Section):
    path: Path
    recursive: bool = True
    # A file is taken once its size and mtime have not changed for this long.
    stable_seconds: float = Field(10.0, ge=0)
    patterns: list[str] = Field(default_factory=lambda: ["*.edf", "*.bdf", "*.rec"])
    filename_pattern: str | None = None  # regex with named groups, see identifiers.from_filename
    label: str | None = None  # source name in the study row and montage scopes; default folder:<path>

    @field_validator("filename_pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return v

    @property
    def source(self) -> str:
        return self.label or f"folder:{self.path}"


class DicomCaller(_Section):
    ae_title: str
    host: str | None = None  # optional: the caller's address must match too

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)


class TlsConfig(_Section):
    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None  # CA bundle that client certificates must chain to
    require_client_cert: bool = False  # mutual TLS

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TlsConfig:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("cert_file and key_file are required when enabled")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("ca_file is required when require_client_cert is true")
        return self


class DicomConfig(_Section):
    enabled: bool = True
    ae_title: str = "PSGGATEWAY"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)  # 0: any free port (tests)
    # Empty list: any calling AE is accepted (only sensible on 127.0.0.1). Otherwise, the allow-list.
    allowed_callers: list[DicomCaller] = Field(default_factory=list)
    require_called_ae: bool = True  # reject associations addressed to another AE title
    max_associations: int = Field(10, ge=1)  # at once; only callers that sent an A-ASSOCIATE-RQ count
    network_timeout_seconds: float = Field(60.0, gt=0)
    # A connection must send its A-ASSOCIATE-RQ within this long or it is closed (also pynetdicom's other
    # ACSE waits): a silent connection cannot hold the port for the whole network timeout.
    acse_timeout_seconds: float = Field(10.0, gt=0)
    # Connections from one host that have not yet sent an A-ASSOCIATE-RQ; the next one is closed at once.
    max_pending_per_host: int = Field(4, ge=1)
    # A study is complete when no new instance arrived for this long (Orthanc's StableAge).
    stable_age_seconds: float = Field(60.0, ge=0)
    fsync: bool = True
    # pynetdicom 3.0 internals replaced for speed on the receiver's associations (gateway/sources/dicom/
    # fastpaths.py: event-driven reactors, copy-free PDU reads, directly encoded responses and file meta).
    # false: plain pynetdicom, slower, same files and answers (to compare). Other pynetdicom versions: off.
    fast_paths: bool = True
    tls: TlsConfig = Field(default_factory=TlsConfig)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)


class PipelineConfig(_Section):
    workers: int = Field(1, ge=1, le=64)
    scan_interval_seconds: float = Field(2.0, gt=0)
    # Transient errors (database busy, GPU out of memory) retry with exponential backoff.
    max_attempts: int = Field(5, ge=1)
    retry_backoff_seconds: float = Field(30.0, gt=0)
    retry_backoff_max_seconds: float = Field(3600.0, gt=0)
    lease_seconds: float = Field(900.0, gt=0)  # a claimed study another worker may take after this
    # report.html and report.pdf in every study's outputs (about a second per study on one core).
    write_report: bool = True


class BatchConfig(_Section):
    """``psg-gateway batch``: worker processes, the bounded queue and where its files go."""

    # decode/preprocess processes; 0: inline in the engine's process; auto: cores-2 with a GPU,
    # cores/4 on a CPU engine with more than 4 cores, else inline
    workers: Annotated[int, Field(ge=0, le=256)] | Literal["auto"] = "auto"
    queue_size: int = Field(2, ge=1, le=64)  # prepared nights waiting for the engine (bounds memory)
    nights_per_call: int = Field(0, ge=0, le=64)  # nights per engine call; 0: auto (1 on CPU, 4 on a GPU)
    filename_pattern: str | None = None  # identifiers from archive file names, as drop_folders[].filename_pattern
    progress_interval_seconds: float = Field(30.0, gt=0)  # log line cadence when not on a terminal
    spill_dir: Path | None = None  # prepared signals on their way to the engine; default /dev/shm or var/batch
    summary_dir: Path | None = None  # run summaries; default <var_dir>/batch


AmplitudeBounds = tuple[Annotated[float, Field(ge=0)] | None, Annotated[float, Field(gt=0)] | None]


class QualityAmplitudeConfig(_Section):
    """Plausible robust amplitude (µV) per modality, ``[low, high]``; ``null`` on a side: no bound there.
    Judged only on voltage channels; defaults and their sources in inference/quality.py."""

    bas: AmplitudeBounds = (0.1, 1000.0)  # YASA's EEG/EOG/EMG amplitude check (trimmed SD 0.1-1000 µV)
    resp: AmplitudeBounds = (0.01, 1.0e6)  # units vary: gross unit errors only
    ekg: AmplitudeBounds = (5.0, 5000.0)  # the ±5 mV input range of ECG amplifiers
    emg: AmplitudeBounds = (0.1, 1000.0)  # YASA's amplitude check

    @field_validator("bas", "resp", "ekg", "emg")
    @classmethod
    def _ordered(cls, v: AmplitudeBounds) -> AmplitudeBounds:
        if v[0] is not None and v[1] is not None and v[0] >= v[1]:
            raise ValueError("[low, high] with low below high")
        return v


class QualityConfig(_Section):
    """The signal-quality gate before the flag step (inference/quality.py; docs/configuration.md)."""

    epoch_seconds: float = Field(30.0, ge=1, le=300)  # the AASM scoring epoch
    flat_epsilon: float = Field(1e-6, ge=0)  # an epoch with a peak-to-peak range up to this is flat (Luna)
    flat_max_fraction: float = Field(0.25, gt=0, le=1)  # share of flat epochs that makes the channel flat
    clip_tolerance: float = Field(1e-4, ge=0, lt=0.5)  # "at a limit": within this share of the span (Luna)
    clip_epoch_fraction: float = Field(0.05, ge=0, lt=1)  # an epoch above this share at a limit is clipped (Luna)
    clipped_max_fraction: float = Field(0.25, gt=0, le=1)  # share of clipped epochs that makes it clipped
    disconnected_min_seconds: float = Field(3600.0, gt=0)  # no signal (flat or gap) this long in a row
    gap_max_fraction: float = Field(0.25, gt=0, le=1)  # share of unmeasured samples that makes it gapped
    line_noise_band_hz: float = Field(1.0, gt=0, le=5)  # half-width of the 50/60 Hz bands
    line_noise_broadband_hz: tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(gt=0)]] = (10.0, 100.0)
    line_noise_max_ratio: float = Field(0.3, gt=0, le=1)  # Luna COMBINE-EMG line-th
    amplitude_min_rate_hz: float = Field(50.0, ge=0)  # slower "voltage" channels are envelopes or trends
    amplitude_uv: QualityAmplitudeConfig = Field(default_factory=QualityAmplitudeConfig)
    min_typical_epoch_sd: float = Field(0.05, ge=0, lt=1)  # on the z-scored 128 Hz row: artifacts set the scale
    typical_sd_modalities: list[Literal["BAS", "RESP", "EKG", "EMG"]] = Field(default_factory=lambda: ["BAS", "EKG"])
    sample_epochs: int = Field(16, ge=1, le=1000)  # epochs sampled for the spectrum, amplitude, 128 Hz row
    max_unusable_fraction: float = Field(0.5, ge=0, le=1)  # more unusable mapped channels: not interpretable

    @field_validator("line_noise_broadband_hz")
    @classmethod
    def _band(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError("[low, high] in Hz with low below high")
        return v

    def thresholds(self) -> QualityThresholds:
        """The gate's thresholds for :mod:`inference.quality` (imported here: loading a configuration
        stays free of numpy)."""
        from inference.quality import QualityThresholds

        values = self.model_dump(exclude={"amplitude_uv"})
        values["typical_sd_modalities"] = tuple(self.typical_sd_modalities)
        amplitude = {m.upper(): bounds for m, bounds in self.amplitude_uv.model_dump().items()}
        return QualityThresholds(**values, amplitude_uv=amplitude)


class HttpConfig(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9108, ge=0, le=65535)  # 0: any free port (tests)


class ConsoleConfig(_Section):
    """The web console under ``/ui/`` of the ops endpoint (docs/admin-guide.md, "Web console")."""

    enabled: bool | None = None  # None: on whenever http is
    session_hours: float = Field(12.0, gt=0, le=24 * 30)  # a session ends this long after its login
    idle_minutes: float = Field(30.0, gt=0)  # ... or after this long without a request
    secret_key_file: Path | None = None  # None: <var_dir>/console-secret.key, generated 0600 on first start
    sso_header: str | None = None  # e.g. X-Remote-User, accepted only from trusted_proxies
    trusted_proxies: list[str] = Field(default_factory=list)  # addresses or networks (10.0.0.0/24)
    login_attempts_per_minute: int = Field(10, ge=1)  # per remote address, on top of the account lockout
    drift_kappa_drop: float = Field(0.1, gt=0, le=2)  # alert when a scorer's rolling kappa falls more than this far
    drift_window_studies: int = Field(20, ge=2)  # the rolling window of a scorer's agreement

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        import ipaddress

        for item in v:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return v

    @field_validator("sso_header")
    @classmethod
    def _header(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[A-Za-z0-9-]+", v):
            raise ValueError("a header name is letters, digits and '-'")
        return v


class ServiceConfig(_Section):
    node_name: str = Field(default_factory=socket.gethostname)
    shutdown_timeout_seconds: float = Field(60.0, gt=0)
    watchdog: bool = True  # ping systemd's watchdog when WATCHDOG_USEC is set
    # A group (name or gid) that shares read access to what the gateway keeps (database, spool, outputs,
    # processed, quarantine): files 0640 and folders 0750 of that group. None: 0600/0700, the user only.
    group: str | int | None = None

    @field_validator("group")
    @classmethod
    def _group(cls, v: str | int | None) -> str | int | None:
        if isinstance(v, str) and (not v.strip() or ":" in v):
            raise ValueError("a group name or a gid")
        if isinstance(v, int) and v < 0:
            raise ValueError("a gid is not negative")
        return v.strip() if isinstance(v, str) else v


class RetentionConfig(_Section):
    # None keeps files for ever; the pipeline itself never deletes an input.
    processed_days: float | None = Field(None, gt=0)
    quarantine_days: float | None = Field(None, gt=0)
    check_interval_seconds: float = Field(3600.0, gt=0)


DEFAULT_OUTCOMES = ("death", "Dementia", "Myocardial Infarction", "Heart Failure", "Chronic Kidney Disease",
                    "Stroke", "Atrial Fibrillation and Flutter")


class FlagOutcome(_Section):
    """One outcome to watch: a label of the diagnosis head (phecode or phenotype in label_mapping.csv).

    The diagnosis head is trained with a Cox partial likelihood, which does not change when a constant is
    added to an outcome's output: its log-hazard has no baseline, so ``exp(log_hazard)`` is not a ratio to
    anything. Flag by ``percentile`` within the site's own reference. ``log_hazard`` (an absolute
    threshold) is accepted only for outcomes the model bundle declares calibrated (``bundle.json``
    ``calibrated_outcomes``), and is specific to that model: checked when the service starts.
    """

    label: str
    code: str | None = None  # our local code in OBX-3/OBX-5; default PSG-<label, upper-cased>
    percentile: float | None = Field(95.0, gt=0, lt=100)  # flag when in the site's top (100 - p) %
    # Absolute threshold on the model's log-hazard: only for an outcome the bundle declares calibrated.
    log_hazard: float | None = None
    # A second look: a study at or above this site percentile but below ``percentile`` is marked
    # borderline for this outcome: not flagged, listed for review. None: no second-look band.
    second_look_percentile: float | None = Field(None, gt=0, lt=100)

    @model_validator(mode="before")
    @classmethod
    def _no_hazard_ratio(cls, data: Any) -> Any:
        if isinstance(data, dict) and "hazard_ratio" in data:
            raise ValueError("hazard_ratio is no longer accepted: the diagnosis head's exp(log_hazard) is not a "
                             "ratio to any baseline (Cox partial likelihood); flag by percentile, or by "
                             "log_hazard when the model bundle declares the outcome calibrated")
        return data

    @model_validator(mode="after")
    def _one_threshold(self) -> FlagOutcome:
        if self.log_hazard is None and self.percentile is None:
            raise ValueError("set percentile or log_hazard (or both: either one flags)")
        if self.second_look_percentile is not None and (
                self.percentile is None or self.second_look_percentile >= self.percentile):
            raise ValueError("second_look_percentile must be below percentile (the band just under the "
                             "flag threshold, e.g. 90 for percentile 95)")
        return self


class SleepFinding(_Section):
    """A finding from the hypnogram's metrics, e.g. sleep efficiency below 70 %."""

    metric: Literal["tst_min", "sleep_efficiency_pct", "sleep_onset_latency_min", "waso_min",
                    "rem_latency_min"]
    below: float | None = None
    above: float | None = None
    text: str | None = None

    @model_validator(mode="after")
    def _bound(self) -> SleepFinding:
        if self.below is None and self.above is None:
            raise ValueError("set below or above")
        return self


class FlagsConfig(_Section):
    outcomes: list[FlagOutcome] = Field(default_factory=lambda: [FlagOutcome(label=x) for x in DEFAULT_OUTCOMES])
    # Percentile thresholds stay inactive until the site's reference holds this many studies (same model).
    percentile_min_reference: int = Field(200, ge=1)
    # Risk flags are withheld from a study missing any of these modalities (the heads were trained on
    # studies that had them); its embeddings and hypnogram are kept, and a message says why.
    require_modalities: list[Literal["BAS", "RESP", "EKG", "EMG"]] = Field(
        default_factory=lambda: ["BAS", "RESP", "EKG", "EMG"])
    sleep_findings: list[SleepFinding] = Field(default_factory=list)
    # flagged_only: a message only when something is flagged; always: every study; shadow: messages are
    # built and stored, never sent (how a site validates before go-live).
    send_mode: Literal["flagged_only", "always", "shadow"] = "flagged_only"
    include_sleep_metrics: bool = True


class Hl7TlsConfig(_Section):
    enabled: bool = False
    ca_file: Path | None = None  # CA bundle the EHR's certificate must chain to (default: system CAs)
    verify: bool = True
    client_cert: Path | None = None  # optional client certificate (mutual TLS)
    client_key: Path | None = None
    server_hostname: str | None = None


class Hl7Config(_Section):
    """Where results go: one MLLP destination, and how the ORU^R01 is addressed and coded."""

    enabled: bool = False  # False: flags are evaluated and stored, no message is built
    host: str = "127.0.0.1"
    port: int = Field(2575, ge=1, le=65535)
    timeout_seconds: float = Field(30.0, gt=0)
    idle_reconnect_seconds: float = Field(60.0, gt=0)
    tls: Hl7TlsConfig = Field(default_factory=Hl7TlsConfig)
    sending_application: str = "PSG-GATEWAY"
    sending_facility: str = "SLEEPLAB"
    receiving_application: str = "EHR"
    receiving_facility: str = "HOSPITAL"
    mrn_assigning_authority: str | None = None
    local_code_system: str = "99PSG"
    phecode_system: str = "99PHECODE"
    result_status: Literal["P", "F"] = "F"
    abnormal_flag: str | None = None  # OBX-8; empty by default: an abnormal flag can raise in-basket alerts
    # Opt-in: the per-study report (PDF) as an OBX of type ED (Base64), the way PSG reports reach the chart.
    embed_report: bool = False
    # Retries of AR/CR, timeouts and refused connections: exponential backoff with jitter.
    retry_backoff_seconds: float = Field(10.0, gt=0)
    retry_backoff_max_seconds: float = Field(600.0, gt=0)
    max_attempts: int = Field(0, ge=0)  # 0: retry for ever (the queue holds behind the message)
    drain_interval_seconds: float = Field(1.0, gt=0)
    # One deliverer per destination across daemons sharing the database: how long a dead holder keeps the
    # role. Longer than timeout_seconds, so that a send in progress ends before another node may start.
    delivery_lease_seconds: float = Field(60.0, gt=0)
    # /healthz turns "degraded" when the oldest message waiting for the EHR is older than this.
    degraded_after_seconds: float = Field(900.0, gt=0)

    @model_validator(mode="after")
    def _lease_outlasts_a_send(self) -> Hl7Config:
        if self.delivery_lease_seconds < self.timeout_seconds + 10:
            raise ValueError(f"delivery_lease_seconds ({self.delivery_lease_seconds:g}) must be at least "
                             f"timeout_seconds + 10 ({self.timeout_seconds + 10:g}): a send must end before "
                             "another node may take the destination over")
        return self

    @property
    def destination(self) -> str:
        return f"{self.host}:{self.port}"


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class GatewayConfig(_Section):
    site: str = "psg-gateway"
    paths: PathsConfig = Field(default_factory=PathsConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    montage: MontageConfig = Field(default_factory=MontageConfig)
    drop_folders: list[DropFolderConfig] = Field(default_factory=list)
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    flags: FlagsConfig = Field(default_factory=FlagsConfig)
    hl7: Hl7Config = Field(default_factory=Hl7Config)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    base_dir: Path = Field(default_factory=Path.cwd, exclude=True)  # the config file's folder

    @model_validator(mode="after")
    def _embedded_report_is_written(self) -> GatewayConfig:
        if self.hl7.embed_report and not self.pipeline.write_report:
            raise ValueError("hl7.embed_report needs pipeline.write_report: the report it embeds is the one "
                             "written into the study's outputs")
        return self

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite:///{self.paths.var_dir / 'psg-gateway.db'}"


def _check_ae(v: str) -> str:
    if not _AE_TITLE.match(v) or "\\" in v or not v.strip():
        raise ValueError("an AE title is 1-16 printable ASCII characters, no backslash")
    return v.strip()


def _under(base: Path, p: Path) -> Path:
    p = p.expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else (base / p)))


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def read_document(path: Path) -> dict[str, Any]:
    """Parse YAML or TOML by extension; a parse error is a ConfigError with the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"(file): cannot read: {exc.strerror}"]) from None
    try:
        if path.suffix.lower() == ".toml":
            doc = tomllib.loads(text)
        else:
            doc = yaml.safe_load(text)
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(path), [f"(file): not valid {path.suffix.lstrip('.').upper()}: {exc}"]) from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(str(path), ["(top level): must be a mapping of sections"])
    return doc


def apply_env_overrides(doc: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    """Apply ``PSG__A__B=value`` overrides in place; returns the key paths that were set."""
    applied = []
    items = dict(env)
    if "PSG_DATABASE_URL" in items and f"{ENV_PREFIX}DATABASE__URL" not in items:
        items[f"{ENV_PREFIX}DATABASE__URL"] = items["PSG_DATABASE_URL"]
    for name, raw in sorted(items.items()):
        if not name.startswith(ENV_PREFIX) or len(name) == len(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split("__")]
        node: Any = doc
        for i, part in enumerate(parts[:-1]):
            nxt_is_index = parts[i + 1].isdigit()
            if isinstance(node, list):
                idx = int(part)
                while len(node) <= idx:
                    node.append({})
                node = node[idx]
                continue
            if part not in node or node[part] is None:
                node[part] = [] if nxt_is_index else {}
            node = node[part]
        value = yaml.safe_load(raw) if raw.strip() else raw
        if isinstance(node, list):
            idx = int(parts[-1])
            while len(node) <= idx:
                node.append(None)
            node[idx] = value
        else:
            node[parts[-1]] = value
        applied.append(".".join(parts))
    return applied


def load_config(path: Path | None, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Load, override from the environment, validate and resolve paths against the file's folder.

    Without ``path`` the file named by ``PSG_CONFIG`` (in ``env``) is read; without both, the defaults.
    """
    env = os.environ if env is None else env
    if path is None and env.get("PSG_CONFIG"):
        path = Path(env["PSG_CONFIG"])
    doc = read_document(path) if path is not None else {}
    source = str(path) if path is not None else "(built-in defaults)"
    try:
        apply_env_overrides(doc, env)
    except (ValueError, TypeError, AttributeError, IndexError):
        raise ConfigError(source, ["(environment): a PSG__ override does not fit the file's structure"]) from None
    try:
        cfg = GatewayConfig.model_validate(doc)
    except ValidationError as exc:
        problems = [f"{_loc(e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False)]
        raise ConfigError(source, problems) from None
    base = path.resolve().parent if path is not None else Path.cwd()
    return resolve_paths(cfg, base)


def resolve_paths(cfg: GatewayConfig, base: Path) -> GatewayConfig:
    """Make every relative path in ``cfg`` relative to ``base`` (the config file's folder)."""
    cfg.base_dir = base
    cfg.paths = cfg.paths.resolved(base)
    if cfg.montage.table is not None:
        cfg.montage.table = _under(base, cfg.montage.table)
    for folder in cfg.drop_folders:
        folder.path = _under(base, folder.path)
    cfg.model.site_heads = [_under(base, p) for p in cfg.model.site_heads]
    if cfg.model.staging_head is not None:
        cfg.model.staging_head = _under(base, cfg.model.staging_head)
    if cfg.console.secret_key_file is not None:
        cfg.console.secret_key_file = _under(base, cfg.console.secret_key_file)
    for key in ("spill_dir", "summary_dir"):
        if getattr(cfg.batch, key) is not None:
            setattr(cfg.batch, key, _under(base, getattr(cfg.batch, key)))
    for section, keys in ((cfg.dicom.tls, ("cert_file", "key_file", "ca_file")),
                          (cfg.hl7.tls, ("ca_file", "client_cert", "client_key"))):
        for key in keys:
            value = getattr(section, key)
            if value is not None:
                setattr(section, key, _under(base, value))
    if cfg.model.bundle != "demo":
        cfg.model.bundle = str(_under(base, Path(cfg.model.bundle)))
    db = cfg.database.url
    if db and db.startswith("sqlite:///") and not db.startswith("sqlite:////"):
        rel = db[len("sqlite:///"):]
        if rel and rel != ":memory:":
            cfg.database.url = f"sqlite:///{_under(base, Path(rel))}"
    return cfg
