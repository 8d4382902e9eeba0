"""The study state machine: the states, and the one table of the transitions between them.

Every change of a study's state is an event (``study.decoded``, ``message.release``...). The table
says, for each event that moves a study, the states it may move it from and the state it moves it to
(pynetdicom's ``TRANSITION_TABLE`` is the model). The repository checks every state change against it
inside the transaction that makes it (:meth:`gateway.store.repo.Repo` records each change through one
method), so a transition that is not in the table is refused with :class:`IllegalTransition` and
nothing is committed.

Events that do not change the state (``study.retry_scheduled``, ``study.input_replaced``,
``study.stable_clock_restarted``, ``message.possible_duplicate``) are not transitions and need no row.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

__all__ = ["FINAL_STATES", "PIPELINE_DONE", "TRANSITIONS", "WORKING_STATES", "IllegalTransition", "State",
           "check_transition"]


class State(StrEnum):
    RECEIVED = "RECEIVED"  # bytes spooled; a DICOM study may still be receiving instances
    READY = "READY"  # complete (stable) and waiting for a worker
    DECODED = "DECODED"
    MAPPED = "MAPPED"
    INFERRED = "INFERRED"  # outputs stored; only the flag step is left
    FLAGGED = "FLAGGED"  # final when nothing is to be sent
    QUEUED = "QUEUED"  # the message is committed; waiting for the delivery job, not for a worker
    DELIVERED = "DELIVERED"
    DUPLICATE = "DUPLICATE"
    FAILED = "FAILED"
    SHADOW = "SHADOW"  # flags.send_mode: shadow: the message is built and kept, never sent
    HELD = "HELD"  # batch --no-send: results stored, the message held until ``outbox release``


# States a worker picks a study up from (after a crash, the last committed one).
WORKING_STATES = (State.READY, State.DECODED, State.MAPPED, State.INFERRED)
FINAL_STATES = (State.FLAGGED, State.DELIVERED, State.SHADOW, State.HELD, State.DUPLICATE, State.FAILED)
PIPELINE_DONE = (*FINAL_STATES, State.QUEUED)  # the worker's part is over: the input leaves the spool

_ANY_BUT_RECEIVING = frozenset(State) - {State.RECEIVED}
_REPROCESSABLE = frozenset(FINAL_STATES) - {State.DUPLICATE}

# event -> (the states it may move a study from; None: a new study, the state it moves it to)
TRANSITIONS: dict[str, tuple[frozenset[State | None], State]] = {
    # arrival (the sources, through the repository's registration)
    "study.received": (frozenset({None}), State.RECEIVED),
    "study.duplicate": (frozenset({State.RECEIVED}), State.DUPLICATE),  # same content as an original
    "study.ready": (frozenset({State.RECEIVED}), State.READY),  # a file at once; a DICOM study when stable
    # a DICOM instance for a study that is no longer receiving: a new version collects instances again
    "study.reopened": (_ANY_BUT_RECEIVING, State.RECEIVED),
    # the worker's steps (pipeline.runner), each committed before the next starts
    "study.decoded": (frozenset({State.READY}), State.DECODED),
    "study.mapped": (frozenset({State.DECODED}), State.MAPPED),
    "study.inferred": (frozenset({State.MAPPED}), State.INFERRED),
    "study.flagged": (frozenset({State.INFERRED}), State.FLAGGED),
    "study.queued": (frozenset({State.INFERRED}), State.QUEUED),
    "study.shadow": (frozenset({State.INFERRED}), State.SHADOW),
    "study.held": (frozenset({State.INFERRED}), State.HELD),
    "study.failed": (frozenset(WORKING_STATES), State.FAILED),
    # delivery (hl7.delivery, through the repository's message methods)
    "study.delivered": (frozenset({State.QUEUED, State.FAILED}), State.DELIVERED),  # FAILED: a retried dead letter
    "message.dead_letter": (frozenset({State.QUEUED}), State.FAILED),
    "message.retry": (frozenset({State.FAILED}), State.QUEUED),  # outbox retry of a dead letter
    "message.resend": (frozenset({State.DELIVERED}), State.QUEUED),  # outbox resend of a sent message
    "message.release": (frozenset({State.HELD}), State.QUEUED),  # outbox release after batch --no-send
    # the operator (psg-gateway studies ...)
    "study.retry": (frozenset({State.FAILED}), State.READY),
    "study.reprocess": (_REPROCESSABLE, State.READY),
}


class IllegalTransition(ValueError):
    """A state change that the transition table does not allow (a bug, never a study's fault)."""


def _state(value: str | None) -> State | None:
    return None if value is None else State(value)


def check_transition(event: str, from_state: str | None, to_state: str | None) -> None:
    """Raise :class:`IllegalTransition` unless ``event`` may move a study from ``from_state`` to ``to_state``.

    An event that leaves the state as it is (or names no target state) is not a transition and passes.
    """
    if to_state is None or (from_state is not None and State(from_state) == State(to_state)):
        return
    allowed = TRANSITIONS.get(event)
    src, dst = _state(from_state), State(to_state)
    if allowed is None or src not in allowed[0] or dst != allowed[1]:
        raise IllegalTransition(f"{event}: {src or 'new'} -> {dst} is not in the study state table")


def targets(from_state: State | None) -> set[State]:
    """The states a study in ``from_state`` may move to (for documentation and tests)."""
    return {dst for src, dst in TRANSITIONS.values() if from_state in src}


def events_into(states: Iterable[State]) -> list[str]:
    """The events that move a study into one of ``states``."""
    wanted = set(states)
    return [event for event, (_src, dst) in TRANSITIONS.items() if dst in wanted]
