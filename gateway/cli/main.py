"""The ``psg-gateway`` command line."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..fsutil import set_private_mode
from .batch_cmd import batch
from .demo_cmd import demo
from .heads_cmd import heads_app
from .montage_cmd import montage_app
from .outbox_cmd import hl7_app, outbox_app
from .reference_cmd import reference_app
from .scoring_cmd import scoring_app
from .service_cmd import config_app, db_app, load_or_exit, run
from .studies_cmd import studies_app
from .users_cmd import audit_app, users_app

app = typer.Typer(
    name="psg-gateway",
    help="Turn polysomnography recordings into SleepFM embeddings, hypnograms and quiet HL7 risk flags.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bundle_app = typer.Typer(help="Model bundles: inspect one, or generate the untrained demo bundle.",
                         no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")
app.add_typer(montage_app, name="montage")
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(studies_app, name="studies")
app.add_typer(outbox_app, name="outbox")
app.add_typer(hl7_app, name="hl7")
app.add_typer(heads_app, name="heads")
app.add_typer(reference_app, name="reference")
app.add_typer(scoring_app, name="scoring")
app.add_typer(users_app, name="users")
app.add_typer(audit_app, name="audit")
app.command("run")(run)
app.command("demo")(demo)
app.command("batch")(batch)

err = Console(stderr=True)
out = Console()


@app.callback()
def _private_files(ctx: typer.Context) -> None:
    """Every command writes private files (umask 0077; 0027 once a config with ``service.group`` is
    loaded), whatever umask the launcher left. Restored when the command ends: a command run in-process
    (typer's CliRunner, the tests) leaves its caller's umask as it was."""
    ctx.call_on_close(set_private_mode(None))


def _fail(message: str, code: int = 2) -> None:
    # One line whatever the terminal's width (soft_wrap), so the reason can be grepped; escaped, since
    # a path or a reason may hold "[...]" that Rich would take for markup.
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


_HASH_BLOCK = 32 << 20


def _study_key(path: Path) -> str:
    """A study key that is not PHI: the first 16 hex digits of the SHA-256 of the file's content
    (of a folder: of its files' relative names and contents, in name order)."""
    digest = hashlib.sha256()
    view = memoryview(bytearray(_HASH_BLOCK))
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            # 32-MB reads: hashlib lets go of the GIL for each, and 4-MB reads took it back 60 times a
            # night behind torch's import beside it (0.16 s of hashing took 0.7 s). Not a mapping of the
            # whole file, which would count the file in the process's resident memory.
            while size := fh.readinto(view):
                digest.update(view[:size])
    return digest.hexdigest()[:16]


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    )


@app.command()
def infer(
    file: Annotated[Path, typer.Argument(help="EDF/EDF+/BDF file, DICOM waveform file, or a folder of one study's DICOM files")],
    bundle: Annotated[Path | None, typer.Option(help="Model bundle folder (default: generated demo bundle)")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: ./<file stem>-psg)")] = None,
    montage: Annotated[Path | None, typer.Option(help="Montage table YAML (default: built-in table)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    precision: Annotated[str, typer.Option(help="fp32 (default), bf16, or fp16 (CUDA)")] = "fp32",
    threads: Annotated[int | None, typer.Option(
        min=1, help="torch CPU threads (default: the physical cores this process may use)")] = None,
    windows_per_batch: Annotated[int | None, typer.Option(help="5-minute windows per encoder pass")] = None,
    source: Annotated[str | None, typer.Option(help="Montage scope of this input, e.g. folder:/data/lab2")] = None,
    hypnogram: Annotated[Path | None, typer.Option(
        help="EDF+ file with the scored hypnogram (default: stage annotations in FILE itself)")] = None,
    filename_pattern: Annotated[str | None, typer.Option(
        help="Regex with named groups (patient_id, accession, ...) that reads identifiers from the file name")] = None,
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", envvar="PSG_CONFIG",
        help="Configuration file whose quality section sets the signal-quality gate (default: built-in)")] = None,
) -> None:
    """Run the model on one recording and write embeddings, hypnogram, metrics and hazards.

    A sidecar JSON beside the file (FILE.json or STEM.json) supplies identifiers the header lacks."""
    from concurrent.futures import ThreadPoolExecutor

    # not inference.bundle: that imports torch, which loads on the side thread beside the read
    from inference.identity import BundleError
    from inference.inputs import InputError

    from ..cpu import engine_threads
    from ..logging import configure_logging, get_logger
    from ..montage.table import MontageError, MontageTable, default_table
    from ..pipeline.prepare import MappingError
    from ..pipeline.steps import (
        decode_inputs,
        infer_ready,
        prepare_study,
        shift_annotations,
        staging_agreement,
        store_outputs,
    )
    from ..readers import read_recording
    from ..readers.errors import ReaderError

    quality = load_or_exit(config).quality.thresholds() if config is not None else None
    configure_logging()
    log = get_logger("psg.infer")
    started = time.perf_counter()
    out_dir = out_dir or Path.cwd() / f"{file.stem}-psg"
    key: str | None = None

    def make_engine():  # torch, the bundle and its checksums: ~2-3 s that the read and preprocess hide
        from inference.bundle import ensure_demo_bundle, load_bundle
        from inference.engine import Engine, EngineOptions

        model = load_bundle(bundle or ensure_demo_bundle())
        chosen = engine_threads(threads, source="--threads")
        log.info("engine.threads", **chosen.log_fields())
        return Engine(model, EngineOptions(device=device, precision=precision, threads=chosen.threads,
                                           windows_per_batch=windows_per_batch))

    # Beside the read: the model's load, and the content hash that names the study (hashlib releases the GIL).
    side = ThreadPoolExecutor(2, thread_name_prefix="infer")
    hashing = None
    try:
        table = MontageTable.load(montage) if montage else default_table()
        pending = side.submit(make_engine)
        if not file.exists():
            raise ReaderError(file, "file not found")
        hashing = side.submit(_study_key, file)
        recording = decode_inputs([file], filename_pattern)
        key = hashing.result()
        log.info("study.received", study_key=key, source="cli")
        if pending.done():
            pending.result()  # a bundle that did not load fails the command now, not after preprocessing
        scored_annotations = recording.annotations
        if hypnogram:
            scored_annotations = shift_annotations(read_recording(hypnogram), recording)
        log.info("study.decoded", study_key=key, channels=len(recording.channels),
                 duration_s=round(recording.duration_s, 1), warnings=recording.warnings)
        with _progress() as progress:
            task = progress.add_task("preprocess channels", total=None)
            ready = prepare_study(recording, table, key=key, source=source, quality=quality,
                                  progress=lambda d, t: progress.update(task, completed=d, total=t))
            log.info("study.mapped", study_key=key, montage=table.version,
                     modalities={m: len(v) for m, v in ready.channels.items()},
                     unmapped=ready.match.unmapped, ignored=ready.match.ignored)
            engine = pending.result()
            task = progress.add_task("encode 5-min windows", total=None)
            result = infer_ready(engine, ready, progress=lambda d, t: progress.update(task, completed=d, total=t))
    except (ReaderError, MontageError, BundleError, MappingError, InputError, ValueError) as exc:
        if key is None and hashing is not None and hashing.exception() is None:  # waits for the hash
            key = hashing.result()  # the read failed before the key was logged: the failure still names it
        # A path may carry a patient name: the log gets the study key and the reason without paths.
        reason = exc.reason if isinstance(exc, ReaderError) else str(exc)
        log.error("study.failed", study_key=key, error=type(exc).__name__,
                  reason=reason.replace(str(file.parent), "<folder>"))
        _fail(str(exc))
        return
    finally:
        side.shutdown(wait=True)
    scoring = staging_agreement(result, scored_annotations)
    if scoring is not None:
        log.info("study.staging_agreement", study_key=key, epochs=scoring["epochs"],
                 accuracy=scoring["accuracy"], kappa=scoring["kappa"])
    store_outputs(result, out_dir, ready, scored_annotations)
    log.info("study.inferred", study_key=key, tokens=result.n_tokens, missing=result.missing_modalities,
             validated=result.validated, seconds=round(time.perf_counter() - started, 2))
    _summary(result, ready, out_dir)
    global _exit_without_teardown
    _exit_without_teardown = True  # every output is written and closed


def _summary(result, ready, out_dir: Path) -> None:
    table = Table(title=f"study {result.key}", show_header=False)
    for modality, labels in ready.channels.items():
        table.add_row(modality, ", ".join(labels))
    if ready.match.unmapped:
        table.add_row("unmapped", ", ".join(ready.match.unmapped))
    if result.missing_modalities:
        table.add_row("missing", ", ".join(result.missing_modalities) + " (masked in the heads)")
    if ready.quality is not None:
        verdict = ready.quality
        if verdict.interpretable:
            table.add_row("signals", escape("interpretable" + "".join(f"; unusable {w}" for w in verdict.warnings)))
        else:
            table.add_row("signals", "[bold]NOT interpretable[/]: " + escape("; ".join(verdict.reasons)))
    if result.staging is not None:
        m = result.staging.metrics
        table.add_row("sleep", f"TST {m.tst_min:.0f} min, efficiency {m.sleep_efficiency_pct:.0f}%")
    table.add_row("model", f"{result.bundle.name} {result.bundle.version}"
                  + ("" if result.validated else "  [bold]NOT VALIDATED - NOT FOR CLINICAL USE[/]"))
    table.add_row("outputs", str(out_dir))
    out.print(table)


@app.command("example-night")
def example_night(
    path: Annotated[Path, typer.Argument(help="EDF file to write")],
    hours: Annotated[float, typer.Option(help="Length of the night")] = 8.0,
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
) -> None:
    """Write a synthetic 18-channel PSG night (for demos and benchmarks; no real person)."""
    from ..synthetic.night import write_synthetic_night

    path.parent.mkdir(parents=True, exist_ok=True)
    write_synthetic_night(path, hours=hours, seed=seed)
    out.print(f"wrote {path} ({hours:g} h, {path.stat().st_size / 1e6:.0f} MB)")


@bundle_app.command("make-demo")
def bundle_make_demo(
    path: Annotated[Path, typer.Argument(help="Folder to create")],
    seed: Annotated[int, typer.Option(help="Random seed")] = 0,
) -> None:
    """Generate the deterministic, untrained demo bundle (validated: false)."""
    from inference.bundle import make_demo_bundle

    make_demo_bundle(path, seed=seed)
    out.print(f"wrote untrained demo bundle to {path} (NOT FOR CLINICAL USE)")


@bundle_app.command("info")
def bundle_info(path: Annotated[Path, typer.Argument(help="Bundle folder")]) -> None:
    """Load a bundle and print its identity (name, version, validated, checkpoint SHA-256, age/sex encoding)."""
    from inference.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(path)
    except BundleError as exc:
        _fail(str(exc))
        return
    doc = bundle.identity.as_dict()
    doc["heads"] = {"staging": bundle.staging is not None, "diagnosis": bundle.diagnosis is not None}
    doc["outcomes"] = len(bundle.outcomes)
    # an admin should see before the first study whether the age/sex encoding is the bundle's own
    doc["demographics_encoding"] = bundle.demographics.label
    out.print_json(json.dumps(doc))


@app.command()
def version() -> None:
    """Print the version."""
    from importlib.metadata import version as dist_version

    out.print(dist_version("psg-gateway"))


# Set by a command whose work is all written and closed when it returns (``infer``): the console entry
# point then ends the process without the interpreter's teardown of torch and scipy, ~0.5 s of a
# one-night ``infer`` (measured: 0.54 s for a script that only imports them). Commands that start
# services, pools or Ray keep the normal exit, whose atexit hooks they need.
_exit_without_teardown = False


def main() -> None:
    """The ``psg-gateway`` console entry point: the typer app, then the exit."""
    global _exit_without_teardown
    _exit_without_teardown = False
    try:
        app()  # standalone: always ends in SystemExit
    except SystemExit as exc:
        if _exit_without_teardown and not exc.code:
            import logging
            import os

            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(0)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
