"""Result types of the inference engine: plain dataclasses of numpy arrays."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .identity import BundleIdentity, Outcome

MODALITIES: tuple[str, ...] = ("BAS", "RESP", "EKG", "EMG")
STAGES: tuple[str, ...] = ("W", "N1", "N2", "N3", "REM")
TOKEN_SECONDS = 5
TOKENS_PER_WINDOW = 60  # 5-minute windows
TOKENS_PER_EPOCH = 6  # 30-s scoring epochs


@dataclass
class StudyInput:
    """One night ready for the encoder.

    ``signals`` maps a modality (BAS, RESP, EKG, EMG) to a float32 or float16 ``(channels, samples)``
    array at 128 Hz, preprocessed (filtered, resampled, standardised); the pipeline keeps float16, as
    the release stores them (:data:`inference.preprocess.STORED_DTYPE`), and other dtypes are
    converted to float32. All modalities have the same
    number of samples. ``key`` is an opaque study key (never PHI) carried into the result.

    Parameters
    ----------
    signals : dict of str to numpy.ndarray
        Modality name (one of :data:`MODALITIES`) to a ``(channels, samples)`` array at 128 Hz, as
        :func:`inference.preprocess.preprocess_channel` returns it per channel. A modality that is
        absent (or has zero channels) is treated as missing.
    age_years : float, optional
        Age at the study, for the diagnosis head's demographic inputs; ``None`` when unknown.
    sex : str, optional
        ``"M"``, ``"F"`` or anything else (unknown); only the first letter is read.
    key : str, optional
        Opaque study key carried into :attr:`StudyResult.key`.
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

    Parameters
    ----------
    tib_min : float
        Time in bed: every scored 30-s epoch.
    tst_min : float
        Total sleep time: the epochs scored N1, N2, N3 or REM.
    sleep_efficiency_pct : float
        ``100 * TST / TIB`` (0 when TIB is 0).
    sleep_onset_latency_min : float or None
        From the first epoch to the first non-W epoch; ``None`` when there is no sleep.
    waso_min : float
        Wake after sleep onset: W epochs between the first and the last non-W epoch.
    rem_latency_min : float or None
        From sleep onset to the first REM epoch; ``None`` without REM (or without sleep).
    stage_min : dict of str to float
        Minutes per stage, every stage of :data:`STAGES` (W included).
    stage_pct_of_tst : dict of str to float
        Percentage of TST per sleep stage (N1, N2, N3, REM); 0 when TST is 0.
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
        """Return the metrics as a plain ``dict`` (the per-stage dicts copied).

        Returns
        -------
        dict
            One entry per field, under the field's name.
        """
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
    """Per-token stage probabilities, the 30-s hypnogram and its metrics.

    Parameters
    ----------
    token_probs : numpy.ndarray
        ``(T, 5)`` float32 softmax probabilities per 5-s token, columns in :data:`STAGES` order.
    epoch_probs : numpy.ndarray
        ``(E, 5)`` float32, the mean of each 30-s epoch's six token probabilities
        (``E = T // 6``; a trailing partial epoch is left out).
    hypnogram : list of str
        ``E`` labels from :data:`STAGES`, the most probable stage of each epoch.
    metrics : SleepMetrics
        Sleep macro-structure computed from the hypnogram.
    tail_start_epoch : int or None
        First epoch of the tail (staged on its own segment); ``None`` when there is no scored tail.
    """

    token_probs: np.ndarray  # (T, 5) float32, columns in STAGES order
    epoch_probs: np.ndarray  # (E, 5) float32, mean of the six token probabilities per 30 s
    hypnogram: list[str]  # E labels from STAGES
    metrics: SleepMetrics
    tail_start_epoch: int | None = None  # first epoch of the tail (staged on its own); None: no tail

    def is_tail(self, epoch: int) -> bool:
        """Whether the epoch lies past the last whole 5-minute window (staged as its own segment).

        Parameters
        ----------
        epoch : int
            Index of a 30-s epoch in :attr:`hypnogram`.

        Returns
        -------
        bool
            True when ``epoch >= tail_start_epoch`` (never when there is no tail).
        """
        return self.tail_start_epoch is not None and epoch >= self.tail_start_epoch


@dataclass
class Hazards:
    """Diagnosis head output: one Cox log-hazard (linear predictor) per outcome.

    Parameters
    ----------
    log_hazard : numpy.ndarray
        ``(K,)`` float32 log-hazards, ``log_hazard[o.index]`` for each outcome ``o``.
    outcomes : list of Outcome
        The ``K`` outcomes: the bundle's diagnosis head's (1065 phecodes in the release), followed
        by those of a site's own Cox heads (their :attr:`Outcome.head` names the head).
    attribution : dict of str to numpy.ndarray, optional
        Modality attribution of the bundle's diagnosis head: for each modality present, the change
        in log-hazard it makes, ``log_hazard - log_hazard_with_it_masked``, one value per outcome of
        the bundle's head (its first ``len(...)`` outcomes; a site's Cox heads are not attributed).
        Positive: the modality raised the outcome's risk score. Masking uses the head's own modality
        mask, as for a modality that is missing. Empty when one modality alone was present (nothing
        would be left to score) or the engine ran without attribution.
    """

    log_hazard: np.ndarray  # (K,) float32
    outcomes: list[Outcome]
    attribution: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> (K_bundle,) float32

    @property
    def hazard_ratio(self) -> np.ndarray:
        """``exp(log_hazard)``: relative hazard against the model's baseline."""
        return np.exp(self.log_hazard.astype(np.float64))

    def by_phecode(self, phecode: str) -> float:
        """Log-hazard of the first outcome with this phecode.

        Parameters
        ----------
        phecode : str
            The outcome's phecode, exactly as in the label mapping (e.g. ``"327.3"``), or a site Cox
            head's outcome label.

        Returns
        -------
        float
            The outcome's log-hazard.

        Raises
        ------
        KeyError
            When no outcome has that phecode.
        """
        for outcome in self.outcomes:
            if outcome.phecode == phecode:
                return float(self.log_hazard[outcome.index])
        raise KeyError(phecode)


@dataclass
class StudyResult:
    """Everything the engine computes for one night.

    Parameters
    ----------
    key : str or None
        The study key of the :class:`StudyInput`.
    n_tokens : int
        ``T = floor(duration / 5 s)``, the number of 5-s tokens.
    modalities, missing_modalities : list of str
        The modalities that were encoded, and those that were not (in :data:`MODALITIES` order).
    token_embeddings : dict of str to numpy.ndarray
        Per present modality, ``(T, 128)`` float32, one per 5-s token.
    window_embeddings : dict of str to numpy.ndarray
        Per present modality, ``(N, 128)`` float32, one per 5-minute window, ``N = ceil(T / 60)``;
        the last window is aligned to the end of the recording when T is not a multiple of 60.
    night_vector : numpy.ndarray
        ``(512,)`` float32, the mean of each modality's whole-window embeddings (the end-aligned tail
        window left out), concatenated in BAS, RESP, EKG, EMG order; a missing modality's 128 values
        are NaN.
    staging : Staging or None
        The hypnogram; ``None`` when the bundle has no staging head.
    hazards : Hazards or None
        The diagnosis head's log-hazards (and a site's Cox heads'); ``None`` when there are none.
    bundle : BundleIdentity
        The model bundle that produced the result.
    demographics_used : dict
        ``age_years`` and ``sex`` as given, and the ``age_feature`` and ``sex_feature`` the
        diagnosis head was fed.
    device, precision : str
        Where and in which precision (``fp32``, ``bf16``, ``fp16``) the networks ran.
    timings_s : dict of str to float
        Seconds spent encoding (the batch's time shared equally among its studies) and in the heads.
    site_results : dict of str to dict
        A site's non-hazard heads (apnea) by head name.
    demographics_encoding : str
        The name of the bundle's age/sex encoding, or ``"unconfirmed"`` when the bundle does not
        declare one.
    tail_start : int or None
        The first token past the last whole 5-minute window (``T`` when there is no tail). Staging of
        tokens before it and the hazards come from those whole windows only, as in the release;
        tokens from it on were staged as their own segment. ``None``: not recorded (results built by
        hand); the engine always sets it.
    diagnosis_tokens : int
        How many tokens the diagnosis head was given (the first ones, at most its positional table's
        length: 6480 in the release).
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
