"""``psg-gateway heads evaluate``: how well a fitted head does on a site's data, with uncertainty.

Cox heads: Harrell's and Uno's C-index and the time-dependent AUROC at the horizons, each with a
bootstrap 95 % CI that resamples patients; calibration by decile of predicted risk at a horizon
(observed risk from Kaplan-Meier in each decile); the C-index by sex and by age band; and a modality
ablation (each modality's embedding replaced by the training mean in turn: the drop in C shows which
signals carry the risk). Apnea heads: accuracy, balanced accuracy and AUROC with CIs, the ROC curve
and the severity confusion matrix. Staging heads: the released head against the re-fitted one on the
same scored epochs. By default only the studies the fit held out (``--split test``) are evaluated.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from inference.results import MODALITIES, STAGES
from inference.site_heads import cox_features, impute, modality_columns
from inference.survival import CoxModel
from inference.survival_metrics import bootstrap_ci, calibration_by_decile, harrell_c, td_auc, uno_c

from .checks import (
    NO_PATIENTS,
    apnea_one_class,
    checksum_warning,
    held_out_warnings,
)
from .data import ApneaLabels, ExportData, StageLabels, SurvivalLabels
from .store import HeadError, read_head

__all__ = ["EvalOptions", "evaluate_head"]

AGE_BANDS = ((0.0, 40.0, "<40"), (40.0, 60.0, "40-59"), (60.0, float("inf"), "60+"))


@dataclass
class EvalOptions:
    split: str = "test"  # test: the studies the fit held out; all: every labelled study
    horizons: tuple[float, ...] = ()  # default: quartiles of the event times
    bootstrap: int = 200
    seed: int = 0


def _ci(value: float, ci: tuple[float, float, int] | None) -> dict[str, Any]:
    return {"value": _num(value), "ci": None if ci is None or ci[2] == 0 else [_num(ci[0]), _num(ci[1])]}


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _safe(fn: Callable[[], float]) -> float:
    """A metric that cannot be computed on this data (no comparable pair, a horizon out of range) is NaN."""
    try:
        return float(fn())
    except (ValueError, ZeroDivisionError, FloatingPointError):
        return float("nan")


def _rows(folder: Path, keys: list[str], idx: np.ndarray, part: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(evaluated rows, training rows) of ``idx`` per the head's manifest split."""
    if split == "all":
        return idx, idx
    try:
        manifest = json.loads((Path(folder) / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise HeadError(f"{folder}: manifest.json cannot be read ({getattr(exc, 'strerror', None) or exc}); it "
                        "names the held-out studies of --split test (--split all evaluates every study)") from None
    held = set(manifest.get("split", {}).get(part, {}).get("test_study_keys")
               or manifest.get("split", {}).get(part, {}).get("validation_study_keys") or [])
    test = np.asarray([i for i in idx if keys[i] in held], dtype=np.int64)
    train = np.asarray([i for i in idx if keys[i] not in held], dtype=np.int64)
    if not len(test):
        raise HeadError(f"no held-out study of '{part}' in this export: use --split all for an external data set")
    return test, train


def evaluate_head(folder: Path, data: ExportData, labels: SurvivalLabels | ApneaLabels | StageLabels,
                  opts: EvalOptions, bundle=None) -> dict[str, Any]:
    doc, checksum = read_head(folder)
    out: dict[str, Any] = {
        "head": {"name": doc["name"], "kind": doc["kind"], "checksum": checksum,
                 "base_model": doc.get("base_model"), "demo_weights": bool(doc.get("demo_weights"))},
        "data": {"export": str(data.folder), "split": opts.split, "n_studies": 0, "n_patients": 0,
                 "seed": opts.seed, "bootstrap": opts.bootstrap},
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cox": [], "apnea": None, "staging": None, "notes": [],
    }
    # The notes are what the report's header lists and what the command prints as warnings.
    if not data.has_patients:
        out["notes"].append(NO_PATIENTS)
    changed = checksum_warning(folder, data, opts.split)
    if changed:
        out["notes"].append(changed)
    base = (doc.get("base_model") or {}).get("hash")
    if base and data.model_hash and base != data.model_hash:
        raise HeadError("the head was fitted on another model's embeddings than this export's")
    evaluated: set[int] = set()
    if doc["kind"] == "cox":
        if not isinstance(labels, SurvivalLabels):
            raise HeadError("a Cox head is evaluated with a survival labels file (--labels)")
        for outcome in doc["outcomes"]:
            if outcome["label"] not in labels.by_label:
                out["notes"].append(f"label '{outcome['label']}' is not in the labels file: not evaluated")
                continue
            part, rows = _cox_outcome(folder, doc, outcome, data, labels, opts)
            out["cox"].append(part)
            evaluated.update(rows)
            out["notes"] += held_out_warnings(
                f"label '{part['label']}'", part["n"], one_class="none has an event" if not part["events"] else None,
                undefined="the C-index is undefined", noun="evaluated")
    elif doc["kind"] == "apnea":
        if not isinstance(labels, ApneaLabels):
            raise HeadError("an apnea head is evaluated with an AHI file (--ahi)")
        out["apnea"], rows = _apnea(folder, doc, data, labels, opts)
        evaluated.update(rows)
        out["notes"] += held_out_warnings("apnea", out["apnea"]["n"],
                                          one_class=apnea_one_class(out["apnea"]["presence"]["counts"]),
                                          undefined="the presence AUROC is undefined", noun="evaluated")
    else:
        if not isinstance(labels, StageLabels) or bundle is None:
            raise HeadError("a staging head is evaluated with a stages file (--stages) and the model bundle")
        out["staging"], rows = _staging(folder, doc, data, labels, opts, bundle)
        evaluated.update(rows)
        out["notes"] += held_out_warnings("staging", len(rows), noun="evaluated")
    out["data"]["n_studies"] = len(evaluated)
    out["data"]["n_patients"] = len({data.groups[i] for i in evaluated})
    return out


# ---- Cox --------------------------------------------------------------------------------------------------
def _cox_outcome(folder: Path, doc: dict, outcome: dict, data: ExportData, labels: SurvivalLabels,
                 opts: EvalOptions) -> tuple[dict[str, Any], set[int]]:
    label = outcome["label"]
    model = CoxModel.from_dict(outcome["model"])
    idx, time_all, event_all = labels.by_label[label]
    pos = {int(i): k for k, i in enumerate(idx)}
    test, train = _rows(folder, data.keys, idx, label, opts.split)
    t, e = time_all[[pos[i] for i in test]], event_all[[pos[i] for i in test]]
    tt, et = time_all[[pos[i] for i in train]], event_all[[pos[i] for i in train]]
    x = impute(cox_features(data.night[test], data.age[test], np.asarray(data.sex, dtype=object)[test],
                            bool(doc.get("demographics"))), model.center)
    risk = model.linear_predictor(x)
    groups = data.groups[test]
    rng_seed = opts.seed
    horizons = opts.horizons or _default_horizons(t, e)
    horizons = tuple(h for h in horizons if t.min() <= h < t.max())

    def boot(stat: Callable[[np.ndarray], float]) -> tuple[float, float, int]:
        return bootstrap_ci(lambda ix: _safe(lambda: stat(ix)), len(t), groups=groups, n_boot=opts.bootstrap,
                            seed=rng_seed)

    harrell = _safe(lambda: harrell_c(t, e, risk))
    uno = _safe(lambda: uno_c(t, e, risk, tt, et))
    part: dict[str, Any] = {
        "label": label, "n": len(t), "events": int(e.sum()), "time_unit": doc.get("time_unit"),
        "harrell_c": _ci(harrell, boot(lambda ix: harrell_c(t[ix], e[ix], risk[ix]))),
        "uno_c": _ci(uno, boot(lambda ix: uno_c(t[ix], e[ix], risk[ix], tt, et))),
        "td_auc": [], "calibration": None, "subgroups": [], "ablation": [],
    }
    for h in horizons:
        value = _safe(lambda h=h: td_auc(t, e, risk, [h], tt, et)[0])
        ci = boot(lambda ix, h=h: td_auc(t[ix], e[ix], risk[ix], [h], tt, et)[0])
        part["td_auc"].append({"horizon": float(h), **_ci(value, ci)})
    if horizons:
        h = horizons[len(horizons) // 2]
        try:
            bins = calibration_by_decile(t, e, model.risk_at(x, h), h)
            part["calibration"] = {"horizon": float(h), "bins": [{k: _num(v) for k, v in b.items()} for b in bins]}
        except ValueError:
            part["calibration"] = None
    part["subgroups"] = _subgroups(t, e, risk, data, test, groups, opts)
    for modality in MODALITIES:
        masked = x.copy()
        cols = modality_columns(modality)
        masked[:, cols] = model.center[cols]
        c = _safe(lambda masked=masked: harrell_c(t, e, model.linear_predictor(masked)))
        part["ablation"].append({"modality": modality, "harrell_c": _num(c),
                                 "delta": _num(c - harrell) if np.isfinite(c) and np.isfinite(harrell) else None})
    return part, set(map(int, test))


def _default_horizons(t: np.ndarray, e: np.ndarray) -> tuple[float, ...]:
    times = t[e == 1]
    if len(times) < 4:
        return ()
    return tuple(float(q) for q in np.quantile(times, [0.25, 0.5, 0.75]))


def _subgroups(t, e, risk, data: ExportData, rows: np.ndarray, groups, opts: EvalOptions) -> list[dict[str, Any]]:
    out = []
    sex = np.asarray([(data.sex[i] or "unknown") for i in rows], dtype=object)
    age = data.age[rows]
    bands = [("sex", s, sex == s) for s in ("F", "M", "unknown") if (sex == s).any()]
    for lo, hi, name in AGE_BANDS:
        mask = (age >= lo) & (age < hi)
        if mask.any():
            bands.append(("age", name, mask))
    if np.isnan(age).any():
        bands.append(("age", "unknown", np.isnan(age)))
    for group, value, mask in bands:
        sub = np.nonzero(mask)[0]
        c = _safe(lambda sub=sub: harrell_c(t[sub], e[sub], risk[sub]))
        ci = bootstrap_ci(lambda ix, sub=sub: _safe(lambda: harrell_c(t[sub][ix], e[sub][ix], risk[sub][ix])),
                          len(sub), groups=groups[sub], n_boot=max(50, opts.bootstrap // 2), seed=opts.seed)
        out.append({"group": group, "value": value, "n": len(sub), "events": int(e[sub].sum()),
                    "harrell_c": _ci(c, ci)})
    return out


# ---- apnea ------------------------------------------------------------------------------------------------
def _apnea(folder: Path, doc: dict, data: ExportData, labels: ApneaLabels, opts: EvalOptions
           ) -> tuple[dict[str, Any], set[int]]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score, roc_curve

    from inference.apnea import ApneaModel, severity_of

    from .fit import _apnea_matrix

    model = ApneaModel.from_dict(doc["model"])
    test, _train = _rows(folder, data.keys, labels.index, "apnea", opts.split)
    pos = {int(i): k for k, i in enumerate(labels.index)}
    ahi = labels.ahi[[pos[i] for i in test]]
    x = _apnea_matrix(data, test, bool(doc.get("token_statistics")))
    presence, severity = model.predict(x)
    truth, klass, sev_true = (ahi >= 5).astype(int), severity.argmax(axis=1), severity_of(ahi)
    groups = data.groups[test]

    def stat(fn):
        value = _safe(lambda: fn(np.arange(len(ahi))))
        return _ci(value, bootstrap_ci(lambda ix: _safe(lambda: fn(ix)), len(ahi), groups=groups,
                                       n_boot=opts.bootstrap, seed=opts.seed))

    two_classes = len(set(truth)) == 2
    fpr, tpr, _ = roc_curve(truth, presence) if two_classes else (np.array([]), np.array([]), None)
    confusion = np.zeros((4, 4), dtype=int)
    for a, b in zip(sev_true, klass):
        confusion[a, b] += 1
    return {
        "n": len(ahi),
        "presence": {"counts": {"no": int((truth == 0).sum()), "yes": int(truth.sum())},
                     "accuracy": stat(lambda ix: accuracy_score(truth[ix], presence[ix] >= 0.5)),
                     "balanced_accuracy": stat(lambda ix: balanced_accuracy_score(truth[ix], presence[ix] >= 0.5)),
                     "auroc": stat(lambda ix: roc_auc_score(truth[ix], presence[ix])),
                     "roc": {"fpr": [round(float(v), 4) for v in fpr], "tpr": [round(float(v), 4) for v in tpr]}},
        "severity": {"accuracy": stat(lambda ix: accuracy_score(sev_true[ix], klass[ix])),
                     "balanced_accuracy": stat(lambda ix: balanced_accuracy_score(sev_true[ix], klass[ix])),
                     "classes": ["normal", "mild", "moderate", "severe"], "confusion_matrix": confusion.tolist()},
    }, set(map(int, test))


# ---- staging ----------------------------------------------------------------------------------------------
def _staging(folder: Path, doc: dict, data: ExportData, labels: StageLabels, opts: EvalOptions, bundle
             ) -> tuple[dict[str, Any], set[int]]:
    import copy
    import io

    import torch
    from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix, f1_score

    from inference.staging_refit import predict_epochs

    rows = np.asarray(sorted(labels.by_study), dtype=np.int64)
    test, _ = _rows(folder, data.keys, rows, "staging", opts.split)
    refit = copy.deepcopy(bundle.staging)
    refit.load_state_dict(torch.load(io.BytesIO((Path(folder) / doc["weights"]).read_bytes()), map_location="cpu",
                                     weights_only=True))
    refit.eval()
    truth, before, after = [], [], []
    for i in test:
        tokens = data.tokens(int(i))
        if tokens is None:
            raise HeadError(f"study {data.keys[i]}: no token embeddings in the export (use --export-tokens)")
        scored = labels.by_study[int(i)]
        p0, p1 = predict_epochs(bundle.staging, tokens), predict_epochs(refit, tokens)
        n = min(len(scored), len(p0))
        keep = scored[:n] >= 0
        truth.append(scored[:n][keep])
        before.append(p0[:n].argmax(axis=1)[keep])
        after.append(p1[:n].argmax(axis=1)[keep])
    y, b, a = np.concatenate(truth), np.concatenate(before), np.concatenate(after)

    def scores(pred: np.ndarray) -> dict[str, Any]:
        return {"accuracy": float(accuracy_score(y, pred)), "cohen_kappa": _num(cohen_kappa_score(y, pred)),
                "macro_f1": float(f1_score(y, pred, average="macro", labels=range(5), zero_division=0)),
                "confusion": confusion_matrix(y, pred, labels=range(5)).tolist()}

    return {"classes": list(STAGES), "epochs": len(y), "before": scores(b), "after": scores(a)}, set(map(int, test))
