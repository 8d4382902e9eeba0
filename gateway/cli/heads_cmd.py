"""``psg-gateway heads fit|evaluate|show``: a site's own heads on the embeddings an archive batch exported."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .service_cmd import ConfigOption, load_or_exit

heads_app = typer.Typer(help="Fit, evaluate and inspect a site's own heads (Cox risk, apnea, staging).",
                        no_args_is_help=True)
fit_app = typer.Typer(help="Fit a head on an export (psg-gateway batch --export DIR).", no_args_is_help=True)
heads_app.add_typer(fit_app, name="fit")
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
    from ..heads.data import load_export, read_survival_labels
    from ..heads.fit import fit_cox_head

    data = _run(load_export, export)
    survival = _run(read_survival_labels, labels, data)
    opts = _options(out_dir, name, seed=seed, test_fraction=test_fraction, folds=folds, demographics=demographics,
                    ties=ties, labels=tuple(label or ()), force=force)
    doc = _run(fit_cox_head, data, survival, out_dir, opts)
    for o in doc["outcomes"]:
        out.print(f"  {o['label']}: l2 {o['l2']:g}, train C {o['train']['harrell_c']:.3f} "
                  f"({o['train']['studies']} studies, {o['train']['events']} events), held-out C "
                  f"{o['test']['harrell_c']:.3f} ({o['test']['studies']} studies)", highlight=False)
    _fitted(doc, out_dir)


@fit_app.command("apnea")
def fit_apnea_cmd(export: ExportOpt, ahi: Annotated[Path, typer.Option(help="CSV: study_key, ahi (events/hour)")],
                  out_dir: OutOpt, name: NameOpt = None,
                  token_stats: Annotated[bool | None, typer.Option(
                      "--token-stats/--no-token-stats",
                      help="RESP and EKG token statistics as features (default: when tokens were exported)")] = None,
                  seed: SeedOpt = 0, test_fraction: TestOpt = 0.2, folds: FoldsOpt = 5,
                  force: ForceOpt = False) -> None:
    """Sleep apnea presence (AHI >= 5) and severity (normal/mild/moderate/severe) classifiers."""
    from ..heads.data import load_export, read_ahi
    from ..heads.fit import fit_apnea_head

    data = _run(load_export, export)
    labels = _run(read_ahi, ahi, data)
    opts = _options(out_dir, name, seed=seed, test_fraction=test_fraction, folds=folds, force=force)
    doc = _run(fit_apnea_head, data, labels, out_dir, opts, token_stats)
    if doc["test"]:
        t = doc["test"]
        out.print(f"  held out: presence AUROC {t['presence']['auroc']:.3f}, severity balanced accuracy "
                  f"{t['severity']['balanced_accuracy']:.3f} ({t['n']} studies)", highlight=False)
    _fitted(doc, out_dir)


@fit_app.command("staging")
def fit_staging_cmd(export: ExportOpt, stages: Annotated[Path, typer.Option(
                        help="CSV: study_key, epoch (30-s, from 0), stage (W, N1, N2, N3, REM)")],
                    out_dir: OutOpt, config: ConfigOption = None, name: NameOpt = None,
                    epochs: Annotated[int, typer.Option(min=1, help="Training passes at most")] = 20,
                    lr: Annotated[float, typer.Option(help="Learning rate (AdamW)")] = 1e-4,
                    seed: SeedOpt = 0, test_fraction: TestOpt = 0.2, force: ForceOpt = False) -> None:
    """Re-fit the configured bundle's staging head on scored nights (export made with --export-tokens)."""
    from ..heads.data import load_export, read_stages
    from ..heads.fit import fit_staging_head

    bundle = _bundle(config)
    data = _run(load_export, export)
    labels = _run(read_stages, stages, data)
    opts = _options(out_dir, name, seed=seed, test_fraction=test_fraction, force=force)
    doc = _run(fit_staging_head, data, labels, bundle, out_dir, opts, epochs=epochs, lr=lr)
    before, after = doc["report"]["before"], doc["report"]["after"]
    out.print(f"  validation: accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, kappa "
              f"{before['cohen_kappa']:.3f} -> {after['cohen_kappa']:.3f}", highlight=False)
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
    from ..heads.data import load_export, read_ahi, read_stages, read_survival_labels
    from ..heads.evaluate import EvalOptions, evaluate_head
    from ..heads.report import render_report
    from ..heads.store import read_head

    if split not in ("test", "all"):
        raise typer.BadParameter("--split is test or all")
    doc, _ = _run(read_head, head)
    data = _run(load_export, export)
    given = {"cox": labels, "apnea": ahi, "staging": stages}[doc["kind"]]
    if given is None:
        flag = {"cox": "--labels", "apnea": "--ahi", "staging": "--stages"}[doc["kind"]]
        err.print(f"[bold red]error:[/] a {doc['kind']} head is evaluated with {flag}")
        raise typer.Exit(2)
    reader = {"cox": read_survival_labels, "apnea": read_ahi, "staging": read_stages}[doc["kind"]]
    label_data = _run(reader, given, data)
    bundle = _bundle(config) if doc["kind"] == "staging" else None
    opts = EvalOptions(split=split, horizons=tuple(horizon or ()), bootstrap=bootstrap, seed=seed)
    evaluation = _run(evaluate_head, head, data, label_data, opts, bundle)
    evaluation["data"]["labels"] = str(given)
    html = render_report(evaluation, report)
    if as_json:
        print(json.dumps(evaluation, indent=2))
        return
    for part in evaluation["cox"]:
        h, u = part["harrell_c"], part["uno_c"]
        out.print(f"  {part['label']}: Harrell C {_fmt(h)}, Uno C {_fmt(u)} ({part['n']} studies, "
                  f"{part['events']} events)", highlight=False)
    out.print(f"report: {html}", highlight=False)


def _fmt(stat: dict[str, Any]) -> str:
    if stat["value"] is None:
        return "n/a"
    ci = stat.get("ci")
    return f"{stat['value']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


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
