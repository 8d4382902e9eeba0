"""``psg-gateway heads fit|evaluate|show``: a site's own heads on the embeddings an archive batch exported."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from .service_cmd import ConfigOption, load_or_exit

heads_app = typer.Typer(help="Fit, evaluate and inspect a site's own heads (Cox risk, apnea, staging).",
                        no_args_is_help=True)
fit_app = typer.Typer(help="Fit a head on an export (psg-gateway batch --export DIR).", no_args_is_help=True)
heads_app.add_typer(fit_app, name="fit")
labels_app = typer.Typer(help="Build label files for heads fit from a site's records.", no_args_is_help=True)
heads_app.add_typer(labels_app, name="labels")
out = Console()
err = Console(stderr=True)

ExportOpt = Annotated[Path, typer.Option("--export", help="Export folder written by psg-gateway batch --export")]
OutOpt = Annotated[Path, typer.Option("--out", help="Head folder to write (head.json, head.sha256, manifest.json)")]
NameOpt = Annotated[str | None, typer.Option(help="Head name (default: the --out folder's name)")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the patient split and the cross-validation folds")]
TestOpt = Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of patients held out for evaluation")]
FoldsOpt = Annotated[int, typer.Option(min=2, max=20, help="Cross-validation folds (over patients)")]
ForceOpt = Annotated[bool, typer.Option(help="Replace a head already in --out")]


def _run(fn, *args, **kwargs) -> Any:
    """Label and head problems are the user's to fix: a clear message and exit code 2, no traceback."""
    from ..heads.data import LabelsError
    from ..heads.store import HeadError

    try:
        return fn(*args, **kwargs)
    except LabelsError as exc:
        err.print(f"[bold red]error:[/] {exc.source}: {len(exc.problems)} problem(s)")
        for problem in exc.problems:
            err.print(f"  {problem}", markup=False, highlight=False)
        raise typer.Exit(2) from None
    except HeadError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(2) from None


class _Warnings:
    """Warnings on stderr (visible without any log configuration), each said once, one line each."""

    def __init__(self) -> None:
        self.shown: set[str] = set()

    def __call__(self, lines: list[str] | tuple[str, ...]) -> None:
        for line in lines:
            if line and line not in self.shown:
                self.shown.add(line)
                err.print(f"[bold yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)


def _load(export: Path, warn: _Warnings):
    """The export, with its warnings (no patient ids...) said before any long computation starts."""
    from ..heads.checks import export_warnings
    from ..heads.data import load_export

    data = _run(load_export, export)
    warn(export_warnings(data))
    return data


def _options(out_dir: Path, name: str | None, **kw: Any):
    from ..heads.fit import FitOptions

    command = {"argv": sys.argv[1:], **{k: str(v) if isinstance(v, Path) else v for k, v in kw.items()}}
    return FitOptions(name=name or out_dir.name, command=command, **kw)


def _fitted(doc: dict[str, Any], out_dir: Path) -> None:
    out.print(f"{doc['kind']} head '{doc['name']}' written to {out_dir} (checksum {doc['checksum'][:12]})",
              highlight=False)
    if doc.get("demo_weights"):
        out.print("[bold red]fitted on demo (untrained) weights: NOT FOR CLINICAL USE[/]")


@fit_app.command("cox")
def fit_cox_cmd(export: ExportOpt, labels: Annotated[Path, typer.Option(
                    help="CSV: study_key or patient_id, label, time_to_event, event (0/1)")],
                out_dir: OutOpt, name: NameOpt = None,
                label: Annotated[list[str] | None, typer.Option(help="Only this label (repeatable)")] = None,
                demographics: Annotated[bool, typer.Option(help="Age and sex as features beside the embedding")
                                        ] = False,
                ties: Annotated[str, typer.Option(help="efron or breslow")] = "efron",
                seed: SeedOpt = 0, test_fraction: TestOpt = 0.2, folds: FoldsOpt = 5, force: ForceOpt = False) -> None:
    """Cox proportional-hazards risk heads, one per label, L2 chosen by cross-validation over patients."""
    from ..heads.checks import concordance_reason, fmt_metric
    from ..heads.data import read_survival_labels
    from ..heads.fit import fit_cox_head

    warn = _Warnings()
    data = _load(export, warn)
    survival = _run(read_survival_labels, labels, data)
    opts = _options(out_dir, name, seed=seed, test_fraction=test_fraction, folds=folds, demographics=demographics,
                    ties=ties, labels=tuple(label or ()), force=force)
    doc = _run(fit_cox_head, data, survival, out_dir, opts)
    for o in doc["outcomes"]:
        tr, te = o["train"], o["test"]
        train_c = fmt_metric(tr["harrell_c"], concordance_reason(tr["studies"], tr["events"]))
        test_c = fmt_metric(te["harrell_c"], concordance_reason(te["studies"], te["events"]))
        out.print(f"  {o['label']}: l2 {o['l2']:g}, train C {train_c} ({tr['studies']} studies, {tr['events']} "
                  f"events), held-out C {test_c} ({te['studies']} studies, {te['events']} events)",
                  highlight=False, markup=False, soft_wrap=True)
    warn(doc.get("warnings", []))
    _fitted(doc, out_dir)


AhiFromScoringOpt = Annotated[bool, typer.Option(
    "--ahi-from-scoring", help="AHI from the export's ahi3/ahi4 column (scoring files read by the batch) "
                               "instead of --ahi")]
AhiRuleOpt = Annotated[int, typer.Option(
    "--ahi-rule", min=3, max=4, help="With --ahi-from-scoring: hypopneas with >= 3 %% desaturation or an arousal "
                                     "(3, ahi3) or with >= 4 %% desaturation (4, ahi4)")]


def _apnea_labels(data: Any, ahi: Path | None, from_scoring: bool, rule: int) -> Any:
    """The AHI labels: a CSV (--ahi) or the export's own column (--ahi-from-scoring), exactly one."""
    from ..heads.data import ahi_from_export, read_ahi

    if (ahi is None) == (not from_scoring):
        err.print("[bold red]error:[/] give either --ahi CSV or --ahi-from-scoring")
        raise typer.Exit(2)
    if from_scoring:
        labels = _run(ahi_from_export, data, rule)
        # on stderr: evaluate --json keeps stdout for the JSON
        err.print(f"AHI ({rule} % rule) from the export's scoring files: {len(labels.index)} of "
                  f"{len(data.keys)} studies", highlight=False, markup=False)
        return labels
    return _run(read_ahi, ahi, data)


@fit_app.command("apnea")
def fit_apnea_cmd(export: ExportOpt, out_dir: OutOpt,
                  ahi: Annotated[Path | None, typer.Option(help="CSV: study_key, ahi (events/hour)")] = None,
                  ahi_from_scoring: AhiFromScoringOpt = False, ahi_rule: AhiRuleOpt = 3, name: NameOpt = None,
                  token_stats: Annotated[bool | None, typer.Option(
                      "--token-stats/--no-token-stats",
                      help="RESP and EKG token statistics as features (default: when tokens were exported)")] = None,
                  seed: SeedOpt = 0, test_fraction: TestOpt = 0.2, folds: FoldsOpt = 5,
                  force: ForceOpt = False) -> None:
    """Sleep apnea presence (AHI >= 5) and severity (normal/mild/moderate/severe) classifiers.

    The AHI comes from --ahi (a CSV) or, with --ahi-from-scoring, from the export's ahi3/ahi4 column
    (the scoring files the batch found beside the recordings; studies without one are left out)."""
    from ..heads.checks import apnea_auroc_reason, fmt_metric
    from ..heads.fit import fit_apnea_head

    warn = _Warnings()
    data = _load(export, warn)
    labels = _apnea_labels(data, ahi, ahi_from_scoring, ahi_rule)
    opts = _options(out_dir, name, seed=seed, test_fraction=test_fraction, folds=folds, force=force)
    doc = _run(fit_apnea_head, data, labels, out_dir, opts, token_stats)
    if doc["test"]:
        t = doc["test"]
        # The AUROC is None when the held-out studies are all of one class; the head is still written.
        auroc = fmt_metric(t["presence"]["auroc"], apnea_auroc_reason(t["presence"].get("counts")))
        balanced = fmt_metric(t["severity"]["balanced_accuracy"], "no study")
        out.print(f"  held out: presence AUROC {auroc}, severity balanced accuracy {balanced} ({t['n']} studies)",
                  highlight=False, markup=False, soft_wrap=True)
    warn(doc.get("warnings", []))
    _fitted(doc, out_dir)


@fit_app.command("staging")
def fit_staging_cmd(export: ExportOpt, stages: Annotated[Path, typer.Option(
                        help="CSV: study_key, epoch (30-s, from 0), stage (W, N1, N2, N3, REM)")],
                    out_dir: OutOpt, config: ConfigOption = None, name: NameOpt = None,
                    epochs: Annotated[int, typer.Option(min=1, help="Training passes at most")] = 20,
                    lr: Annotated[float, typer.Option(help="Learning rate (AdamW)")] = 1e-4,
                    seed: SeedOpt = 0, test_fraction: TestOpt = 0.2, force: ForceOpt = False) -> None:
    """Re-fit the configured bundle's staging head on scored nights (export made with --export-tokens)."""
    from ..heads.checks import fmt_metric
    from ..heads.data import read_stages
    from ..heads.fit import fit_staging_head

    bundle = _bundle(config)
    warn = _Warnings()
    data = _load(export, warn)
    labels = _run(read_stages, stages, data)
    opts = _options(out_dir, name, seed=seed, test_fraction=test_fraction, force=force)
    doc = _run(fit_staging_head, data, labels, bundle, out_dir, opts, epochs=epochs, lr=lr)
    before, after = doc["report"]["before"], doc["report"]["after"]
    # accuracy is None without a scored validation epoch, kappa also when one stage is all there is
    none, one = "no scored validation epoch", "undefined: one stage only"
    out.print(f"  validation: accuracy {fmt_metric(before['accuracy'], none)} -> {fmt_metric(after['accuracy'], none)}"
              f", kappa {fmt_metric(before['cohen_kappa'], one)} -> {fmt_metric(after['cohen_kappa'], one)}",
              highlight=False, markup=False, soft_wrap=True)
    warn(doc.get("warnings", []))
    _fitted(doc, out_dir)


def _bundle(config: Path | None):
    from inference.bundle import load_bundle

    from ..model import bundle_dir

    cfg = load_or_exit(config)
    return load_bundle(bundle_dir(cfg.model))  # the released heads: a staging head is re-fitted from them


@heads_app.command("evaluate")
def evaluate_cmd(head: Annotated[Path, typer.Argument(help="Head folder")], export: ExportOpt,
                 report: Annotated[Path, typer.Option(help="Folder for report.html, evaluation.json and plots")],
                 labels: Annotated[Path | None, typer.Option(help="Survival labels CSV (Cox heads)")] = None,
                 ahi: Annotated[Path | None, typer.Option(help="AHI CSV (apnea heads)")] = None,
                 ahi_from_scoring: AhiFromScoringOpt = False, ahi_rule: AhiRuleOpt = 3,
                 stages: Annotated[Path | None, typer.Option(help="Scored stages CSV (staging heads)")] = None,
                 split: Annotated[str, typer.Option(help="test: the studies the fit held out; all: every "
                                                         "labelled study (an external data set)")] = "test",
                 horizon: Annotated[list[float] | None, typer.Option(
                     help="Time-dependent AUROC horizon, in the labels' time unit (repeatable; default: "
                          "quartiles of the event times)")] = None,
                 bootstrap: Annotated[int, typer.Option(min=0, help="Bootstrap replicates for the CIs")] = 200,
                 seed: SeedOpt = 0, config: ConfigOption = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print evaluation.json")] = False) -> None:
    """Evaluate a head; write a self-contained HTML report with plots and the numbers as JSON."""
    from ..heads.checks import checksum_warning
    from ..heads.data import read_ahi, read_stages, read_survival_labels
    from ..heads.evaluate import EvalOptions, evaluate_head
    from ..heads.report import render_report
    from ..heads.store import read_head

    if split not in ("test", "all"):
        raise typer.BadParameter("--split is test or all")
    doc, _ = _run(read_head, head)
    warn = _Warnings()
    data = _load(export, warn)
    warn([checksum_warning(head, data, split) or ""])
    given = {"cox": labels, "apnea": ahi, "staging": stages}[doc["kind"]]
    if doc["kind"] == "apnea" and (ahi_from_scoring or ahi is None):
        label_data = _apnea_labels(data, ahi, ahi_from_scoring, ahi_rule)
        given = Path(f"{export}/studies.parquet#ahi{ahi_rule}") if ahi_from_scoring else ahi
    elif given is None:
        flag = {"cox": "--labels", "apnea": "--ahi", "staging": "--stages"}[doc["kind"]]
        err.print(f"[bold red]error:[/] a {doc['kind']} head is evaluated with {flag}")
        raise typer.Exit(2)
    else:
        reader = {"cox": read_survival_labels, "apnea": read_ahi, "staging": read_stages}[doc["kind"]]
        label_data = _run(reader, given, data)
    bundle = _bundle(config) if doc["kind"] == "staging" else None
    opts = EvalOptions(split=split, horizons=tuple(horizon or ()), bootstrap=bootstrap, seed=seed)
    evaluation = _run(evaluate_head, head, data, label_data, opts, bundle)
    evaluation["data"]["labels"] = str(given)
    html = render_report(evaluation, report)
    warn(evaluation["notes"])  # on stderr: --json keeps stdout for the JSON
    if as_json:
        print(json.dumps(evaluation, indent=2))
        return
    _print_evaluation(evaluation)
    out.print(f"report: {html}", highlight=False, markup=False, soft_wrap=True)


def _print_evaluation(evaluation: dict[str, Any]) -> None:
    """The headline numbers on the terminal; an undefined one reads ``n/a (why)``."""
    from ..heads.checks import apnea_auroc_reason, concordance_reason

    for part in evaluation["cox"]:
        why = concordance_reason(part["n"], part["events"])
        out.print(f"  {part['label']}: Harrell C {_fmt(part['harrell_c'], why)}, Uno C {_fmt(part['uno_c'], why)} "
                  f"({part['n']} studies, {part['events']} events)", highlight=False, markup=False, soft_wrap=True)
    apnea = evaluation.get("apnea")
    if apnea:
        p, sev = apnea["presence"], apnea["severity"]
        out.print(f"  apnea presence: AUROC {_fmt(p['auroc'], apnea_auroc_reason(p.get('counts')))}, balanced "
                  f"accuracy {_fmt(p['balanced_accuracy'], 'no study')}; severity balanced accuracy "
                  f"{_fmt(sev['balanced_accuracy'], 'no study')} ({apnea['n']} studies)",
                  highlight=False, markup=False, soft_wrap=True)
    staging = evaluation.get("staging")
    if staging:
        b, a = staging["before"], staging["after"]
        one = "undefined: one stage only"
        out.print(f"  staging ({staging['epochs']} epochs): accuracy {_fmt(b['accuracy'], 'no epoch')} -> "
                  f"{_fmt(a['accuracy'], 'no epoch')}, kappa {_fmt(b['cohen_kappa'], one)} -> "
                  f"{_fmt(a['cohen_kappa'], one)}", highlight=False, markup=False, soft_wrap=True)


def _fmt(stat: Any, reason: str | None = None) -> str:
    """``0.712 [0.650, 0.770]`` of ``{"value", "ci"}`` (or of a bare number), ``n/a (reason)`` when undefined."""
    from ..heads.checks import fmt_metric

    value, ci = (stat.get("value"), stat.get("ci")) if isinstance(stat, dict) else (stat, None)
    text = fmt_metric(value, reason)
    if text.startswith("n/a") or not ci or fmt_metric(ci[0]) == "n/a" or fmt_metric(ci[1]) == "n/a":
        return text
    return f"{text} [{fmt_metric(ci[0])}, {fmt_metric(ci[1])}]"


@heads_app.command("show")
def show_cmd(head: Annotated[Path, typer.Argument(help="Head folder")]) -> None:
    """What a head is: kind, outcomes, the model it was fitted on, checksum (verified)."""
    from ..heads.store import read_head

    doc, checksum = _run(read_head, head)
    summary = {"name": doc["name"], "kind": doc["kind"], "checksum": checksum, "created_at": doc.get("created_at"),
               "base_model": doc.get("base_model"), "demo_weights": doc.get("demo_weights")}
    if doc["kind"] == "cox":
        summary["outcomes"] = [{"label": o["label"], "l2": o["l2"], "train": o["train"], "test": o["test"]}
                               for o in doc["outcomes"]]
    print(json.dumps(summary, indent=2))


@labels_app.command("build")
def labels_build_cmd(diagnoses: Annotated[Path, typer.Option(
                         help="CSV: patient_id, code, code_system (ICD9CM|ICD10CM), date (YYYY-MM-DD)")],
                     export: ExportOpt,
                     map_file: Annotated[list[Path], typer.Option(
                         "--map", help="Phecode Map 1.2 file (ICD-9-CM map, ICD-10-CM map, definitions; "
                                       "repeatable)")],
                     out_file: Annotated[Path, typer.Option(
                         "--out", help="Labels CSV to write (for heads fit cox --labels); the count report "
                                       "goes beside it as <name>.report.json")],
                     follow_up: Annotated[Path | None, typer.Option(
                         help="CSV: patient_id, last_followup_date (default: the latest diagnosis date)")] = None,
                     horizon: Annotated[int | None, typer.Option(min=1, help="Censor at most this many days "
                                                                            "after the study")] = None,
                     outcome: Annotated[list[str] | None, typer.Option(
                         help="Only this phecode (repeatable; default: every phecode a diagnosis maps to)")] = None
                     ) -> None:
    """Time-to-event labels per study and phecode from ICD diagnosis codes (rules: docs/researcher-guide.md)."""
    from ..heads import labels as lb
    from ..heads.data import LabelsError

    try:
        pmap = lb.read_phecode_map(map_file)
        dx = lb.read_diagnoses(diagnoses, pmap)
        fu = lb.read_follow_up(follow_up) if follow_up else None
        studies = lb.read_export_studies(export)
        rows, report = lb.build_labels(studies, dx, pmap, follow_up=fu, horizon_days=horizon, outcomes=outcome)
        report_path = lb.write_labels(rows, report, out_file)
    except LabelsError as exc:
        for problem in exc.problems:  # one line each, naming the file (and the line in it)
            err.print(f"[bold red]error:[/] {escape(exc.source)}: {escape(problem)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except OSError as exc:
        err.print(f"[bold red]error:[/] cannot write {escape(str(exc.filename or out_file))}: {exc.strerror}",
                  highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    for c in report["outcomes"]:
        name = f" {c['phenotype']}" if c["phenotype"] else ""
        out.print(f"  {c['phecode']}{name}: {c['cases']} cases, {c['controls']} controls (censored: "
                  f"{c['censored_at_followup']} at last follow-up, {c['censored_at_horizon']} at the horizon; "
                  f"{c['diagnosed_after_censoring']} diagnosed after censoring), excluded: "
                  f"{c['excluded_prevalent']} prevalent, {c['excluded_range']} by exclusion range, "
                  f"{c['excluded_no_followup']} without follow-up", highlight=False, markup=False, soft_wrap=True)
    d = report["diagnoses"]
    if report["studies_without_patient_or_date"]:
        err.print(f"[bold yellow]warning:[/] {report['studies_without_patient_or_date']} studies have no patient id "
                  "or recording date: not labelled", highlight=False)
    if d["unmapped_rows"]:
        err.print(f"[bold yellow]warning:[/] {d['unmapped_rows']} of {d['rows']} diagnosis rows "
                  f"({d['unmapped_codes']} codes) are in no map", highlight=False)
    out.print(f"labels: {out_file} ({len(rows)} rows); report: {report_path}", highlight=False, markup=False,
              soft_wrap=True)
