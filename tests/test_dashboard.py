"""The live dashboard in a real browser against the real service.

A tiny model is trained here (seconds) until it labels a handful of angry sentences `anger` and
calm ones `neutral`, so the test controls the labels without mocking anything. The service runs
with that checkpoint; a conversation is streamed over /v1/stream while headless Chromium shows
the dashboard, and the test checks what a supervisor sees: the conversation in the list, the
timeline points, each speaker's badge, the escalation alert with its hysteresis, provisional and
revised labels, and that reconnecting the watch feed never loses or duplicates an utterance.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import start_test_service
from tests.labelled_model import ANGRY, CALM, train_anger_neutral

pytestmark = [pytest.mark.service, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
CHROMIUM = os.environ.get("TRACKER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

SPEAKERS = ["Customer", "Agent"]
ALERT = {"k": 3, "m": 4, "clear": 1}

# (speaker, text, label the model gives, Customer's alert afterwards). With k=3, m=4, clear=1:
# three angry finals raise it; after one calm one 3 of the last 4 are negative and after two
# still 2 of 4 (without hysteresis it would clear there); it clears at 1 of 4.
STEPS = [
    ("Agent", CALM[2], "neutral", False),
    ("Customer", ANGRY[0], "anger", False),
    ("Agent", CALM[5], "neutral", False),
    ("Customer", ANGRY[1], "anger", False),  # 2 of 2 negative: not yet (k = 3)
    ("Customer", ANGRY[2], "anger", True),  # 3 of 3: raised
    ("Agent", CALM[3], "neutral", True),
    ("Customer", CALM[0], "neutral", True),  # 3 of the last 4
    ("Customer", CALM[1], "neutral", True),  # 2 of the last 4: hysteresis holds it
    ("Agent", CALM[4], "neutral", True),
    ("Customer", CALM[4], "neutral", False),  # 1 of the last 4: cleared
    ("Agent", CALM[0], "neutral", False),
]
RAISE_AT, CLEAR_AT = 4, 9  # indices in STEPS
DROP_AFTER = 6  # the watch socket is dropped (reconnect held back) after this step
REWIND_AFTER = 9  # and dropped again with the cursor forgotten, so the server replays everything


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_backbone):
    """A real tiny model trained to label ANGRY `anger` and CALM `neutral` (text only, no context)."""
    return train_anger_neutral(tmp_path_factory.mktemp("dash-train"), tiny_backbone, SPEAKERS)


@pytest.fixture(scope="module")
def service(checkpoint):
    svc = start_test_service(checkpoint)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        msg = f"{CHROMIUM} not found (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the dashboard: {errors}"


@pytest.fixture
def stream(service):
    """Opens /v1/stream connections for a test and closes whatever is left open afterwards."""
    opened: list[Streamer] = []

    def open_stream(conversation_id: str) -> Streamer:
        opened.append(Streamer(service, conversation_id))
        return opened[-1]

    yield open_stream
    for s in opened:
        s.ws.close()


# ------------------------------------------------------------------------------------ helpers


class Streamer:
    """One /v1/stream connection (sync websockets client) that sends `utterance` events."""

    def __init__(self, service, conversation_id: str):
        from websockets.sync.client import connect

        self.ws = connect(service.ws_url, open_timeout=30, additional_headers=service.auth_headers).__enter__()  # (entered: no legacy warning)
        self.conversation_id = conversation_id
        self.ws.send(json.dumps({"type": "start", "conversation_id": conversation_id, "sample_rate": 16000,
                                 "channels": 2, "speakers": SPEAKERS}))
        started = json.loads(self.ws.recv(timeout=30))
        assert started["type"] == "started", started
        self.clock_ms = 0

    def say(self, utterance_id: str, speaker: str, text: str) -> dict:
        """Send one utterance and return its final result."""
        start = self.clock_ms + 400
        end = start + 300 * len(text.split())
        self.clock_ms = end
        self.ws.send(json.dumps({"type": "utterance", "utterance_id": utterance_id, "speaker": speaker,
                                 "text": text, "start_ms": start, "end_ms": end}))
        deadline = time.time() + 60
        while time.time() < deadline:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time())))
            assert msg["type"] != "error", msg
            if msg["type"] == "utterance" and msg["utterance_id"] == utterance_id and msg["is_final"]:
                return msg
        raise AssertionError(f"no result for {utterance_id}")

    def stop(self) -> None:
        self.ws.send(json.dumps({"type": "stop"}))
        deadline = time.time() + 60
        while time.time() < deadline:
            if json.loads(self.ws.recv(timeout=60))["type"] == "stopped":
                break
        self.ws.close()


def row(page, utterance_id: str):
    return page.locator(f'[data-testid="transcript-row"][data-utterance-id="{utterance_id}"]')


def rows_per_utterance(page) -> dict[str, int]:
    ids = page.eval_on_selector_all('[data-testid="transcript-row"]', "els => els.map(e => e.dataset.utteranceId)")
    return {i: ids.count(i) for i in ids}


def dash(page) -> dict:
    return page.evaluate("() => JSON.parse(JSON.stringify(window.trackerDashboard))")


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


# ------------------------------------------------------------------------------------ tests


def test_dashboard_follows_a_live_call_with_timeline_badges_alert_hysteresis_and_reconnects(service, page, stream):
    from playwright.sync_api import expect

    cid = f"dash-{uuid.uuid4().hex[:8]}"
    page.goto(f"{service.http_url}/#key={service.api_key}")  # the key rides in the fragment, never to the server
    expect(page.get_by_test_id("label-legend")).to_contain_text("anger")  # the config was loaded

    call = stream(cid)
    results: list[dict] = []
    for i, (speaker, text, label, customer_alert) in enumerate(STEPS):
        uid = f"{cid}-{i}"
        res = call.say(uid, speaker, text)
        assert res["label"] == label, (i, res)
        results.append(res)
        if i == 0:  # the call shows up in the list (polled every 2 s); a supervisor clicks it
            item = page.locator(f'[data-testid="conversation-item"][data-id="{cid}"]')
            expect(item).to_be_visible(timeout=15_000)
            expect(item.get_by_test_id("status-badge")).to_have_text("live")
            item.click()
            assert page.evaluate("location.hash") == f"#conversation={cid}"  # (the key was taken out of it)
        expect(row(page, uid)).to_have_attribute("data-final", "true", timeout=20_000)
        expect(row(page, uid)).to_have_attribute("data-label", label)
        expect(page.get_by_test_id(f"badge-{speaker}")).to_contain_text(label)
        alert = page.get_by_test_id("alert-Customer")
        if customer_alert:
            expect(alert).to_be_visible()
        else:
            expect(alert).to_have_count(0)
        expect(page.get_by_test_id("alert-Agent")).to_have_count(0)
        if i == 7:  # raised and held by the hysteresis: the most telling picture
            path = screenshot(page, "dashboard.png")
            assert path.stat().st_size > 20_000
        if i == DROP_AFTER:  # the feed drops; the next utterances are stored while it is down
            assert page.evaluate("window.trackerDashboard.dropConnection({pauseMs: 1500})")
        if i == REWIND_AFTER:  # dropped again, and the reconnect replays the whole conversation
            connects = dash(page)["connects"]
            assert page.evaluate("window.trackerDashboard.dropConnection({rewind: true})")
            page.wait_for_function(f"window.trackerDashboard.connects > {connects} && window.trackerDashboard.feed === 'live'",
                                   timeout=20_000)
        time.sleep(0.3)
    call.stop()

    # every utterance exactly once, in order, after two reconnects (one of them a full replay)
    page.wait_for_function(f"window.trackerDashboard.lastEntryId && document.querySelectorAll("
                           f"'[data-testid=\"transcript-row\"]').length >= {len(STEPS)}")
    time.sleep(1.0)  # let the replayed entries all arrive
    counts = rows_per_utterance(page)
    assert counts == {f"{cid}-{i}": 1 for i in range(len(STEPS))}
    ids = page.eval_on_selector_all('[data-testid="transcript-row"]', "els => els.map(e => e.dataset.utteranceId)")
    assert ids == [f"{cid}-{i}" for i in range(len(STEPS))]

    d = dash(page)
    assert d["conversationId"] == cid and d["connects"] >= 3
    # the timeline: one point per final utterance of each speaker at (end s, valence score)
    for speaker in SPEAKERS:
        want = [[r["end_ms"] / 1000, r["score"]] for r in results if r["speaker"] == speaker]
        got = d["points"][speaker]
        assert len(got) == len(want)
        assert [x for x, _ in got] == pytest.approx([x for x, _ in want], abs=1e-9)
        assert [y for _, y in got] == pytest.approx([y for _, y in want], abs=1e-9)
    customer = [p[1] for p in d["points"]["Customer"]]
    assert max(customer[:3]) < -0.3 and min(customer[3:]) > -0.3  # angry ones are below the calm ones
    assert page.locator('[data-testid="timeline"] canvas').count() >= 1
    # the alert was raised once and cleared once: it never flickered, not even across the reconnects
    changes = [(c["raised"], c["utterance_id"]) for c in d["alertChanges"] if c["speaker"] == "Customer"]
    assert changes == [(True, f"{cid}-{RAISE_AT}"), (False, f"{cid}-{CLEAR_AT}")]
    assert d["alerts"] == {"Customer": False, "Agent": False}
    expect(page.get_by_test_id("badge-Customer")).to_contain_text("neutral")

    # a reload selects the call from the URL hash and rebuilds the same view from history
    page.reload()
    expect(page.locator('[data-testid="transcript-row"]')).to_have_count(len(STEPS), timeout=20_000)
    expect(page.locator(f'[data-testid="conversation-item"][data-id="{cid}"]')).to_have_class(re.compile(r"\bselected\b"),
                                                                                           timeout=10_000)
    assert rows_per_utterance(page) == {f"{cid}-{i}": 1 for i in range(len(STEPS))}
    expect(page.get_by_test_id("alert-Customer")).to_have_count(0)
    assert len(dash(page)["points"]["Customer"]) == sum(1 for s in STEPS if s[0] == "Customer")
    screenshot(page, "dashboard-after-reload.png")


def test_provisional_label_is_replaced_by_the_final_and_marked_revised(service, page, stream):
    """The service stores no interim labels yet; one is written the way a refining service would."""
    from playwright.sync_api import expect

    from tracker.context.store import ConversationStore
    from tracker.labels import MELD7

    cid = f"dash-rev-{uuid.uuid4().hex[:8]}"
    page.goto(f"{service.http_url}/#conversation={cid}&key={service.api_key}")  # selected before the call even exists
    expect(page.get_by_test_id("conversation-title")).to_have_text(cid)

    store = ConversationStore(service.args["redis_url"], label_set=MELD7)
    interim = {"utterance_id": "u-1", "speaker": "Customer", "start_ms": 400, "end_ms": 2800, "text": ANGRY[4],
               "label": "joy", "probabilities": {"joy": 0.55, "anger": 0.25, "neutral": 0.2}, "score": 0.3,
               "is_final": False}
    stored, _ = store.append(cid, interim)
    assert stored
    r = row(page, "u-1")
    expect(r).to_have_attribute("data-final", "false", timeout=20_000)
    expect(r.get_by_test_id("provisional")).to_be_visible()
    expect(r).to_have_attribute("data-label", "joy")
    screenshot(page, "dashboard-provisional.png")

    call = stream(cid)
    res = call.say("u-1", "Customer", ANGRY[4])
    assert res["label"] == "anger"
    expect(r).to_have_attribute("data-final", "true", timeout=20_000)
    expect(r).to_have_attribute("data-label", "anger")
    expect(r).to_have_attribute("data-revised", "true")
    expect(r.get_by_test_id("revised")).to_contain_text("joy")
    expect(r.get_by_test_id("provisional")).to_have_count(0)
    expect(page.get_by_test_id("badge-Customer")).to_contain_text("anger")
    call.say("u-2", "Agent", CALM[2])
    expect(row(page, "u-2")).to_have_attribute("data-revised", "false", timeout=20_000)
    call.stop()
    assert rows_per_utterance(page) == {"u-1": 1, "u-2": 1}
    screenshot(page, "dashboard-revised.png")

    # `stop` ends the conversation: the list and the header say so
    item = page.locator(f'[data-testid="conversation-item"][data-id="{cid}"]')
    expect(item.get_by_test_id("status-badge")).to_have_text("ended", timeout=15_000)
    expect(page.get_by_test_id("conversation-status")).to_have_text("ended", timeout=15_000)


def test_dashboard_asks_for_a_key_and_shows_only_its_tenants_calls(service, page, stream):
    """The page is public, its data is not: no key or a wrong one gets the key form, and a key of
    another tenant sees none of this tenant's calls, in the list or through the watch feed."""
    from playwright.sync_api import expect

    from services.auth import KeyStore

    cid = f"dash-auth-{uuid.uuid4().hex[:8]}"
    call = stream(cid)
    call.say("a-1", "Customer", ANGRY[0])

    page.goto(f"{service.http_url}/#conversation={cid}")
    expect(page.get_by_test_id("key-form")).to_be_visible(timeout=10_000)
    assert page.locator('[data-testid="conversation-item"]').count() == 0
    page.get_by_test_id("key-input").fill("trk_00000000_" + "x" * 43)  # well formed, unknown
    page.get_by_test_id("key-submit").click()
    expect(page.get_by_test_id("key-message")).to_contain_text("refused", timeout=10_000)
    expect(page.locator('[data-testid="transcript-row"]')).to_have_count(0)

    other, _ = KeyStore(service.args["redis_url"]).create("dash-other-tenant", name="test")
    page.get_by_test_id("key-input").fill(other)
    page.get_by_test_id("key-submit").click()
    expect(page.get_by_test_id("key-form")).to_be_hidden(timeout=10_000)
    page.wait_for_function("window.trackerDashboard.feed === 'live'", timeout=20_000)
    call.say("a-2", "Agent", CALM[2])
    time.sleep(2.5)  # a list poll and a watch read later: still nothing of the other tenant's call
    assert page.locator('[data-testid="conversation-item"]').count() == 0
    expect(page.locator('[data-testid="transcript-row"]')).to_have_count(0)

    page.evaluate(f"location.hash = '#conversation={cid}&key={service.api_key}'")  # the right key, via the fragment
    expect(row(page, "a-2")).to_have_attribute("data-final", "true", timeout=20_000)
    assert rows_per_utterance(page) == {"a-1": 1, "a-2": 1}
    assert "key=" not in page.evaluate("location.hash")
    call.stop()
