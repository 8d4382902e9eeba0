"""Model-versus-scorer agreement per scorer over time, and scoring drift alerts.

A study whose recording carries a scored hypnogram has its agreement with the model's hypnogram in
``metrics.json`` (``staging_agreement``: epochs compared, accuracy, Cohen's kappa, confusion matrix, F1
per stage; see :mod:`gateway.pipeline.scoring`). Its scorer is recorded on the study (``Study.scorer``):
a sidecar's ``scorer``, else the EDF+ header's technician subfield or DICOM Operators' Name (0008,1070).

:func:`agreement_rows` gathers one :class:`AgreementRow` per such study from a store;
:func:`agreement_by_scorer` (pure: no database, no files) turns rows into, per scorer, the number of
studies, the mean kappa, per-stage agreement and a rolling kappa over time, and raises a
:class:`DriftAlert` for a scorer whose rolling mean kappa over their last ``window`` studies is more than
``drop`` below the lab's mean kappa ("detect systematic scoring drift across technicians")::

    rows = agreement_rows(repo, since=datetime(2025, 1, 1, tzinfo=UTC))
    trend = agreement_by_scorer(rows, window=20, drop=0.1)
    for alert in trend.alerts:
        print(alert.message)

Definitions (every study weighs the same, whatever its number of epochs):

* the **lab's mean kappa**: the mean of the kappas of every study with one (every scorer, the unknown
  scorer included);
* a scorer's **mean kappa**: the mean over their studies with a kappa; a study whose kappa is undefined
  (no epoch compared, or both hypnograms one single stage) counts in ``studies`` and in the per-stage
  numbers, never in a kappa mean or the series;
* the **rolling kappa** after a study: the mean kappa of the scorer's last ``window`` studies up to and
  including it (fewer at the start), in time order (the night's recording start, else when the study was
  received; then the study key);
* **per stage**: the mean of the studies' F1 for that stage (studies where it is defined), and Cohen's
  kappa of the stage against all others (one-versus-rest) over the pooled confusion matrices;
* a **drift alert**: a named scorer with at least ``min_studies`` studies with a kappa (default:
  ``window``, a full window) whose latest rolling kappa is more than ``drop`` below the lab's mean. A
  difference of exactly ``drop`` does not alert.

Scorer names are grouped with case and runs of blanks ignored (``J Smith`` and ``j  smith`` are one
scorer, shown as first seen); studies without a scorer form the group ``None`` (no alert is raised for
it). Dates are the nights' dates: show them to signed-in staff only, never log them.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .outputs import METRICS_FILE, read_metrics
from .scoring import STAGES

if TYPE_CHECKING:
    from ..store.repo import Repo

__all__ = [
    "DEFAULT_DROP",
    "DEFAULT_WINDOW",
    "AgreementRow",
    "AgreementStats",
    "AgreementTrend",
    "DriftAlert",
    "ScorerAgreement",
    "StageAgreement",
    "TrendPoint",
    "agreement_by_scorer",
    "agreement_rows",
]

DEFAULT_WINDOW = 20
DEFAULT_DROP = 0.1
_EPS = 1e-9  # "more than drop": a difference within rounding of drop is not more


# ---- input ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AgreementRow:
    """One study's model-versus-scorer agreement.

    Parameters
    ----------
    study_key
        The study's key (``st-...``), never an identifier of the patient.
    scorer
        Who scored the hypnogram; None when unknown.
    when
        When the night was recorded (else received); None when unknown (sorted first).
    kappa
        Cohen's kappa over the epochs both hypnograms score; None when undefined.
    epochs
        Epochs compared.
    accuracy
        Fraction of the compared epochs on which both agree; None when no epoch was compared.
    f1
        F1 per stage (``W N1 N2 N3 REM``); None for a stage neither hypnogram holds.
    confusion
        ``confusion[scored][model]`` epoch counts; None when not recorded (per-stage kappa then leaves the
        study out).
    """

    study_key: str
    scorer: str | None
    when: datetime | None
    kappa: float | None
    epochs: int = 0
    accuracy: float | None = None
    f1: Mapping[str, float | None] = field(default_factory=dict)
    confusion: Mapping[str, Mapping[str, int]] | None = None

    @classmethod
    def from_metrics(cls, study_key: str, scorer: str | None, when: datetime | None,
                     staging_agreement: Mapping[str, Any]) -> AgreementRow:
        """A row from a metrics.json ``staging_agreement`` object (its ``scored`` stages are not kept)."""
        f1 = staging_agreement.get("f1")
        confusion = staging_agreement.get("confusion")
        return cls(study_key=study_key, scorer=scorer, when=when,
                   kappa=_finite(staging_agreement.get("kappa")),
                   epochs=_count(staging_agreement.get("epochs")),
                   accuracy=_finite(staging_agreement.get("accuracy")),
                   f1={s: _finite(f1.get(s)) for s in STAGES} if isinstance(f1, Mapping) else {},
                   confusion=_confusion(confusion))


# ---- output --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StageAgreement:
    """Agreement on one sleep stage.

    Attributes
    ----------
    stage
        ``W``, ``N1``, ``N2``, ``N3`` or ``REM``.
    f1
        Mean of the studies' F1 for the stage; None when no study defines it.
    f1_studies
        Studies whose F1 for the stage is defined.
    kappa
        Cohen's kappa of the stage against all others over the pooled confusion matrices; None when
        undefined (no epochs, or the stage is everywhere or nowhere in both).
    scored_epochs
        Epochs the scorer gave this stage (pooled, compared epochs only).
    """

    stage: str
    f1: float | None
    f1_studies: int
    kappa: float | None
    scored_epochs: int


@dataclass(frozen=True)
class AgreementStats:
    """Agreement over a group of studies (a scorer's, or the whole lab's).

    Attributes
    ----------
    studies
        Studies with a scored hypnogram.
    kappa_studies
        Those with a defined kappa (what ``mean_kappa`` averages).
    epochs
        Epochs compared, all studies together.
    mean_kappa
        Mean of the studies' kappas; None when no study has one.
    per_stage
        Stage -> :class:`StageAgreement`, every stage of :data:`~gateway.pipeline.scoring.STAGES`.
    """

    studies: int
    kappa_studies: int
    epochs: int
    mean_kappa: float | None
    per_stage: Mapping[str, StageAgreement]


@dataclass(frozen=True)
class TrendPoint:
    """One study of a scorer's series: its kappa and the rolling kappa after it."""

    study_key: str
    when: datetime | None
    kappa: float
    rolling_kappa: float
    window_studies: int  # studies the rolling kappa averages (``window``, or fewer at the start)


@dataclass(frozen=True)
class DriftAlert:
    """A scorer whose recent agreement with the model fell more than ``drop`` below the lab's.

    Attributes
    ----------
    scorer
        The scorer, as first seen.
    rolling_kappa
        Mean kappa of the scorer's last ``window_studies`` studies.
    lab_kappa
        The lab's mean kappa (every study).
    difference
        ``lab_kappa - rolling_kappa``, more than ``drop``.
    drop, window
        The thresholds it was checked with.
    window_studies
        Studies in the window (``window``, or fewer when ``min_studies`` allows).
    since, until
        When the first and the last study of the window were recorded.
    """

    scorer: str
    rolling_kappa: float
    lab_kappa: float
    difference: float
    drop: float
    window: int
    window_studies: int
    since: datetime | None
    until: datetime | None

    @property
    def message(self) -> str:
        """One line for a page or a log of the console (the scorer's name is staff, not patient, data)."""
        return (f"scorer {self.scorer}: rolling kappa {self.rolling_kappa:.2f} over the last "
                f"{self.window_studies} studies is {self.difference:.2f} below the lab's {self.lab_kappa:.2f} "
                f"(alert above {self.drop:.2f})")


@dataclass(frozen=True)
class ScorerAgreement(AgreementStats):
    """One scorer's agreement, over time.

    Attributes
    ----------
    scorer
        As first seen; None for the studies without a known scorer.
    series
        The scorer's studies with a kappa, oldest first, each with the rolling kappa after it.
    rolling_kappa
        The latest rolling kappa (the last point's); None without a kappa.
    first, last
        When the scorer's first and last studies were recorded.
    alert
        The scorer's :class:`DriftAlert`, or None.
    """

    scorer: str | None
    series: tuple[TrendPoint, ...]
    rolling_kappa: float | None
    first: datetime | None
    last: datetime | None
    alert: DriftAlert | None


@dataclass(frozen=True)
class AgreementTrend:
    """What :func:`agreement_by_scorer` returns.

    Attributes
    ----------
    scorers
        One :class:`ScorerAgreement` per scorer, by name (case ignored), the unknown scorer last.
    lab
        The whole lab's :class:`AgreementStats`.
    alerts
        The drift alerts, largest difference first.
    window, drop, min_studies
        The parameters used.
    """

    scorers: tuple[ScorerAgreement, ...]
    lab: AgreementStats
    alerts: tuple[DriftAlert, ...]
    window: int
    drop: float
    min_studies: int

    def scorer(self, name: str | None) -> ScorerAgreement | None:
        """The entry of ``name`` (case and blanks ignored; None: the unknown scorer), or None."""
        wanted = _group(name)
        return next((s for s in self.scorers if _group(s.scorer) == wanted), None)


# ---- the computation -----------------------------------------------------------------------------------------
def agreement_by_scorer(rows: Iterable[AgreementRow], *, window: int = DEFAULT_WINDOW, drop: float = DEFAULT_DROP,
                        min_studies: int | None = None) -> AgreementTrend:
    """Agreement per scorer over time, and drift alerts (the definitions are in the module's docstring).

    Parameters
    ----------
    rows
        One :class:`AgreementRow` per study, in any order.
    window
        Studies in a rolling window (1 or more).
    drop
        How far (in kappa, 0 or more) a scorer's rolling kappa may fall below the lab's mean before an alert.
    min_studies
        Studies with a kappa a scorer needs before an alert is considered (1 or more); default ``window``.

    Returns
    -------
    AgreementTrend
        Empty ``scorers`` and ``alerts`` (and a lab without studies) for no rows.

    Raises
    ------
    ValueError
        For a window or ``min_studies`` below 1, or a negative or non-finite ``drop``.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a whole number of studies, 1 or more (got {window!r})")
    if isinstance(drop, bool) or not isinstance(drop, int | float) or not math.isfinite(drop) or drop < 0:
        raise ValueError(f"drop must be a kappa difference, 0 or more (got {drop!r})")
    needed = window if min_studies is None else min_studies
    if isinstance(needed, bool) or not isinstance(needed, int) or needed < 1:
        raise ValueError(f"min_studies must be a whole number of studies, 1 or more (got {min_studies!r})")

    ordered = sorted(rows, key=_order)
    lab = _stats(ordered)
    groups: dict[str | None, list[AgreementRow]] = {}
    names: dict[str | None, str | None] = {}
    for row in ordered:
        key = _group(row.scorer)
        groups.setdefault(key, []).append(row)
        names.setdefault(key, _clean(row.scorer))

    scorers = []
    for key in sorted(groups, key=lambda k: (k is None, k or "")):
        group = groups[key]
        series = _series(group, window)
        rolling = series[-1].rolling_kappa if series else None
        alert = None
        name = names[key]
        if (name is not None and lab.mean_kappa is not None and rolling is not None and len(series) >= needed
                and lab.mean_kappa - rolling - drop > _EPS):
            last = series[-1]
            alert = DriftAlert(scorer=name, rolling_kappa=rolling, lab_kappa=lab.mean_kappa,
                               difference=lab.mean_kappa - rolling, drop=float(drop), window=window,
                               window_studies=last.window_studies,
                               since=series[-last.window_studies].when, until=last.when)
        stats = _stats(group)
        scorers.append(ScorerAgreement(
            studies=stats.studies, kappa_studies=stats.kappa_studies, epochs=stats.epochs,
            mean_kappa=stats.mean_kappa, per_stage=stats.per_stage, scorer=name, series=series,
            rolling_kappa=rolling, first=group[0].when, last=group[-1].when, alert=alert))
    alerts = tuple(sorted((s.alert for s in scorers if s.alert is not None),
                          key=lambda a: (-a.difference, a.scorer.casefold())))
    return AgreementTrend(scorers=tuple(scorers), lab=lab, alerts=alerts, window=window, drop=float(drop),
                          min_studies=needed)


def _series(rows: Sequence[AgreementRow], window: int) -> tuple[TrendPoint, ...]:
    kappas: list[float] = []
    points = []
    for row in rows:
        if row.kappa is None:
            continue
        kappas.append(row.kappa)
        recent = kappas[-window:]
        points.append(TrendPoint(row.study_key, row.when, row.kappa, sum(recent) / len(recent), len(recent)))
    return tuple(points)


def _stats(rows: Sequence[AgreementRow]) -> AgreementStats:
    kappas = [r.kappa for r in rows if r.kappa is not None]
    per_stage = {}
    pooled = {r: {p: 0 for p in STAGES} for r in STAGES}
    for row in rows:
        if row.confusion is not None:
            for r in STAGES:
                for p in STAGES:
                    pooled[r][p] += row.confusion.get(r, {}).get(p, 0)
    n = sum(sum(v.values()) for v in pooled.values())
    for stage in STAGES:
        f1s = [f for r in rows if (f := r.f1.get(stage)) is not None]
        a = pooled[stage][stage]
        scored = sum(pooled[stage].values())
        predicted = sum(pooled[r][stage] for r in STAGES)
        per_stage[stage] = StageAgreement(stage=stage, f1=sum(f1s) / len(f1s) if f1s else None,
                                          f1_studies=len(f1s), kappa=_binary_kappa(a, scored, predicted, n),
                                          scored_epochs=scored)
    return AgreementStats(studies=len(rows), kappa_studies=len(kappas), epochs=sum(r.epochs for r in rows),
                          mean_kappa=sum(kappas) / len(kappas) if kappas else None, per_stage=per_stage)


def _binary_kappa(both: int, scored: int, predicted: int, n: int) -> float | None:
    """Cohen's kappa of one stage against the rest: ``both`` epochs scored and predicted as it, ``scored``
    scored as it, ``predicted`` predicted as it, of ``n``."""
    if n == 0:
        return None
    neither = n - scored - predicted + both
    observed = (both + neither) / n
    expected = (scored * predicted + (n - scored) * (n - predicted)) / (n * n)
    return (observed - expected) / (1.0 - expected) if expected < 1.0 else None


# ---- rows from the store -------------------------------------------------------------------------------------
_CACHE_SIZE = 8192
_cache: OrderedDict[tuple[str, int, int], dict[str, Any] | None] = OrderedDict()
_cache_lock = threading.Lock()


def _staging_agreement(out_dir: str) -> dict[str, Any] | None:
    """``staging_agreement`` of a study's metrics.json without its ``scored`` stages; None when absent or
    unreadable. Cached by the file's path, size and modification time, so a page that is reloaded reads
    only the files that changed."""
    path = Path(out_dir) / METRICS_FILE
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    try:
        metrics = read_metrics(path.parent)
    except (OSError, ValueError):
        metrics = None
    scoring = metrics.get("staging_agreement") if isinstance(metrics, dict) else None
    value = {k: v for k, v in scoring.items() if k != "scored"} if isinstance(scoring, dict) else None
    with _cache_lock:
        _cache[key] = value
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return value


def agreement_rows(repo: Repo, since: datetime | None = None) -> list[AgreementRow]:
    """One :class:`AgreementRow` per study whose outputs hold a scored hypnogram's agreement.

    One query of five columns (key, scorer, recording start, received, outputs folder) over the original
    studies (not duplicates) that have outputs, then each one's ``metrics.json`` (cached by size and
    modification time). A study whose file is gone or unreadable, or that was not scored, is left out.

    Parameters
    ----------
    repo
        The store.
    since
        Only studies recorded (else received) at or after this time; a naive time is UTC.

    Returns
    -------
    list of AgreementRow
        In the order of the studies' ids.
    """
    from sqlalchemy import func, select

    from ..store.models import Study

    query = (select(Study.key, Study.scorer, Study.recording_start, Study.received_at, Study.output_path)
             .where(Study.output_path.is_not(None), Study.duplicate_of.is_(None)).order_by(Study.id))
    if since is not None:
        since = since.astimezone(UTC) if since.tzinfo is not None else since.replace(tzinfo=UTC)
        query = query.where(func.coalesce(Study.recording_start, Study.received_at) >= since)
    with repo.sessions() as session:
        found = session.execute(query).all()
    rows = []
    for key, scorer, recorded, received, out_dir in found:
        scoring = _staging_agreement(out_dir)
        if scoring is not None:
            rows.append(AgreementRow.from_metrics(key, scorer, recorded or received, scoring))
    return rows


# ---- values --------------------------------------------------------------------------------------------------
def _finite(v: Any) -> float | None:
    if v is None or isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def _count(v: Any) -> int:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0 else 0


def _confusion(v: Any) -> dict[str, dict[str, int]] | None:
    if not isinstance(v, Mapping):
        return None
    return {r: {p: _count(row.get(p)) for p in STAGES}
            for r in STAGES if isinstance(row := v.get(r, {}), Mapping)}


def _clean(scorer: str | None) -> str | None:
    if scorer is None:
        return None
    text = " ".join(str(scorer).split())
    return text or None


def _group(scorer: str | None) -> str | None:
    text = _clean(scorer)
    return None if text is None else text.casefold()


def _order(row: AgreementRow) -> tuple[int, datetime, str]:
    when = row.when
    if when is None:
        return (0, datetime.min, row.study_key)
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    return (1, when, row.study_key)
