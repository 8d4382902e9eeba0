"""Result types of the inference engine: plain dataclasses of numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .bundle import BundleIdentity, Outcome

MODALITIES: tuple[str, ...] = ("BAS", "RESP", "EKG", "EMG")
STAGES: tuple[str, ...] = ("W", "N1", "N2", "N3", "REM")
TOKEN_SECONDS = 5
TOKENS_PER_WINDOW = 60  # 5-minute windows
TOKENS_PER_EPOCH = 6  # 30-s scoring epochs


@dataclass
class StudyInput:
    """One night ready for the encoder.

    ``signals`` maps a modality (BAS, RESP, EKG, EMG) to a float32 ``(channels, samples)`` array
    at 128 Hz, preprocessed (filtered, resampled, standardised). All modalities have the same
    number of samples. ``key`` is an opaque study key (never PHI) carried into the result.
    """

    signals: dict[str, np.ndarray]
    age_years: float | None = None
    sex: str | None = None
    key: str | None = None


@dataclass
class SleepMetrics:
    """Standard sleep macro-structure from the 30-s hypnogram (minutes unless named otherwise).

    TIB covers the scored epochs. Sleep onset is the first non-W epoch; sleep period runs from
    there to the last non-W epoch; WASO is wake within the sleep period (YASA's definition).
    Stage percentages are of TST. Latencies are ``None`` when the stage never occurs.
    """

    tib_min: float
    tst_min: float
    sleep_efficiency_pct: float
    sleep_onset_latency_min: float | None
    waso_min: float
    rem_latency_min: float | None
    stage_min: dict[str, float]
    stage_pct_of_tst: dict[str, float]

    def as_dict(self) -> dict:
        return {
            "tib_min": self.tib_min,
            "tst_min": self.tst_min,
            "sleep_efficiency_pct": self.sleep_efficiency_pct,
            "sleep_onset_latency_min": self.sleep_onset_latency_min,
            "waso_min": self.waso_min,
            "rem_latency_min": self.rem_latency_min,
            "stage_min": dict(self.stage_min),
            "stage_pct_of_tst": dict(self.stage_pct_of_tst),
        }


@dataclass
class Staging:
    """Per-token stage probabilities, the 30-s hypnogram and its metrics."""

    token_probs: np.ndarray  # (T, 5) float32, columns in STAGES order
    epoch_probs: np.ndarray  # (E, 5) float32, mean of the six token probabilities per 30 s
    hypnogram: list[str]  # E labels from STAGES
    metrics: SleepMetrics
    tail_start_epoch: int | None = None  # first epoch of the tail (staged on its own); None: no tail

    def is_tail(self, epoch: int) -> bool:
        """Whether the epoch lies past the last whole 5-minute window (staged as its own segment)."""
        return self.tail_start_epoch is not None and epoch >= self.tail_start_epoch


@dataclass
class Hazards:
    """Diagnosis head output: one Cox log-hazard (linear predictor) per outcome."""

    log_hazard: np.ndarray  # (K,) float32
    outcomes: list[Outcome]

    @property
    def hazard_ratio(self) -> np.ndarray:
        """``exp(log_hazard)``: relative hazard against the model's baseline."""
        return np.exp(self.log_hazard.astype(np.float64))

    def by_phecode(self, phecode: str) -> float:
        for outcome in self.outcomes:
            if outcome.phecode == phecode:
                return float(self.log_hazard[outcome.index])
        raise KeyError(phecode)


@dataclass
class StudyResult:
    """Everything the engine computes for one night.

    * ``token_embeddings[m]``: ``(T, 128)`` float32, one per 5-s token, T = floor(duration / 5 s).
    * ``window_embeddings[m]``: ``(N, 128)`` float32, one per 5-minute window, N = ceil(T / 60); the
      last window is aligned to the end of the recording when T is not a multiple of 60.
    * ``night_vector``: ``(512,)`` float32, the mean of each modality's whole-window embeddings
      (the end-aligned tail window left out), concatenated in BAS, RESP, EKG, EMG order; a missing
      modality's 128 values are NaN.
    * ``tail_start``: the first token past the last whole 5-minute window (``T`` when there is no
      tail). Staging of tokens before it and the hazards come from those whole windows only, as in
      the release; tokens from it on were staged as their own segment.
    * ``diagnosis_tokens``: how many tokens the diagnosis head was given (the first ones, at most its
      positional table's length: 6480 in the release).
    * ``demographics_encoding``: the name of the bundle's age/sex encoding, or ``"unconfirmed"``
      when the bundle does not declare one.
    """

    key: str | None
    n_tokens: int
    modalities: list[str]
    missing_modalities: list[str]
    token_embeddings: dict[str, np.ndarray]
    window_embeddings: dict[str, np.ndarray]
    night_vector: np.ndarray
    staging: Staging | None
    hazards: Hazards | None
    bundle: BundleIdentity
    demographics_used: dict[str, float | str | None]
    device: str
    precision: str
    timings_s: dict[str, float] = field(default_factory=dict)
    site_results: dict[str, dict] = field(default_factory=dict)  # a site's non-hazard heads (apnea)
    demographics_encoding: str = "unconfirmed"
    tail_start: int | None = None  # None: not recorded (results built by hand); the engine always sets it
    diagnosis_tokens: int = 0

    @property
    def tail_tokens(self) -> int:
        """Tokens past the last whole 5-minute window."""
        return 0 if self.tail_start is None else self.n_tokens - self.tail_start

    @property
    def validated(self) -> bool:
        """Whether the model bundle is one the site has validated (never true for demo weights)."""
        return self.bundle.validated
