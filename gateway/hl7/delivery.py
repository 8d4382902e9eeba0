"""The delivery job: drains the outbox to the MLLP destination, in order, one message in flight.

* AA / CA: delivered (the study becomes DELIVERED).
* AR / CR, a timeout, a refused or reset connection: retried with exponential backoff and jitter, for
  ever by default (``hl7.max_attempts``); the queue holds behind the message, so results arrive in order.
* AE / CE: dead letter with the reason (log event, metric); the study is FAILED with that reason and
  the queue moves on. ``psg-gateway outbox retry ID`` sends it again after the cause is fixed.

Delivery is at-least-once with the same MSH-10, as every MLLP sender's is (a crash between the EHR
receiving the message and us committing its ACK cannot be told from a message that never arrived):

* Once the connection is open and before the first byte is written, the attempt is committed
  (``delivery_attempts``: IN_FLIGHT, its number, holder and time). Every ORU the EHR receives is
  therefore an attempt in our records.
* The deliverer that next holds the destination finds an attempt still IN_FLIGHT (a crash, a kill, a
  node that died), marks it INTERRUPTED, records ``message.possible_duplicate`` on the study, counts it
  in ``psg_hl7_possible_duplicates_total``, and sends the message again with the same MSH-10, which is
  what receivers deduplicate on.
* One deliverer per destination across every daemon sharing the database: a lease row, renewed with
  each attempt and fenced by it (no attempt is recorded, so nothing is sent, without a live lease). A
  holder that dies is replaced once its lease expires (``hl7.delivery_lease_seconds``); a restarted
  daemon takes its own previous process's lease at once; a clean stop hands it over at once.

It runs in the scheduler's thread, never in a pipeline worker, so a slow or absent EHR never holds up
study processing. Every retry sends the stored ER7 unchanged (same MSH-10).
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from structlog.contextvars import bound_contextvars

from ..backoff import backoff_delay
from ..config import Hl7Config
from ..crashpoints import crashpoint
from ..logging import get_logger
from ..metrics import Metrics
from ..store.models import DeliveryAttempt, Message
from ..store.repo import Repo
from .mllp import Ack, MllpClient, MllpDestination, MllpError, control_id_of, frame

__all__ = ["Deliverer", "destination_of"]

log = get_logger("psg.delivery")


def destination_of(cfg: Hl7Config) -> MllpDestination:
    tls = cfg.tls
    return MllpDestination(host=cfg.host, port=cfg.port, timeout_seconds=cfg.timeout_seconds, tls=tls.enabled,
                           ca_file=tls.ca_file, verify=tls.verify, client_cert=tls.client_cert,
                           client_key=tls.client_key, server_hostname=tls.server_hostname,
                           idle_reconnect_seconds=cfg.idle_reconnect_seconds)


class Deliverer:
    def __init__(self, repo: Repo, cfg: Hl7Config, metrics: Metrics | None = None,
                 client_factory: Callable[[MllpDestination], MllpClient] = MllpClient, *,
                 holder: str | None = None, on_finished: Callable[[int], None] | None = None):
        """``holder``: this process as ``node:pid`` (the lease's owner); ``on_finished(study_id)``: called
        after a message was delivered or dead-lettered, to put the study's input where its state says."""
        self.repo = repo
        self.cfg = cfg
        self.metrics = metrics
        self.holder = holder or f"local:{os.getpid()}"
        self._on_finished = on_finished
        self._client_factory = client_factory
        self._client: MllpClient | None = None
        self._lock = threading.Lock()  # one drain at a time: one message in flight
        self._held_at: float | None = None  # monotonic time of the last lease renewal at a drain's start
        # For /healthz: what the last try met (the error's kind only: an ACK text may quote PHI).
        self.last_error_kind: str | None = None
        self.last_error_at: datetime | None = None
        self.last_delivered_at: datetime | None = None

    def drain(self, stop: threading.Event | None = None, limit: int | None = None) -> int:
        """Send due messages until the queue is empty, holds on a backoff, the lease is lost, or ``stop``."""
        sent = 0
        with self._lock:
            try:
                if not self._hold():
                    return 0
                while stop is None or not stop.is_set():
                    if limit is not None and sent >= limit:
                        break
                    msg = self.repo.next_message(self.cfg.destination)
                    if msg is None:
                        break
                    # Every event of this try names the message (bound once, not passed at each call).
                    with bound_contextvars(message_id=msg.id, study_id=msg.study_id, control_id=msg.control_id):
                        delivered = self._deliver(msg)
                    if not delivered:
                        break  # backoff or lease lost: the queue holds behind this message
                    sent += 1
            except BaseException:
                self._held_at = None  # an attempt may be left IN_FLIGHT: the next drain re-takes the lease
                raise
        return sent

    @property
    def connected(self) -> bool:
        """An open connection to the destination (after a successful exchange)."""
        return self._client is not None and self._client.connected

    @property
    def holding(self) -> bool:
        """This process holds the destination's delivery lease (as of its last drain)."""
        return self._held_at is not None

    def release(self) -> None:
        """Hand the destination over (clean stop); a later drain takes it again."""
        with self._lock:
            self._held_at = None
            self.repo.release_delivery(self.cfg.destination, self.holder)

    def _hold(self) -> bool:
        """Take or renew the lease; renewing only when a third of it has passed keeps idle nodes quiet."""
        lease = self.cfg.delivery_lease_seconds
        if self._held_at is not None and time.monotonic() - self._held_at < lease / 3:
            return True
        taken = self.repo.hold_delivery(self.cfg.destination, self.holder, lease)
        if taken is None:
            previous = self.repo.delivery_holder(self.cfg.destination)
            if previous is None or not _dead_process_of_this_node(previous, self.holder):
                self._held_at = None
                return False
            taken = self.repo.hold_delivery(self.cfg.destination, self.holder, lease, take_from=previous)
            if taken is None:
                return False
        if self._held_at is None:
            log.info("delivery.lease_held", destination=self.cfg.destination, holder=self.holder)
        self._held_at = time.monotonic()
        for t in taken:
            if self.metrics is not None:
                self.metrics.hl7_possible_duplicates.inc()
            log.warning("message.possible_duplicate", message_id=t.message_id, study_id=t.study_id,
                        control_id=t.control_id, attempt=t.attempt, previous_holder=t.previous_holder)
        return True

    def _deliver(self, msg: Message) -> bool:
        """One try; True when the message left the queue (delivered or dead letter)."""
        try:
            control_id_of(msg.message)
            frame(msg.message)
        except ValueError as exc:  # the stored message cannot be framed (no MSH-10, a block character)
            self._dead(msg, None, f"message cannot be sent: {exc}", None)
            return True
        client = self._client_or_new()
        try:
            client.connect()
        except (MllpError, ssl.SSLError, OSError) as exc:
            self._drop_client()
            return self._retry(msg, None, f"{type(exc).__name__}: {exc}")
        attempt = self.repo.begin_attempt(msg, self.holder, self.cfg.delivery_lease_seconds)
        if attempt is None:  # the lease went to another node, or the message is no longer pending
            self._held_at = None
            log.warning("delivery.lease_lost", destination=self.cfg.destination)
            return False
        crashpoint("delivery.recorded")
        try:
            ack = client.send(msg.message)
        except (MllpError, ssl.SSLError, OSError) as exc:
            self._drop_client()
            return self._retry(msg, attempt, f"{type(exc).__name__}: {exc}")
        crashpoint("delivery.acked")
        if ack.accepted:
            self.repo.message_sent(msg, attempt, ack.code, ack.text, actor="delivery")
            self._count("acked")
            self.last_error_kind = None
            self.last_delivered_at = datetime.now(UTC)
            if self.metrics is not None:
                self.metrics.study_transitions.labels("DELIVERED").inc()
            log.info("message.delivered", ack=ack.code, correction=msg.correction, attempt=attempt.attempt)
            self._finished(msg)
            return True
        if ack.rejected_permanently:
            self._dead(msg, attempt, f"{ack.code}: {ack.text or 'rejected by the destination'}", ack)
            return True
        return self._retry(msg, attempt, f"{ack.code}: {ack.text or 'destination asked to retry'}", ack)

    def _retry(self, msg: Message, attempt: DeliveryAttempt | None, error: str, ack: Ack | None = None) -> bool:
        tries = msg.attempts + 1  # msg was read before this try (begin_attempt counts it in the database)
        if self.cfg.max_attempts and tries >= self.cfg.max_attempts:
            self._dead(msg, attempt, f"gave up after {tries} attempts: {error}", ack)
            return True
        delay = backoff_delay(tries, self.cfg.retry_backoff_seconds, self.cfg.retry_backoff_max_seconds)
        self.repo.message_retry_later(msg, attempt, error, delay, ack.code if ack else None)
        self._failed_with(ack.code if ack else error.partition(":")[0])
        self._count("not_connected" if attempt is None else ("naked" if ack else "error"))
        log.warning("message.retry_scheduled", attempt=tries, delay_s=round(delay, 1), error=error[:200])
        return False

    def _dead(self, msg: Message, attempt: DeliveryAttempt | None, reason: str, ack: Ack | None) -> None:
        self.repo.message_dead(msg, attempt, reason, ack.code if ack else None, actor="delivery")
        self._count("dead")
        self._failed_with(ack.code if ack else "dead letter")
        if self.metrics is not None:
            self.metrics.study_transitions.labels("FAILED").inc()
        log.error("message.dead_letter", reason=reason[:300])
        self._finished(msg)

    def _failed_with(self, kind: str) -> None:
        self.last_error_kind = kind[:40]
        self.last_error_at = datetime.now(UTC)

    def _finished(self, msg: Message) -> None:
        if self._on_finished is None:
            return
        try:
            self._on_finished(msg.study_id)
        except Exception as exc:  # noqa: BLE001 - the state is committed; the next start reconciles
            log.error("delivery.input_move_failed", error=type(exc).__name__)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.hl7_messages.labels(outcome).inc()

    def _client_or_new(self) -> MllpClient:
        if self._client is None:
            self._client = self._client_factory(destination_of(self.cfg))
        return self._client

    def _drop_client(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def close(self) -> None:
        with self._lock:
            self._drop_client()


def _dead_process_of_this_node(holder: str, me: str) -> bool:
    """``holder`` is ``node:pid`` of this node (same node name as ``me``) and that process is gone:
    this node's previous daemon, killed or crashed, whose lease need not be waited out."""
    node, _, pid = holder.rpartition(":")
    my_node = me.rpartition(":")[0]
    if node != my_node or not pid.isdigit() or holder == me:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False
