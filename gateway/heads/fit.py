"""``psg-gateway heads fit``: Cox risk heads, apnea classifiers and a re-fitted staging head.

Every fit splits by patient (never by study: one patient's nights are on one side only) with a fixed
seed, chooses its regularisation by cross-validation over patients of the training side only, keeps
the held-out side for ``heads evaluate``, and writes everything needed to reproduce it beside the
head (options, seed, data hashes, the split, library versions).
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from inference.apnea import PRESENCE_CUT, apnea_features, evaluate_apnea, fit_apnea
from inference.site_heads import cox_features, feature_names, impute
from inference.splits import split_by_group
from inference.staging_refit import StagingExample, refit_staging
from inference.survival import choose_l2, fit_cox
from inference.survival_metrics import harrell_c

from .checks import apnea_one_class, events_per_feature_warning, export_warnings, held_out_warnings
from .data import ApneaLabels, ExportData, StageLabels, SurvivalLabels
from .store import HeadError, plain, write_head

__all__ = ["FitOptions", "fit_apnea_head", "fit_cox_head", "fit_staging_head", "split"]


@dataclass
class FitOptions:
    name: str
    seed: int = 0
    test_fraction: float = 0.2
    folds: int = 5
    demographics: bool = False
    ties: str = "efron"
    grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    labels: tuple[str, ...] = ()  # Cox: only these labels (default: all in the file)
    force: bool = False
    command: dict[str, Any] = field(default_factory=dict)  # the command line's options, for the manifest


def split(groups: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test row indices, whole patients on each side."""
    if test_fraction <= 0:
        return np.arange(len(groups)), np.arange(0)
    train, test = split_by_group(list(groups), val_fraction=test_fraction, seed=seed)
    return np.asarray(sorted(train), dtype=np.int64), np.asarray(sorted(test), dtype=np.int64)


def _base(data: ExportData) -> dict[str, Any]:
    return {"base_model": {"name": data.model_name, "hash": data.model_hash, "validated": data.model_validated},
            "demo_weights": not data.model_validated}


def _manifest(data: ExportData, opts: FitOptions, labels_sha: str, splits: dict[str, Any],
              warnings: list[str]) -> dict[str, Any]:
    return {"options": {k: v for k, v in asdict(opts).items() if k != "command"}, "command": opts.command,
            "data": {"export": str(data.folder), "studies_parquet_sha256": data.table_sha256,
                     "labels_sha256": labels_sha, "studies": len(data.keys),
                     "split_unit": "patient" if data.has_patients else "study (the export has no patient ids)"},
            "split": splits,
            # what the terminal said about the sample, kept beside the head for whoever deploys it
            "warnings": warnings}


def fit_cox_head(data: ExportData, labels: SurvivalLabels, out: Path, opts: FitOptions) -> dict[str, Any]:
    """One Cox head per label; returns the head document (also written to ``out``)."""
    chosen = opts.labels or tuple(sorted(labels.by_label))
    unknown = [lb for lb in chosen if lb not in labels.by_label]
    if unknown:
        raise HeadError(f"labels not in the labels file: {', '.join(unknown)}")
    outcomes, splits = [], {}
    warnings = export_warnings(data)
    names = feature_names(opts.demographics)
    for label in chosen:
        what = f"label '{label}'"
        idx, time, event = labels.by_label[label]
        x = cox_features(data.night[idx], data.age[idx], np.asarray(data.sex, dtype=object)[idx], opts.demographics)
        groups = data.groups[idx]
        train, test = _split(what, groups, opts.test_fraction, opts.seed)
        if event[train].sum() == 0:
            raise HeadError(f"{what}: no events among the training studies")
        warnings += [w for w in [events_per_feature_warning(what, int(event[train].sum()), x.shape[1])] if w]
        if opts.test_fraction > 0:
            no_event = "none has an event" if len(test) and event[test].sum() == 0 else None
            warnings += held_out_warnings(what, len(test), one_class=no_event, undefined="the C-index is undefined")
        center = np.nanmean(x[train], axis=0)
        center = np.where(np.isfinite(center), center, 0.0)
        xt = impute(x[train], center)
        try:
            l2, cv = choose_l2(xt, time[train], event[train], groups[train], grid=opts.grid, folds=opts.folds,
                               seed=opts.seed, ties=opts.ties)
            model = fit_cox(xt, time[train], event[train], l2=l2, ties=opts.ties, feature_names=names)
        except ValueError as exc:  # too few patients for the folds, no comparable pair in any fold...
            raise HeadError(f"{what}: cannot fit on these studies: {exc}") from None
        c_train = harrell_c(time[train], event[train], model.linear_predictor(xt))
        c_test = (harrell_c(time[test], event[test], model.linear_predictor(impute(x[test], model.center)))
                  if len(test) else float("nan"))
        outcomes.append({"label": label, "model": model.to_dict(), "l2": l2, "cv": cv,
                         "train": {"studies": len(train), "events": int(event[train].sum()),
                                   "harrell_c": c_train},
                         "test": {"studies": len(test), "events": int(event[test].sum()) if len(test) else 0,
                                  "harrell_c": c_test}})
        splits[label] = {"test_study_keys": [data.keys[i] for i in idx[test]]}
    doc = {"kind": "cox", "name": opts.name, **_base(data), "demographics": opts.demographics,
           "time_unit": "as time_to_event in the labels file", "ties": opts.ties, "outcomes": outcomes}
    checksum = write_head(out, doc, _manifest(data, opts, labels.sha256, splits, warnings), force=opts.force)
    return {**doc, "checksum": checksum, "warnings": warnings}


def _split(what: str, groups: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`split`, its refusal (a single patient) said as a head problem rather than a traceback."""
    try:
        return split(groups, test_fraction, seed)
    except ValueError as exc:
        raise HeadError(f"{what}: cannot split these studies: {exc}") from None


def _apnea_matrix(data: ExportData, rows: np.ndarray, token_stats: bool) -> np.ndarray:
    return np.stack([apnea_features(data.night[i], data.tokens(i, ("RESP", "EKG")) if token_stats else None,
                                    use_token_stats=token_stats) for i in rows])


def fit_apnea_head(data: ExportData, labels: ApneaLabels, out: Path, opts: FitOptions,
                   token_stats: bool | None = None) -> dict[str, Any]:
    """Apnea presence (AHI >= 5) and severity classifiers; token statistics when tokens were exported."""
    if token_stats is None:
        token_stats = data.tokens(int(labels.index[0]), ("RESP",)) is not None
    x = _apnea_matrix(data, labels.index, token_stats)
    groups = data.groups[labels.index]
    train, test = _split("apnea", groups, opts.test_fraction, opts.seed)
    try:
        model, cv = fit_apnea(x[train], labels.ahi[train], groups[train], seed=opts.seed, folds=opts.folds)
    except ValueError as exc:  # one class among the training studies, too few patients for the folds...
        raise HeadError(f"apnea: cannot fit on these studies: {exc}") from None
    test_report = evaluate_apnea(model, x[test], labels.ahi[test]) if len(test) else None
    warnings = export_warnings(data)
    # The presence classifier is a logistic fit: its "events" are the studies of the smaller class.
    present = int((labels.ahi[train] >= PRESENCE_CUT).sum())
    warnings += [w for w in [events_per_feature_warning("apnea presence", min(present, len(train) - present),
                                                        x.shape[1], unit="studies in the smaller class")] if w]
    if opts.test_fraction > 0:
        one_class = apnea_one_class(test_report["presence"]["counts"]) if test_report else None
        warnings += held_out_warnings("apnea", len(test), one_class=one_class,
                                      undefined="the presence AUROC is undefined")
    doc = {"kind": "apnea", "name": opts.name, **_base(data), "token_statistics": token_stats,
           "model": model.to_dict(), "cv": cv, "train": {"studies": len(train)}, "test": test_report}
    splits = {"apnea": {"test_study_keys": [data.keys[i] for i in labels.index[test]]}}
    checksum = write_head(out, doc, _manifest(data, opts, labels.sha256, splits, warnings), force=opts.force)
    return {**doc, "checksum": checksum, "warnings": warnings}


def fit_staging_head(data: ExportData, labels: StageLabels, bundle, out: Path, opts: FitOptions,
                     epochs: int = 20, lr: float = 1e-4) -> dict[str, Any]:
    """Re-fit the bundle's staging head on scored nights (token embeddings exported with --export-tokens)."""
    import torch

    if bundle.staging is None:
        raise HeadError("the model bundle has no staging head to re-fit")
    if data.model_hash and bundle.identity.model_hash and data.model_hash != bundle.identity.model_hash:
        raise HeadError("the export was made with another model than the configured bundle")
    rows = sorted(labels.by_study)
    examples = []
    for i in rows:
        tokens = data.tokens(i)
        if tokens is None:
            raise HeadError(f"study {data.keys[i]}: no token embeddings in the export (use --export-tokens)")
        examples.append(StagingExample(tokens=tokens, labels=labels.by_study[i], group=str(data.groups[i])))
    groups = np.asarray([e.group for e in examples], dtype=object)
    train, val = _split("staging", groups, opts.test_fraction or 0.2, opts.seed)
    warnings = export_warnings(data) + held_out_warnings("staging", len(val), noun="validation")
    head, report = refit_staging(bundle.staging, [examples[i] for i in train], [examples[i] for i in val],
                                 epochs=epochs, lr=lr, seed=opts.seed)
    buf = io.BytesIO()
    torch.save(head.state_dict(), buf)
    doc = {"kind": "staging", "name": opts.name, **_base(data), "weights": "staging.pt",
           "report": plain(asdict(report))}
    splits = {"staging": {"validation_study_keys": [data.keys[rows[i]] for i in val]}}
    checksum = write_head(out, doc, _manifest(data, opts, labels.sha256, splits, warnings),
                          files={"staging.pt": buf.getvalue()}, force=opts.force)
    return {**doc, "checksum": checksum, "warnings": warnings}
