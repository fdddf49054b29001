"""Data out of the live service: export a conversation (JSONL, CSV), delete it, API docs served offline."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re

import httpx
import pytest
import redis

from tracker.stream import protocol as P
from services.auth import KeyStore
from tests.conftest import start_tiny_service
from tests.test_security import bearer, converse
from tracker.data import read_jsonl
from tracker.labels import MELD7

pytestmark = [pytest.mark.service, pytest.mark.timeout(600)]

TEXTS = ["Hello, thanks for calling.", "My order never arrived, this is the third time!", "I'm sorry, let me check.",
         "Fine."]


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_backbone):
    svc = start_tiny_service(tmp_path_factory, tiny_backbone)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def tenants(service):
    keys = KeyStore(service.redis_url)
    a, _ = keys.create("export-a")
    b, _ = keys.create("export-b")
    keys.redis.close()
    return a, b


def call(service, key: str, cid: str, texts=TEXTS) -> list[dict]:
    msgs = asyncio.run(converse(service.ws_url, bearer(key), cid, list(texts), speaker="Customer"))
    return [m for m in msgs if m["type"] == "utterance" and m["is_final"]]


def test_export_gives_the_whole_call_as_jsonl_the_data_format_reads_and_as_csv(service, tenants, tmp_path):
    a, _ = tenants
    finals = call(service, a, "exp-1")
    assert len(finals) == len(TEXTS)
    r = httpx.get(f"{service.http_url}/v1/conversations/exp-1/export", params={"format": "jsonl"}, headers=bearer(a),
                  timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    assert r.headers["content-disposition"] == 'attachment; filename="exp-1.jsonl"'
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert [(x["utterance_id"], x["text"], x["label"]) for x in lines] == [(f["utterance_id"], f["text"], f["label"])
                                                                           for f in finals]
    for line, final in zip(lines, finals):
        assert line["conversation_id"] == "exp-1" and line["speaker"] == "Customer"
        assert line["extra"]["seq"] == final["seq"] and line["extra"]["probabilities"] == final["probabilities"]
        assert line["extra"]["start_ms"] == final["start_ms"] and line["extra"]["end_ms"] == final["end_ms"]
    path = tmp_path / "exp-1.jsonl"
    path.write_text(r.text)
    [conv] = read_jsonl(path, label_set=MELD7)  # the project's own conversation format
    assert [u.text for u in conv.utterances] == TEXTS and [u.label for u in conv.utterances] == [f["label"] for f in finals]

    r = httpx.get(f"{service.http_url}/v1/conversations/exp-1/export", params={"format": "csv"}, headers=bearer(a),
                  timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert list(rows[0]) == ["conversation_id", "seq", "utterance_id", "speaker", "start_ms", "end_ms", "text", "label",
                             "confidence", "score", "modalities", "text_source", "asr_confidence",
                             *(f"p_{label}" for label in MELD7.labels)]
    assert [row["text"] for row in rows] == TEXTS  # commas and quotes survive
    for row, final in zip(rows, finals):
        assert int(row["seq"]) == final["seq"] and row["label"] == final["label"]
        assert float(row["confidence"]) == pytest.approx(final["probabilities"][final["label"]])
        assert sum(float(row[f"p_{label}"]) for label in MELD7.labels) == pytest.approx(1.0, abs=1e-6)
        assert row["modalities"] == "text" and row["text_source"] == "client" and row["asr_confidence"] == ""


def test_export_refuses_a_bad_format_and_another_tenants_or_unknown_conversation(service, tenants):
    a, b = tenants
    call(service, a, "exp-2", TEXTS[:1])
    url = f"{service.http_url}/v1/conversations/exp-2/export"
    r = httpx.get(url, params={"format": "xml"}, headers=bearer(a), timeout=30)
    assert r.status_code == 400 and r.json()["detail"]["code"] == P.INVALID_FIELD
    assert httpx.get(url, headers=bearer(b), timeout=30).status_code == 404  # tenant b does not see tenant a's call
    assert httpx.get(url.replace("exp-2", "nope"), headers=bearer(a), timeout=30).status_code == 404
    assert httpx.get(url, timeout=30).status_code == 401


def test_delete_removes_every_key_of_the_conversation_in_the_tenant_and_nothing_else(service, tenants):
    a, b = tenants
    call(service, a, "del-1")
    call(service, a, "del-keep", TEXTS[:2])
    call(service, b, "del-1", TEXTS[:2])  # the same id in another tenant
    base = f"{service.http_url}/v1/conversations"
    assert httpx.delete(f"{base}/del-1", timeout=30).status_code == 401
    raw = redis.Redis.from_url(service.redis_url)
    try:
        before = {k.decode() for k in raw.scan_iter("tracker:export-a:conv:del-1:*")}
        assert {"tracker:export-a:conv:del-1:stream", "tracker:export-a:conv:del-1:meta"} <= before
        r = httpx.delete(f"{base}/del-1", headers=bearer(a), timeout=30)
        assert r.status_code == 200 and r.json() == {"conversation_id": "del-1", "deleted": True}
        assert list(raw.scan_iter("tracker:export-a:conv:del-1:*")) == []
        assert raw.zscore("tracker:export-a:conversations", "del-1") is None
        assert raw.xlen("tracker:export-b:conv:del-1:stream") == 2  # tenant b's call of the same id is untouched
        assert raw.xlen("tracker:export-a:conv:del-keep:stream") == 2
    finally:
        raw.close()
    assert httpx.get(f"{base}/del-1", headers=bearer(a), timeout=30).status_code == 404
    assert httpx.get(f"{base}/del-1/export", headers=bearer(a), timeout=30).status_code == 404
    listed = [c["conversation_id"] for c in httpx.get(base, headers=bearer(a), timeout=30).json()["conversations"]]
    assert "del-1" not in listed and "del-keep" in listed
    assert httpx.delete(f"{base}/del-1", headers=bearer(a), timeout=30).status_code == 404  # already gone
    assert len(httpx.get(f"{base}/del-1", headers=bearer(b), timeout=30).json()["utterances"]) == 2
    # the id starts afresh: a new call under it is a new conversation with seq from 1
    again = call(service, a, "del-1", TEXTS[:1])
    assert [f["seq"] for f in again] == [1]


def test_swagger_ui_and_redoc_load_their_assets_from_the_service_not_a_cdn(service):
    for page in ("/docs", "/redoc"):
        html = httpx.get(service.http_url + page, timeout=30).text
        assert "cdn" not in html.lower() and "fonts.googleapis" not in html
        assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css|png))"', html)
        assert assets, html
        for asset in assets:
            r = httpx.get(service.http_url + asset, timeout=30)
            assert r.status_code == 200 and len(r.content) > 1000, asset
    spec = httpx.get(service.http_url + "/openapi.json", timeout=30).json()
    assert "delete" in spec["paths"]["/v1/conversations/{conversation_id}"]
    assert "/v1/conversations/{conversation_id}/export" in spec["paths"]
