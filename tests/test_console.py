"""The web console under /ui/ at the WSGI level: sign-in and sessions, CSRF, role checks, the operator's
actions (each audited), the review worklist's order and groups, montage mapping through the audited edit
path, scoring agreement; and the console served by the real ops endpoint beside /healthz and /metrics."""

from __future__ import annotations

import html
import json
import os
import re
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from console_env import (
    HTML,
    PASSWORD,
    console_cfg,
    csrf_of,
    dead_letter_of,
    decision,
    hand_study,
    login,
    outcome,
    ui_client,
)

from gateway.access import AccessAudit, UserStore
from gateway.console import ConsoleContext, create_console
from gateway.store.models import MessageState, State


@pytest.fixture
def console(repo, tmp_path, db_url):
    cfg = console_cfg(tmp_path, db_url)
    users = UserStore(repo)
    for name, role in (("ada", "admin"), ("otto", "operator"), ("vera", "viewer")):
        users.add(name, role, PASSWORD)
    app = create_console(ConsoleContext(cfg, repo))
    return app, cfg


def _actions(repo, since=None):
    rows = AccessAudit(repo).rows(since or datetime.now(UTC) - timedelta(hours=1))
    return [(r.user_name, r.action, r.study_key, r.target) for r in rows]


def test_without_a_session_pages_redirect_to_the_login_or_answer_401(console):
    app, _ = console
    client = ui_client(app)
    for path in ("/ui/", "/ui/studies", "/ui/studies/st-0000", "/ui/outbox", "/ui/montage", "/ui/agreement"):
        r = client.get(path, headers=HTML)
        assert r.status_code == 302 and "/ui/login" in r.headers["Location"], path
        r = client.get(path, headers={"Accept": "application/json"})
        assert r.status_code == 401 and r.json["error"] == "unauthorized", path
    page = client.get("/ui/login", headers=HTML)
    assert page.status_code == 200 and 'type="password"' in page.text
    # the cookie: signed, HttpOnly, SameSite=Lax, scoped to /ui
    cookie = page.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/ui" in cookie
    assert "Content-Security-Policy" in page.headers and "script-src 'none'" in page.headers["Content-Security-Policy"]


def test_login_success_and_failure_are_audited_and_the_secret_key_is_private(console, repo):
    app, cfg = console
    client = ui_client(app)
    csrf = csrf_of(client.get("/ui/login", headers=HTML).text)
    r = client.post("/ui/login", data={"username": "vera", "password": "wrong password!", "csrf": csrf}, headers=HTML)
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    csrf = csrf_of(r.text)
    r = client.post("/ui/login", data={"username": "vera", "password": PASSWORD, "csrf": csrf,
                                       "next": "/studies"}, headers=HTML)
    assert r.status_code == 302 and r.headers["Location"].endswith("/ui/studies")
    assert client.get("/ui/", headers=HTML).status_code == 200
    actions = _actions(repo)
    assert ("vera", "login_failed", None, None) in actions and ("vera", "login", None, None) in actions
    key = cfg.paths.var_dir / "console-secret.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    # sign out ends the session
    page = client.get("/ui/", headers=HTML)
    assert client.post("/ui/logout", data={"csrf": csrf_of(page.text)}, headers=HTML).status_code == 302
    assert client.get("/ui/", headers=HTML).status_code == 302
    assert ("vera", "logout", None, None) in _actions(repo)


def test_a_csrf_less_post_is_refused_and_a_viewer_may_not_act(console, repo, tmp_path):
    app, _ = console
    failed = hand_study(repo, tmp_path, fail="decode: not an EDF file")
    viewer = ui_client(app)
    csrf = login(viewer, "vera")
    assert viewer.get(f"/ui/studies/{failed.key}", headers=HTML).status_code == 200
    r = viewer.post(f"/ui/studies/{failed.key}/retry", data={"csrf": csrf}, headers=HTML)
    assert r.status_code == 403
    assert repo.get(failed.id).state == State.FAILED
    operator = ui_client(app)
    login(operator, "otto")
    r = operator.post(f"/ui/studies/{failed.key}/retry", data={}, headers=HTML)  # no token
    assert r.status_code == 400 and "security token" in r.text
    r = operator.post(f"/ui/studies/{failed.key}/retry", data={"csrf": "forged"}, headers=HTML)
    assert r.status_code == 400
    assert repo.get(failed.id).state == State.FAILED
    # a viewer's page never offers the actions
    page = viewer.get(f"/ui/studies/{failed.key}", headers=HTML).text
    assert ">Retry<" not in page and "Mark reviewed" not in page


def test_operator_actions_work_and_leave_audit_rows(console, repo, tmp_path):
    app, _ = console
    failed = hand_study(repo, tmp_path, fail="decode: not an EDF file")
    done = hand_study(repo, tmp_path, decision([outcome("death", 97.0, "flagged")]))
    letter = dead_letter_of(repo, hand_study(repo, tmp_path, decision([outcome("death", 99.0, "flagged")]), dead=True))
    client = ui_client(app)
    csrf = login(client, "otto")

    r = client.post(f"/ui/studies/{failed.key}/retry", data={"csrf": csrf}, headers=HTML)
    assert r.status_code == 302
    assert repo.get(failed.id).state == State.READY
    r = client.post(f"/ui/studies/{done.key}/reprocess", data={"csrf": csrf}, headers=HTML)
    assert r.status_code == 302
    assert (repo.get(done.id).state, repo.get(done.id).version) == (State.READY, 2)
    r = client.post(f"/ui/studies/{done.key}/review", data={"csrf": csrf, "note": "looked at the hypnogram"},
                    headers=HTML)
    assert r.status_code == 302
    page = client.get(f"/ui/studies/{done.key}", headers=HTML).text
    assert "marked reviewed" in page and "looked at the hypnogram" in page and "otto" in page

    outbox = client.get("/ui/outbox?state=DEAD", headers=HTML).text
    assert "AE: unknown patient" in outbox and letter.control_id in outbox
    r = client.post(f"/ui/outbox/{letter.id}/retry", data={"csrf": csrf}, headers=HTML)
    assert r.status_code == 302
    assert repo.message(letter.id).state == MessageState.PENDING
    # an action that does not apply says why, and changes nothing
    r = client.post(f"/ui/outbox/{letter.id}/resend", data={"csrf": csrf}, headers=HTML)
    assert r.status_code == 302
    assert "takes SENT messages" in client.get(r.headers["Location"], headers=HTML).text

    actions = _actions(repo)
    assert ("otto", "study.retry", failed.key, f"/ui/studies/{failed.key}/retry") in actions
    assert ("otto", "study.reprocess", done.key, f"/ui/studies/{done.key}/reprocess") in actions
    assert ("otto", "study.reviewed", done.key, f"/ui/studies/{done.key}/review") in actions
    assert any(a[1] == "message.retry" and a[3] == str(letter.id) for a in actions)
    assert ("otto", "view", done.key, f"/ui/studies/{done.key}") in actions
    assert ("otto", "view", None, "/ui/outbox") in actions
    # the events name the console user as the actor
    assert any(e.event == "study.retry" and e.actor == "console:otto" for e in repo.events(failed.id))
    # no PHI in the audit: no patient name or id anywhere in its rows
    text = json.dumps([r.as_dict() for r in AccessAudit(repo).rows(datetime.now(UTC) - timedelta(hours=1))])
    assert "DOE" not in text and "MRN" not in text


def test_the_worklist_orders_by_highest_percentile_with_borderline_and_withheld_apart(console, repo, tmp_path):
    app, _ = console
    low = hand_study(repo, tmp_path, decision([outcome("death", 40.0), outcome("Stroke", 55.0)]))
    high = hand_study(repo, tmp_path, decision([outcome("death", 99.2, "flagged"), outcome("Stroke", 10.0)]))
    mid = hand_study(repo, tmp_path, decision([outcome("death", 80.0), outcome("Stroke", 97.5, "flagged")]))
    border = hand_study(repo, tmp_path, decision([outcome("death", 93.0, "borderline")]))
    withheld = hand_study(repo, tmp_path, decision([outcome("death", 99.9, "withheld")],
                                                   withheld="signals not interpretable: BAS flat"))
    failed = hand_study(repo, tmp_path, fail="decode: not an EDF file")
    client = ui_client(app)
    login(client, "vera")
    page = client.get("/ui/studies?view=worklist", headers=HTML).text

    def keys(group: str) -> list[str]:
        section = page.split(f'id="group-{group}"', 1)[1].split("</section>", 1)[0]
        return re.findall(r">(st-[0-9a-z-]+)<", section)

    assert keys("main") == [high.key, mid.key, low.key]
    assert keys("borderline") == [border.key]
    assert keys("withheld") == [withheld.key]
    assert failed.key not in page
    assert "BAS flat" in page
    # the list: searchable and filterable
    listed = client.get(f"/ui/studies?q={high.key}", headers=HTML).text
    assert high.key in listed and low.key not in listed
    listed = client.get("/ui/studies?state=FAILED", headers=HTML).text
    assert failed.key in listed and high.key not in listed
    listed = client.get("/ui/studies?flags=borderline", headers=HTML).text
    assert border.key in listed and high.key not in listed
    listed = client.get("/ui/studies?quality=not_interpretable", headers=HTML).text
    assert withheld.key in listed and high.key not in listed
    assert ("vera", "view", None, "/ui/studies") in _actions(repo)


def test_the_study_page_shows_timeline_channel_map_preview_and_report(console, repo, tmp_path):
    app, _ = console
    s = hand_study(repo, tmp_path, decision([outcome("death", 97.0, "flagged")]), unmapped=["XFOO"])
    client = ui_client(app)
    login(client, "vera")
    page = html.unescape(client.get(f"/ui/studies/{s.key}", headers=HTML).text)
    assert "study.flagged" in page and "study.mapped" in page  # the timeline
    assert 'normalised "C3-M2"' in page and "XFOO" in page  # the channel map with the deciding rule
    assert 'id="oru-preview"' in page and "MSH|" in page and "PREVIEW" in page
    assert "MRN" in page  # the page shows PHI to a signed-in user ...
    report = client.get(f"/ui/studies/{s.key}/report", headers=HTML)
    assert report.status_code == 200 and "Hypnogram" in report.text
    assert "default-src 'none'" in report.headers["Content-Security-Policy"]
    assert client.get("/ui/studies/st-nothing", headers=HTML).status_code == 404


def test_mapping_an_unmapped_label_goes_through_the_audited_edit(repo, tmp_path, db_url):
    table = tmp_path / "site.yaml"
    table.write_text("name: site\nformat: 2\nextends: default\nrules: []\n")
    cfg = console_cfg(tmp_path, db_url, montage={"table": table})
    users = UserStore(repo)
    users.add("ada", "operator", PASSWORD)
    users.add("vera", "viewer", PASSWORD)
    app = create_console(ConsoleContext(cfg, repo))
    hand_study(repo, tmp_path, unmapped=["XFOO"])
    hand_study(repo, tmp_path, fail="montage: no channel maps to a modality (labels: XFOO, ZBAR); add them")
    client = ui_client(app)
    csrf = login(client, "ada")
    page = client.get("/ui/montage", headers=HTML).text
    assert "XFOO" in page and "ZBAR" in page
    preview = html.unescape(client.get("/ui/montage?label=XFOO&modality=RESP", headers=HTML).text)
    assert '{normalised: "XFOO", modality: RESP, note: "mapped in the web console by ada"}' in preview
    assert "unmapped" in preview and table.read_text().count("XFOO") == 0  # a preview writes nothing
    viewer = ui_client(app)
    vcsrf = login(viewer, "vera")
    r = viewer.post("/ui/montage/map", data={"csrf": vcsrf, "label": "XFOO", "modality": "RESP",
                                               "kind": "normalised"}, headers=HTML)
    assert r.status_code == 403 and "XFOO" not in table.read_text()
    r = client.post("/ui/montage/map", data={"csrf": csrf, "label": "XFOO", "modality": "RESP",
                                             "kind": "normalised"}, headers=HTML)
    assert r.status_code == 302
    assert 'normalised: "XFOO", modality: RESP' in table.read_text()
    [entry] = [json.loads(x) for x in (tmp_path / "site.yaml.audit.log").read_text().splitlines()]
    assert entry["user"] == "ada (web console)" and entry["rules"][0]["pattern"] == "XFOO"
    page = client.get("/ui/montage", headers=HTML).text
    assert "ada (web console)" in page
    assert ("ada", "montage.map", None, "XFOO") in _actions(repo)


# The hand-checked table of tests/test_agreement_trend.py, in time order (studies are received one after the
# other): Anna keeps agreeing; Bert drifts (0.8, 0.6, 0.5, 0.4); Cleo is steady below Anna; Emil is low but has
# 2 studies only; one study has no known scorer. Lab mean: 8.8 / 14 = 0.629. With a window of 3 Bert's rolling
# kappa is 0.50, 0.13 below the lab's: more than a drop of 0.1.
AGREEMENT_TABLE = [("Anna", 0.8), ("Bert", 0.8), ("Cleo", 0.7), ("Anna", 0.8), (None, 0.6), ("Bert", 0.6),
                   ("Cleo", 0.7), ("Anna", 0.8), ("bert ", 0.5), ("Cleo", 0.7), ("Anna", 0.8), ("Bert", 0.4),
                   ("Emil", 0.3), ("Emil", 0.3)]


def _scorer_card(page: str, title: str) -> str:
    [card] = [c for c in page.split('<section class="card scorer')[1:] if c.split("</h2>", 1)[0].count(title)]
    return card.split("</section>", 1)[0]


def test_agreement_per_scorer_with_a_drift_alert(repo, tmp_path, db_url):
    from gateway.pipeline.agreement_trend import agreement_by_scorer, agreement_rows

    def page_with(**console_cfg_keys) -> str:
        cfg = console_cfg(tmp_path, db_url, console=console_cfg_keys)
        client = ui_client(create_console(ConsoleContext(cfg, repo)))
        login(client, "vera")
        r = client.get("/ui/agreement", headers=HTML)
        assert r.status_code == 200
        return html.unescape(r.text)

    UserStore(repo).add("vera", "viewer", PASSWORD)
    hand_study(repo, tmp_path, scorer="Anna")  # outputs without a scored hypnogram: not on the page
    empty = page_with(drift_window_studies=3, drift_kappa_drop=0.1)
    assert "No scored study yet" in empty and 'class="card scorer' not in empty

    cm = {"W": {"W": 40, "N2": 10}, "N2": {"W": 5, "N2": 45}}  # 100 epochs; W against the rest: kappa 0.7
    for scorer, kappa in AGREEMENT_TABLE:
        hand_study(repo, tmp_path, scorer=scorer, agreement={
            "epochs": 100, "accuracy": 0.85, "kappa": kappa, "f1": {"W": 0.84, "N2": 0.86}, "confusion": cm})
    page = page_with(drift_window_studies=3, drift_kappa_drop=0.1)

    # the numbers are agreement_trend's, with the console's window and drop
    trend = agreement_by_scorer(agreement_rows(repo), window=3, drop=0.1)
    [alert] = trend.alerts
    assert alert.scorer == "Bert"
    assert alert.message == ("scorer Bert: rolling kappa 0.50 over the last 3 studies is 0.13 below the lab's "
                             "0.63 (alert above 0.10)")  # by hand: (0.6 + 0.5 + 0.4) / 3; 8.8 / 14; 0.1286
    assert "14 studies with outputs carry a scored hypnogram" in page and "κ = 0.63" in page
    bert = _scorer_card(page, "Bert")
    assert bert.startswith(' drift"') and '<span class="pill bad">drift</span>' in bert and alert.message in bert
    assert "4 studies" in bert and "Rolling κ (last 3)" in bert and ">0.50<" in bert
    assert page.index("Bert") < page.index("Anna")  # the alerted scorer comes first
    # no alert for the others: Anna and Cleo agree with the lab; Emil is low (0.30) but has no full window;
    # studies without a scorer are never alerted
    for title, mean in (("Anna", "0.80"), ("Cleo", "0.70"), ("Emil", "0.30"), ("(scorer not recorded)", "0.60")):
        card = _scorer_card(page, title)
        assert not card.startswith(' drift"') and "pill bad" not in card and "drift-alert" not in card, title
        assert f"<tr><th>Mean κ</th><td>{mean}</td></tr>" in card, title
    assert page.count('class="flash error drift-alert"') == 1
    # per stage: the mean F1 and the stage's kappa over the pooled confusion matrices
    anna = _scorer_card(page, "Anna")
    assert "Wake</th><td>F1 0.84 · κ 0.70" in anna and "N2</th><td>F1 0.86 · κ 0.70" in anna
    assert "N1</th><td>F1 — · κ —" in anna
    # the plot: one dot per study with a kappa and the rolling kappa as a line
    assert anna.count('<circle ') == 4 and bert.count('<circle ') == 4 and "<polyline" in bert

    # the console's configuration decides: a window of 4 (Bert's rolling kappa 0.575) or a larger drop: no alert
    for keys in ({"drift_window_studies": 4, "drift_kappa_drop": 0.1},
                 {"drift_window_studies": 3, "drift_kappa_drop": 0.13}):
        quiet = page_with(**keys)
        assert "drift-alert" not in quiet and 'class="card scorer drift"' not in quiet, keys


def test_login_is_throttled_per_remote_address(repo, tmp_path, db_url):
    cfg = console_cfg(tmp_path, db_url, console={"login_attempts_per_minute": 3})
    UserStore(repo).add("vera", "viewer", PASSWORD)
    client = ui_client(create_console(ConsoleContext(cfg, repo)))
    csrf = csrf_of(client.get("/ui/login", headers=HTML).text)
    codes = [client.post("/ui/login", data={"username": "vera", "password": "nope-nope-nope", "csrf": csrf},
                         headers=HTML).status_code for _ in range(4)]
    assert codes == [401, 401, 401, 429]


def test_sso_header_is_believed_only_from_a_trusted_proxy(repo, tmp_path, db_url):
    cfg = console_cfg(tmp_path, db_url, console={"sso_header": "X-Remote-User", "trusted_proxies": ["10.0.0.0/8"]})
    UserStore(repo).add("vera", "viewer", PASSWORD)
    client = ui_client(create_console(ConsoleContext(cfg, repo)))
    r = client.get("/ui/studies", headers={**HTML, "X-Remote-User": "vera"},
                   environ_base={"REMOTE_ADDR": "192.168.1.9"})
    assert r.status_code == 302  # not from the proxy: ignored
    r = client.get("/ui/studies", headers={**HTML, "X-Remote-User": "vera", "X-Forwarded-Proto": "https"},
                   environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert r.status_code == 200 and "Secure" in r.headers["Set-Cookie"]
    r = ui_client(create_console(ConsoleContext(cfg, repo))).get(
        "/ui/studies", headers={**HTML, "X-Remote-User": "mallory"}, environ_base={"REMOTE_ADDR": "10.1.2.3"})
    assert r.status_code == 403
    assert {(a[0], a[1]) for a in _actions(repo)} >= {("vera", "login"), ("mallory", "login_failed")}


def test_the_ops_endpoint_serves_the_console_beside_healthz_and_metrics(console):
    from prometheus_client import CollectorRegistry

    from gateway.http import OpsServer

    app, _ = console
    ops = OpsServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, {"status": "ok"}), console=app)
    ops.start()
    try:
        base = f"http://127.0.0.1:{ops.port}"
        with urllib.request.urlopen(f"{base}/healthz") as r:
            assert json.load(r) == {"status": "ok"}
        with urllib.request.urlopen(f"{base}/metrics") as r:
            assert r.status == 200
        with urllib.request.urlopen(urllib.request.Request(f"{base}/ui/login", headers=HTML)) as r:
            assert r.status == 200 and b"Sign in" in r.read()
        with urllib.request.urlopen(f"{base}/ui/static/console.css") as r:
            assert b"psg-gateway web console" in r.read()
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(urllib.request.Request(f"{base}/ui/studies", headers={"Accept": "application/json"}))
        assert exc.value.code == 401
    finally:
        ops.stop()


def test_console_assets_are_vendored_and_fetch_nothing():
    from pathlib import Path

    import gateway.console as pkg

    root = Path(pkg.__file__).parent
    for f in [*root.glob("templates/*.html"), *root.glob("static/*")]:
        text = f.read_text()
        assert not re.search(r"(src|href)=\"https?://", text), f
        assert "<script" not in text, f
    assert os.path.getsize(root / "static" / "console.css") < 64_000
