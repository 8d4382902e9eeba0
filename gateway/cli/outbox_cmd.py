"""``psg-gateway outbox list|show|retry|resend|release`` and ``psg-gateway hl7 test-destination|preview``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .service_cmd import ConfigOption, load_or_exit
from .store_access import StoreConfigOption, open_store
from .studies_cmd import JsonOption, _find, _repo

if TYPE_CHECKING:  # the store (sqlalchemy) loads when a command opens it, not with the CLI
    from ..store.models import Message

outbox_app = typer.Typer(help="The HL7 outbox: messages waiting, sent, and dead letters.", no_args_is_help=True)
hl7_app = typer.Typer(help="HL7: test the destination, preview a study's ORU^R01.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def _row(m: Message) -> dict[str, Any]:
    return {"id": m.id, "study_id": m.study_id, "version": m.study_version, "destination": m.destination,
            "control_id": m.control_id, "state": m.state, "correction": m.correction, "attempts": m.attempts,
            "next_attempt_at": m.next_attempt_at.isoformat() if m.next_attempt_at else None,
            "ack": m.ack_code, "last_error": m.last_error,
            "created_at": m.created_at.isoformat(), "sent_at": m.sent_at.isoformat() if m.sent_at else None}


@outbox_app.command("list")
def outbox_list(config: StoreConfigOption = None,
                state: Annotated[str | None, typer.Option(help="PENDING, SENT, DEAD, SHADOW, HELD, SUPERSEDED")] = None,
                study: Annotated[int | None, typer.Option(help="Only this study id")] = None,
                limit: Annotated[int, typer.Option(help="Newest N messages")] = 50,
                as_json: JsonOption = False) -> None:
    """Newest messages first."""
    rows = [_row(m) for m in _repo(config).messages(state=state, study_id=study, limit=limit)]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("id", "study", "state", "MSH-10", "attempts", "ack", "last error")
    for r in rows:
        table.add_row(str(r["id"]), str(r["study_id"]), r["state"], r["control_id"], str(r["attempts"]),
                      r["ack"] or "", (r["last_error"] or "")[:60])
    out.print(table)


@outbox_app.command("show")
def outbox_show(message_id: int, config: StoreConfigOption = None, as_json: JsonOption = False) -> None:
    """One message with its ER7 text (it holds PHI: the terminal is the admin's, never a log)."""
    repo = _repo(config)
    m = repo.message(message_id)
    if m is None:
        err.print(f"no message {message_id}")
        raise typer.Exit(1)
    # Every time the bytes may have reached the EHR: the copies it holds are at least the answered
    # attempts (ACKED, NAKED) and at most all of them (docs/integration-guide.md, "Delivery guarantee").
    attempts = [{"attempt": a.attempt, "outcome": a.outcome, "ack": a.ack_code, "holder": a.holder,
                 "started_at": a.started_at.isoformat() if a.started_at else None,
                 "finished_at": a.finished_at.isoformat() if a.finished_at else None, "error": a.error}
                for a in repo.attempts(m.id)]
    doc = _row(m) | {"ack_text": m.ack_text, "attempts_recorded": attempts, "message": m.message}
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    for key, value in _row(m).items():
        out.print(f"{key}: {value}", highlight=False)
    for a in attempts:
        out.print(f"attempt {a['attempt']}: {a['outcome']}{' ' + a['ack'] if a['ack'] else ''} "
                  f"at {(a['started_at'] or '')[:19]} by {a['holder']}"
                  + (f" ({a['error'][:80]})" if a["error"] else ""), highlight=False)
    print(m.message.replace("\r", "\n"))


def _requeue(message_id: int, config: Path | None, resend: bool) -> None:
    from ..operator_actions import ActionError, requeue_message

    try:
        m = requeue_message(_repo(config), message_id, actor="cli", resend=resend)
    except ActionError as exc:
        err.print(str(exc))
        raise typer.Exit(1) from None
    out.print(f"message {m.id} ({m.control_id}): {m.state}; the daemon's delivery job sends it")


@outbox_app.command("retry")
def outbox_retry(message_id: int, config: StoreConfigOption = None) -> None:
    """Send a dead letter again (after the destination's problem is fixed); same MSH-10."""
    _requeue(message_id, config, resend=False)


@outbox_app.command("resend")
def outbox_resend(message_id: int, config: StoreConfigOption = None) -> None:
    """Send an already delivered message once more (the EHR lost it); same ER7, same MSH-10."""
    _requeue(message_id, config, resend=True)


@outbox_app.command("release")
def outbox_release(
    message_ids: Annotated[list[int] | None, typer.Argument(help="HELD messages to release")] = None,
    all_held: Annotated[bool, typer.Option("--all", help="Release every HELD message")] = False,
    config: StoreConfigOption = None,
) -> None:
    """Send messages an archive batch held (run without --send): HELD -> PENDING, their studies QUEUED.

    The daemon's delivery job then sends them in order, as it sends its own.
    """
    from ..operator_actions import release_messages

    if not message_ids and not all_held:
        err.print("[bold red]error:[/] name the messages to release, or --all")
        raise typer.Exit(2)
    released, missing = release_messages(_repo(config), None if all_held else message_ids, actor="cli")
    out.print(f"released {len(released)} message(s)")
    if missing:
        err.print(f"not HELD (or unknown): {', '.join(map(str, missing))}")
        raise typer.Exit(1)


@hl7_app.command("test-destination")
def hl7_test_destination(config: ConfigOption = None) -> None:
    """Send a test ORU^R01 (MSH-11 T, a fictitious patient) to the destination and print the ACK."""
    from ..hl7.compose import new_control_id, oru_settings
    from ..hl7.delivery import destination_of
    from ..hl7.mllp import MllpClient, MllpError
    from ..hl7.oru import OruPatient, OruStudy, build_oru

    cfg = load_or_exit(config)
    study = OruStudy(study_key="st-test", study_id=0, accession=None, study_uid=None, observed_at=None,
                     patient=OruPatient(patient_id="TEST0000", issuer=None, family_name="TEST",
                                        given_name="PSGGATEWAY", birth_date=None, sex=None),
                     model_name="connectivity-test", model_version="0", model_hash=None, validated=False,
                     head="none")
    er7 = build_oru(study, [], [], oru_settings(cfg.hl7), control_id=new_control_id(), now=datetime.now(UTC),
                    notes=["psg-gateway connectivity test: not a result"])
    dest = destination_of(cfg.hl7)
    try:
        with MllpClient(dest) as client:
            ack = client.send(er7)
    except MllpError as exc:
        err.print(f"{cfg.hl7.destination}: {type(exc).__name__}: {exc}")
        raise typer.Exit(1) from None
    out.print(f"{cfg.hl7.destination}: ACK {ack.code}" + (f" ({ack.text})" if ack.text else ""))
    print(ack.raw.replace("\r", "\n"))
    raise typer.Exit(0 if ack.accepted else 1)


@hl7_app.command("preview")
def hl7_preview(ref: Annotated[str, typer.Argument(help="Study id or key")],
                config: StoreConfigOption = None) -> None:
    """The ER7 text the study would send now (flags re-evaluated; nothing stored or sent)."""
    from ..operator_actions import ActionError, preview_message

    cfg, repo = open_store(config)
    study = _find(repo, ref)
    try:
        er7, note = preview_message(cfg, repo, study)
    except ActionError as exc:
        err.print(str(exc))
        raise typer.Exit(1) from None
    if note:
        err.print(note)
    print(er7.replace("\r", "\n"))


@hl7_app.command("listen")
def hl7_listen(
    folder: Annotated[Path, typer.Argument(help="Folder the received messages are written to")],
    port: Annotated[int, typer.Option(help="Port to listen on")] = 2575,
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
) -> None:
    """A stand-in EHR: receive MLLP messages, write each to FOLDER/<MSH-10>.hl7, answer AA (Ctrl-C stops)."""
    import signal
    import threading

    from ..hl7.listener import FileMllpListener

    listener = FileMllpListener(host, port, folder).start()
    out.print(f"listening for MLLP on {host}:{listener.port}, writing messages to {folder}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    listener.stop()
    out.print(f"{listener.received} message(s) received")
