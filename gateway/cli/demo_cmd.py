"""``psg-gateway demo``: the daemon end to end on the embedded defaults, in one command.

First fills the site reference behind percentile flags from a small generated archive (as a site does
with ``psg-gateway reference seed`` before go-live), so the demo shows percentile flags at work rather
than flagging everything. Then starts the daemon (SQLite, ./var, DICOM on 127.0.0.1), drops a generated
example night into the drop folder, sends a generated DICOM waveform study to the DICOM port as any
modality would, waits for both studies to reach their final state, prints their flags, percentiles and
where their outputs are, and stops. Exit code 1 when a study did not finish in time.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from .service_cmd import ConfigOption, load_or_exit

if TYPE_CHECKING:
    from ..config import GatewayConfig

out = Console()


def demo(
    config: ConfigOption = None,
    hours: Annotated[float, typer.Option(help="Length of each generated night (the reference's too)")] = 1.0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for both studies")] = 600.0,
    reference_nights: Annotated[int | None, typer.Option(
        min=0, help="Generated nights (as long as the demo's) that seed the site reference first; default: "
                    "flags.percentile_min_reference when an outcome is flagged by percentile, else 0")] = None,
) -> None:
    """Seed the site reference, run the daemon, feed it one EDF (drop folder) and one DICOM study (C-STORE),
    show the results (and, with hl7 enabled on 127.0.0.1, the ORU^R01 each sent to a stand-in EHR)."""
    from pydicom import dcmread
    from pynetdicom import AE

    from ..daemon import Daemon
    from ..store.models import FINAL_STATES
    from ..synthetic.dicom_study import write_psg_study
    from ..synthetic.night import write_synthetic_night

    cfg = load_or_exit(config)
    if not cfg.drop_folders or not cfg.dicom.enabled:
        out.print("the demo needs a drop folder and the DICOM receiver in the configuration")
        raise typer.Exit(2)
    if reference_nights is None:
        by_percentile = any(o.percentile is not None for o in cfg.flags.outcomes)
        reference_nights = cfg.flags.percentile_min_reference if by_percentile else 0
    if reference_nights:
        _seed_reference(cfg, reference_nights, hours)
    listener = None
    inbox = Path(cfg.paths.var_dir) / "ehr-inbox"
    if cfg.hl7.enabled and cfg.hl7.host in ("127.0.0.1", "localhost"):
        from ..hl7.listener import FileMllpListener

        listener = FileMllpListener(cfg.hl7.host, cfg.hl7.port, inbox).start()
        out.print(f"stand-in EHR listening on {cfg.hl7.host}:{cfg.hl7.port}, writing results to {inbox}")
    daemon = Daemon(cfg)
    daemon.start()
    before = max((s.id for s in daemon.repo.list(limit=1)), default=0)
    try:
        out.print(f"[bold]daemon ready[/]: drop folder {cfg.drop_folders[0].path}, DICOM "
                  f"{cfg.dicom.ae_title}@{cfg.dicom.host}:{daemon.receiver.port}, "
                  f"health http://{cfg.http.host}:{daemon.ops.port if daemon.ops else '-'}/healthz")
        stage = Path(cfg.paths.var_dir) / "demo-staging"
        stage.mkdir(parents=True, exist_ok=True)
        night = write_synthetic_night(stage / "example_night.edf", hours=hours, seed=1)
        # Write beside the drop folder, then rename in: the way an export job should deliver files.
        target = Path(cfg.drop_folders[0].path) / f"example_night_{int(time.time())}.edf"
        night.replace(target)
        out.print(f"dropped {target.name} ({target.stat().st_size / 1e6:.0f} MB)")

        files = write_psg_study(stage / f"dicom_{int(time.time())}", hours=hours, seed=int(time.time()) % 10000)
        ae = AE(ae_title="PSGDEMO")
        ae.maximum_pdu_size = 0
        datasets = [dcmread(f) for f in files]
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID)
        assoc = ae.associate(cfg.dicom.host if cfg.dicom.host != "0.0.0.0" else "127.0.0.1",
                             daemon.receiver.port, ae_title=cfg.dicom.ae_title)
        if not assoc.is_established:
            out.print("[red]the DICOM association was not accepted (check dicom.allowed_callers)[/]")
            raise typer.Exit(1)
        statuses = [assoc.send_c_store(ds).Status for ds in datasets]
        assoc.release()
        for f in files:
            f.unlink()
        out.print(f"sent {len(files)} DICOM waveform instances (C-STORE statuses {statuses})")

        final = {str(s) for s in FINAL_STATES}
        finished = True
        deadline = time.monotonic() + timeout
        studies = []
        while time.monotonic() < deadline:
            studies = [s for s in daemon.repo.list(limit=10) if s.id > before]
            spool = str(cfg.paths.spool)
            if len(studies) >= 2 and all(s.state in final and not (s.input_path or "").startswith(spool)
                                         for s in studies):
                break
            time.sleep(0.5)
        else:
            out.print(f"[red]not finished within {timeout:.0f} s[/]")
            finished = False
        for s in sorted(studies, key=lambda s: s.id):
            out.print(f"[bold]{s.key}[/] from {s.source}: [bold]{s.state}[/]"
                      + (f" ({s.last_error})" if s.last_error else ""))
            flags = [f["label"] for f in (s.flags or {}).get("flags", [])]
            out.print(f"    flags:   {', '.join(flags) or 'none'}")
            for o in (s.flags or {}).get("outcomes", []):
                where = "no percentile" if o["percentile"] is None else f"percentile {o['percentile']:.0f}"
                out.print(f"      {o['label']}: {where}, reference of {o['reference_size']} ({o['status']})",
                          markup=False)
            out.print(f"    outputs: {s.output_path or '-'}", soft_wrap=True)
            out.print(f"    input:   {s.input_path or '-'}", soft_wrap=True)
            for m in daemon.repo.messages(study_id=s.id, limit=1):
                where = inbox / f"{m.control_id}.hl7" if listener else cfg.hl7.destination
                out.print(f"    ORU^R01: {m.state} (ACK {m.ack_code or '-'}) -> {where}", soft_wrap=True)
        out.print("inspect one with: psg-gateway studies show <study> "
                  + (f"--config {config}" if config else ""))
    finally:
        daemon.stop()
        if listener is not None:
            listener.stop()
    if not finished:
        raise typer.Exit(1)


def _seed_reference(cfg: GatewayConfig, nights: int, hours: float) -> None:
    """Generate ``nights`` nights into var/demo-reference and seed the reference from them (a rerun of the
    demo finds them there, already processed, and skips them)."""
    from ..batch.runner import BatchError
    from ..batch.seed import seed_reference
    from ..synthetic.night import write_synthetic_night

    archive = Path(cfg.paths.var_dir) / "demo-reference"
    archive.mkdir(parents=True, exist_ok=True)
    for i in range(nights):
        path = archive / f"reference_{i:03d}.edf"
        if not path.exists():
            write_synthetic_night(archive / f".{path.name}", hours=hours, seed=1000 + i).replace(path)
    out.print(f"seeding the site reference from {nights} generated nights of {hours:g} h "
              "(psg-gateway reference seed) ...")
    try:
        seeded = seed_reference(cfg, [archive], workers=0)
    except BatchError as exc:
        out.print(f"[red]could not seed the reference: {exc}[/]")
        raise typer.Exit(1) from None
    size = min(seeded.sizes.values(), default=0)
    out.print(f"site reference: {size} studies per watched outcome; percentile flags "
              + ("active" if seeded.active else f"inactive ({seeded.needed} needed)"))
