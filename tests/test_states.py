"""The study state table: every state change the code makes is in it, and the repository refuses any
other on SQLite and PostgreSQL without committing anything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from gateway.pipeline.states import (
    FINAL_STATES,
    TRANSITIONS,
    WORKING_STATES,
    IllegalTransition,
    State,
    check_transition,
    targets,
)
from gateway.store.repo import Repo

GATEWAY = Path(__file__).resolve().parents[1] / "gateway"


def _ready(repo: Repo):
    return repo.register_file(source="folder:/in", path="/spool/incoming/c1/night.edf", name="night.edf",
                              sha256="a" * 64, filename_pattern=None, actor="folder:/in").study


def test_the_worker_path_and_the_delivery_path_are_in_the_table() -> None:
    path = [(None, "study.received", State.RECEIVED), (State.RECEIVED, "study.ready", State.READY),
            (State.READY, "study.decoded", State.DECODED), (State.DECODED, "study.mapped", State.MAPPED),
            (State.MAPPED, "study.inferred", State.INFERRED), (State.INFERRED, "study.queued", State.QUEUED),
            (State.QUEUED, "study.delivered", State.DELIVERED), (State.DELIVERED, "message.resend", State.QUEUED),
            (State.QUEUED, "message.dead_letter", State.FAILED), (State.FAILED, "study.retry", State.READY)]
    for src, event, dst in path:
        check_transition(event, src, dst)


@pytest.mark.parametrize(("event", "src", "dst"), [
    ("study.inferred", State.READY, State.INFERRED),  # a step skipped
    ("study.decoded", State.FLAGGED, State.DECODED),  # a finished study picked up again without reprocess
    ("study.reprocess", State.DUPLICATE, State.READY),  # a duplicate is never reprocessed
    ("study.failed", State.DELIVERED, State.FAILED),  # a delivered result cannot fail afterwards
    ("study.mapped", State.DECODED, State.INFERRED),  # the event's target is not the one asked for
    ("x", State.READY, State.DECODED),  # an event the table does not know
])
def test_a_change_outside_the_table_is_refused(event: str, src: State, dst: State) -> None:
    with pytest.raises(IllegalTransition, match="not in the study state table"):
        check_transition(event, src, dst)


def test_events_that_keep_the_state_are_not_transitions() -> None:
    check_transition("study.retry_scheduled", State.DECODED, State.DECODED)
    check_transition("study.stable_clock_restarted", None, None)


def test_every_state_is_reachable_and_only_final_states_are_dead_ends() -> None:
    reached, frontier = {State.RECEIVED}, [State.RECEIVED]
    while frontier:
        for nxt in targets(frontier.pop()) - reached:
            reached.add(nxt)
            frontier.append(nxt)
    assert reached == set(State)
    for state in set(State) - set(FINAL_STATES):
        assert targets(state), f"{state} has no way out"
    for state in WORKING_STATES:
        assert State.FAILED in targets(state)


def test_every_event_name_the_code_moves_a_study_with_is_in_the_table() -> None:
    """The event names passed to the repository's state-changing calls, read from the source: a new
    transition written without a row in the table fails here, not on a site's night."""
    calls = {"transition": 3, "_to": 3, "queue_message": 3, "_move_study_of": 4, "_reopen": 2}
    used: set[str] = set()
    for path in GATEWAY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            index = calls.get(node.func.attr)
            if index is None or len(node.args) <= index:
                continue
            arg = node.args[index]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                used.add(arg.value)
            elif isinstance(arg, ast.IfExp):
                used.update(a.value for a in (arg.body, arg.orelse) if isinstance(a, ast.Constant))
    assert {"study.decoded", "study.failed", "study.delivered", "message.dead_letter", "study.retry"} <= used
    assert used - set(TRANSITIONS) == set()


def test_the_repository_refuses_an_illegal_transition_and_commits_nothing(repo: Repo) -> None:
    study = _ready(repo)
    before = [e.event for e in repo.events(study.id)]
    with pytest.raises(IllegalTransition):
        repo.transition(study, State.INFERRED, "w", "study.inferred", output_path="/elsewhere")
    after = repo.get(study.id)
    assert after.state == State.READY and after.output_path is None and after.version == study.version
    assert [e.event for e in repo.events(study.id)] == before


def test_the_repository_refuses_reprocessing_a_study_in_progress(repo: Repo) -> None:
    study = repo.transition(_ready(repo), State.DECODED, "w", "study.decoded")
    with pytest.raises(ValueError, match="only finished"):
        repo.reprocess(study.id, "cli")
    assert repo.get(study.id).state == State.DECODED
