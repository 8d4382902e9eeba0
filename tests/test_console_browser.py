"""The web console in a real browser: Debian's chromium driven by Playwright (the system executable, never a
downloaded browser), against the real ops endpoint over studies the real pipeline processed.

Signs in, browses the studies and the worklist, opens a study with its hypnogram, maps a label a recording
carried unmapped, retries a dead letter, and checks the access-audit rows. Screenshots go to
``$PSG_TEST_ARTIFACTS`` (default: the test's tmp folder). Skips without chromium or Playwright unless
``PSG_REQUIRE_CHROMIUM=1``.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pipeline_env import pipeline_env, spool_file

from gateway.access import AccessAudit, UserStore
from gateway.config import FlagOutcome, FlagsConfig, Hl7Config
from gateway.console import ConsoleContext, create_console
from gateway.montage.holder import MontageHolder
from gateway.store.models import MessageState, State
from gateway.synthetic.night import DEFAULT_BENCH_CHANNELS, write_synthetic_night

from console_env import PASSWORD, console_cfg  # isort: skip
from peers import required, system_tool  # isort: skip

def _playwright():
    """(sync_playwright, the chromium executable); skip without them, fail under PSG_REQUIRE_CHROMIUM=1."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required("PSG_REQUIRE_CHROMIUM"):
            pytest.fail("PSG_REQUIRE_CHROMIUM=1 but Playwright for Python is not installed (the dev extra)")
        pytest.skip("Playwright for Python not installed")
    return sync_playwright, system_tool("chromium", "chromium-browser", env="PSG_REQUIRE_CHROMIUM",
                                        package="chromium")


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("PSG_TEST_ARTIFACTS") or tmp_path / "artifacts") / "console"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


UNMAPPED = "Mic Snr X"


@pytest.fixture
def lab(tmp_path, calibrated_model):
    """A database with three nights the real pipeline processed: one flagged and delivered to a dead
    letter, one with a channel the montage does not know, one plain; and a site montage table."""
    db_url = f"sqlite:///{tmp_path / 'lab.db'}"
    db, repo, pipe, paths = pipeline_env(db_url, tmp_path / "var", *calibrated_model, reports=True)
    table = tmp_path / "site.yaml"
    table.write_text("name: site\nformat: 2\nextends: default\nrules: []\n")
    holder = MontageHolder(table)
    pipe.montage = holder
    nights = tmp_path / "nights"
    nights.mkdir()
    odd = tuple(dataclasses.replace(c, label=UNMAPPED) if c.label == "Snore" else c for c in DEFAULT_BENCH_CHANNELS)
    # flagged (absolute threshold every study passes) and queued: its message becomes a dead letter
    pipe.flags = FlagsConfig(outcomes=[FlagOutcome(label="death", log_hazard=-1e9, percentile=None)])
    pipe.hl7 = Hl7Config(enabled=True, port=2575)
    first = spool_file(paths, "a.edf", write_synthetic_night(nights / "a.edf", hours=0.1, seed=5).read_bytes(),
                       repo, claim="c1")
    assert pipe.run_once("w")
    [msg] = repo.messages(study_id=first.id)
    repo.message_dead(msg, None, "AE: unknown patient in the EHR", "AE", actor="t")
    pipe.flags = FlagsConfig()
    pipe.hl7 = Hl7Config(enabled=False)
    second = spool_file(paths, "b.edf", write_synthetic_night(nights / "b.edf", hours=0.1, seed=6, channels=odd)
                        .read_bytes(), repo, claim="c2")
    assert pipe.run_once("w")
    third = spool_file(paths, "c.edf", write_synthetic_night(nights / "c.edf", hours=0.1, seed=7).read_bytes(),
                       repo, claim="c3")
    assert pipe.run_once("w")
    cfg = console_cfg(tmp_path / "cfg", db_url, montage={"table": table}, hl7={"enabled": True, "port": 2575})
    cfg.paths = paths
    UserStore(repo).add("ada", "admin", PASSWORD)
    yield cfg, repo, holder, (first, second, third)
    db.dispose()


def test_the_console_in_a_real_browser(lab, artifacts):
    sync_playwright, chromium = _playwright()
    from prometheus_client import CollectorRegistry

    from gateway.http import OpsServer

    cfg, repo, holder, (first, second, third) = lab
    assert repo.get(first.id).state == State.FAILED and UNMAPPED in repo.get(second.id).mapping["unmapped"]
    health = {"status": "ok", "problems": [], "last_scan": datetime.now(UTC).isoformat(),
              "queues": {"pending_files": 0}, "dicom": {"port": 11112, "active_associations": 0,
                                                         "pending_connections": 0},
              "destination": {"address": "127.0.0.1:2575", "connected": False, "pending": 0,
                              "oldest_pending_age_s": None, "dead_letters": 1, "last_error": "MllpConnectError",
                              "last_delivered_at": None}}
    app = create_console(ConsoleContext(cfg, repo, montage=holder, health=lambda: (True, health)))
    ops = OpsServer("127.0.0.1", 0, CollectorRegistry(), lambda: (True, health), console=app)
    ops.start()
    base = f"http://127.0.0.1:{ops.port}/ui"
    since = datetime.now(UTC) - timedelta(minutes=5)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

            page.goto(f"{base}/studies")
            assert page.url.startswith(f"{base}/login")
            page.screenshot(path=artifacts / "01-login.png")
            page.fill("input[name=username]", "ada")
            page.fill("input[name=password]", "not the password")
            page.click("button[type=submit]")
            assert "Wrong user name or password" in page.content()
            page.fill("input[name=username]", "ada")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            assert page.url == f"{base}/studies"
            errors.clear()  # the refused sign-in answered 401, as it should
            for s in (first, second, third):
                assert page.locator(f"a:text-is('{s.key}')").count() == 1
            page.screenshot(path=artifacts / "02-studies.png", full_page=True)

            page.click("nav >> text=Dashboard")
            assert "Throughput" in page.content() and "Dead letters" in page.content()
            page.screenshot(path=artifacts / "03-dashboard.png", full_page=True)

            page.click("nav >> text=Worklist")
            assert page.locator("#group-main").get_by_text(first.key).count() == 1
            page.screenshot(path=artifacts / "04-worklist.png", full_page=True)

            # a study with its hypnogram (the report in its frame), channel map and ORU preview
            page.goto(f"{base}/studies/{first.key}")
            report = page.frame_locator("iframe.report")
            hypnogram = report.locator("img.hypnogram")
            hypnogram.wait_for()
            assert hypnogram.evaluate("img => img.naturalWidth") > 100  # the image decoded
            assert page.locator("#channel-map").get_by_text("C3-M2").count() >= 1
            assert "PREVIEW" in page.locator("#oru-preview").inner_text()
            page.fill("textarea[name=note]", "hypnogram and flags checked")
            page.click("#mark-reviewed")
            assert "marked reviewed" in page.content()
            page.screenshot(path=artifacts / "05-study.png", full_page=True)

            # map the label the second night carried unmapped
            page.goto(f"{base}/studies/{second.key}")
            assert page.locator("#channel-map tr.unmapped").get_by_text(UNMAPPED).count() == 1
            page.click("nav >> text=Montage")
            row = page.locator("#unmapped tr", has_text=UNMAPPED)
            assert "500 Hz" in row.inner_text()
            row.locator("select[name=modality]").select_option("RESP")
            row.locator("button", has_text="Preview").click()
            assert "unmapped" in page.locator("#preview").inner_text()
            page.screenshot(path=artifacts / "06-montage-preview.png", full_page=True)
            page.click("#apply-mapping")
            assert f"'{UNMAPPED}' -> RESP" in page.locator(".flash.ok").inner_text()
            assert page.locator("#montage-audit").get_by_text("ada (web console)").count() == 1
            page.screenshot(path=artifacts / "07-montage-mapped.png", full_page=True)
            assert holder.table.resolve(UNMAPPED).modality == "RESP"  # the daemon's table reloaded

            # retry the dead letter
            page.click("nav >> text=Outbox")
            assert "AE: unknown patient in the EHR" in page.content()
            page.screenshot(path=artifacts / "08-outbox-dead.png", full_page=True)
            page.locator("#messages tr", has_text=first.key).locator("button", has_text="Retry").click()
            assert "PENDING" in page.content()
            page.screenshot(path=artifacts / "09-outbox-retried.png", full_page=True)

            page.click("nav >> text=Scoring agreement")
            page.screenshot(path=artifacts / "10-agreement.png", full_page=True)
            browser.close()
        assert not errors, errors  # no CSP violation or failed asset
    finally:
        ops.stop()
    [msg] = repo.messages(study_id=first.id)
    assert msg.state == MessageState.PENDING
    rows = [(r.user_name, r.action, r.study_key) for r in AccessAudit(repo).rows(since)]
    assert ("ada", "login_failed", None) in rows and ("ada", "login", None) in rows
    assert ("ada", "view", first.key) in rows and ("ada", "study.reviewed", first.key) in rows
    assert ("ada", "montage.map", None) in rows and ("ada", "message.retry", first.key) in rows
    assert ("ada", "view", None) in rows  # the study list, the worklist, the outbox
