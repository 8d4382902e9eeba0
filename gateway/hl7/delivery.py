"""The delivery job: drains the outbox to the MLLP destination, in order, one message in flight.

* AA / CA: delivered (the study becomes DELIVERED).
* AR / CR, a timeout, a refused or reset connection: retried with exponential backoff and jitter, for
  ever by default (``hl7.max_attempts``); the queue holds behind the message, so results arrive in order.
* AE / CE: dead letter with the reason (log event, metric); the study is FAILED with that reason and
  the queue moves on. ``psg-gateway outbox retry ID`` sends it again after the cause is fixed.

It runs in the scheduler's thread, never in a pipeline worker, so a slow or absent EHR never holds up
study processing. Every retry sends the stored ER7 unchanged (same MSH-10).
"""

from __future__ import annotations

import random
import ssl
import threading
from collections.abc import Callable

from ..config import Hl7Config
from ..logging import get_logger
from ..metrics import Metrics
from ..store.models import Message
from ..store.repo import Repo
from .mllp import Ack, MllpClient, MllpDestination, MllpError

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
                 client_factory: Callable[[MllpDestination], MllpClient] = MllpClient):
        self.repo = repo
        self.cfg = cfg
        self.metrics = metrics
        self._client_factory = client_factory
        self._client: MllpClient | None = None
        self._lock = threading.Lock()  # one drain at a time: one message in flight

    def drain(self, stop: threading.Event | None = None, limit: int | None = None) -> int:
        """Send due messages until the queue is empty, holds on a backoff, or ``stop`` is set."""
        sent = 0
        with self._lock:
            while stop is None or not stop.is_set():
                if limit is not None and sent >= limit:
                    break
                msg = self.repo.next_message(self.cfg.destination)
                if msg is None:
                    break
                if not self._deliver(msg):
                    break  # backoff: the queue holds behind this message
                sent += 1
        return sent

    def _deliver(self, msg: Message) -> bool:
        """One attempt; True when the message left the queue (delivered or dead letter)."""
        try:
            ack = self._client_or_new().send(msg.message)
        except (MllpError, ssl.SSLError, OSError) as exc:
            self._drop_client()
            return self._retry(msg, f"{type(exc).__name__}: {exc}")
        except ValueError as exc:  # the stored message cannot be framed (no MSH-10, a block character)
            self._drop_client()
            self._dead(msg, f"message cannot be sent: {exc}", None)
            return True
        if ack.accepted:
            self.repo.message_sent(msg, ack.code, ack.text, actor="delivery")
            log.info("message.delivered", message_id=msg.id, study_id=msg.study_id, control_id=msg.control_id,
                     ack=ack.code, correction=msg.correction)
            return True
        if ack.rejected_permanently:
            self._dead(msg, f"{ack.code}: {ack.text or 'rejected by the destination'}", ack)
            return True
        return self._retry(msg, f"{ack.code}: {ack.text or 'destination asked to retry'}")

    def _retry(self, msg: Message, error: str) -> bool:
        attempts = msg.attempts + 1
        if self.cfg.max_attempts and attempts >= self.cfg.max_attempts:
            self._dead(msg, f"gave up after {attempts} attempts: {error}", None)
            return True
        delay = min(self.cfg.retry_backoff_max_seconds, self.cfg.retry_backoff_seconds * 2 ** (attempts - 1))
        delay *= random.uniform(0.8, 1.2)
        self.repo.message_retry_later(msg, error, delay)
        log.warning("message.retry_scheduled", message_id=msg.id, study_id=msg.study_id,
                    control_id=msg.control_id, attempt=attempts, delay_s=round(delay, 1), error=error[:200])
        return False

    def _dead(self, msg: Message, reason: str, ack: Ack | None) -> None:
        self.repo.message_dead(msg, reason, ack.code if ack else None, actor="delivery")
        log.error("message.dead_letter", message_id=msg.id, study_id=msg.study_id, control_id=msg.control_id,
                  reason=reason[:300])

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
