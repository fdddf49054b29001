"""API keys, the key registry in a real Redis, the `tracker keys` command, limits and protocol hardening.

No Ray here: the key store and the CLI talk to an embedded Redis; the service-level behaviour
(routes refusing keys, tenants kept apart) is in tests/test_security.py.
"""

from __future__ import annotations

import json

import pytest
import redis

from tracker.stream import protocol as P
from services.auth import (
    AuthError,
    ConfigKey,
    KeyStore,
    check_tenant,
    generate_key,
    hash_key,
    key_from_request,
    key_id_of,
)
from services.limits import TokenBucket
from tracker.config import ConfigError


def test_keys_are_random_and_only_their_hash_is_stored(redis_url):
    store = KeyStore(redis_url, prefix="t1")
    key, rec = store.create("acme", name="crm")
    assert key_id_of(key) == rec["key_id"] and len(key) == 4 + 8 + 1 + 43
    assert key != generate_key()
    assert store.authenticate(key).tenant == "acme"
    # the key itself is nowhere in Redis: only its SHA-256
    raw = redis.Redis.from_url(redis_url)
    dump = b"".join(k + b"".join(raw.hgetall(k).keys()) + b"".join(raw.hgetall(k).values())
                    for k in raw.scan_iter("t1:*") if raw.type(k) == b"hash")
    assert key.encode() not in dump and key[13:].encode() not in dump
    assert hash_key(key).encode() in dump


def test_unknown_malformed_and_revoked_keys_are_refused(redis_url):
    store = KeyStore(redis_url, prefix="t2")
    key, rec = store.create("acme")
    other = generate_key()
    for bad, why in [(None, "required"), ("", "required"), ("hello", "malformed"), (key + "x", "malformed"),
                     (other, "unknown"), ("trk_" + "0" * 8 + "_" + "a" * 43, "unknown")]:
        with pytest.raises(AuthError, match=why):
            store.authenticate(bad)
    assert store.revoke(rec["key_id"]) and not store.revoke("ffffffff")
    with pytest.raises(AuthError, match="revoked"):
        store.authenticate(key)
    listed = store.list()
    assert [(r["key_id"], r["tenant"], bool(r.get("revoked_at"))) for r in listed] == [(rec["key_id"], "acme", True)]
    assert all("sha256" not in r for r in listed)


def test_keys_listed_in_the_config_are_checked_by_hash(redis_url):
    key = generate_key()
    store = KeyStore(redis_url, prefix="t3", config_keys=[ConfigKey(sha256=hash_key(key), tenant="cfg", name="ops")])
    assert store.authenticate(key).tenant == "cfg"
    with pytest.raises(AuthError):
        store.authenticate(generate_key())
    with pytest.raises(ConfigError, match="sha256"):
        ConfigKey(sha256=key, tenant="x")
    with pytest.raises(ConfigError, match="tenant"):
        ConfigKey(sha256=hash_key(key), tenant="_auth")


def test_tenant_names_cannot_reach_the_auth_namespace():
    for ok in ("acme", "a", "team-1.eu_west"):
        assert check_tenant(ok) == ok
    for bad in ("", "_auth", "a:b", "a b", "x" * 65, "ü"):
        with pytest.raises(ValueError):
            check_tenant(bad)


def test_key_is_read_from_header_x_api_key_subprotocol_or_query():
    k = "trk_12345678_" + "a" * 43
    assert key_from_request({"authorization": f"Bearer {k}"}, {}) == k
    assert key_from_request({"authorization": f"bearer {k}"}, {}) == k
    assert key_from_request({"x-api-key": k}, {}) == k
    assert key_from_request({}, {}, ["tracker.v1", f"bearer.{k}"]) == k
    assert key_from_request({}, {"token": k}) == k
    assert key_from_request({"authorization": "Basic abc"}, {}) is None
    assert key_from_request({}, {}) is None


def test_tracker_keys_create_list_revoke(redis_url, capsys):
    from tracker_cli import main

    assert main(["keys", "create", "--tenant", "cli-tenant", "--name", "ops", "--redis-url", redis_url, "--prefix", "t4"]) == 0
    key = capsys.readouterr().out.strip()
    store = KeyStore(redis_url, prefix="t4")
    assert store.authenticate(key).tenant == "cli-tenant"
    assert main(["keys", "list", "--redis-url", redis_url, "--prefix", "t4"]) == 0
    out = capsys.readouterr().out
    assert key_id_of(key) in out and "cli-tenant" in out and "active" in out and key not in out
    assert main(["keys", "revoke", key_id_of(key), "--redis-url", redis_url, "--prefix", "t4"]) == 0
    assert not store.verify(key)
    assert main(["keys", "revoke", "00000000", "--redis-url", redis_url, "--prefix", "t4"]) == 1
    assert main(["keys", "create", "--tenant", "bad tenant", "--redis-url", redis_url, "--prefix", "t4"]) == 1
    capsys.readouterr()
    assert main(["keys", "create", "--tenant", "cfg", "--no-store"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert f"sha256: {hash_key(lines[0])}" in lines[-1]


def test_limits_are_validated_with_the_field_named():
    from services.config import load_app_config

    c = load_app_config({"limits": {"max_messages_per_second": 5.0, "message_burst": 10, "max_streams_per_key": 2}})
    assert c.limits.max_streams_per_key == 2 and c.auth.enabled
    for bad, field in [({"max_streams_per_key": 0}, "max_streams_per_key"), ({"max_messages_per_second": 0}, "max_messages_per_second"),
                       ({"max_frame_bytes": 1001}, "max_frame_bytes"), ({"max_utterance_chars": "many"}, "max_utterance_chars"),
                       ({"watch_send_timeout_s": -1}, "watch_send_timeout_s")]:
        with pytest.raises(ConfigError, match=f"limits.{field}"):
            load_app_config({"limits": bad})
    with pytest.raises(ConfigError, match="auth.keys"):
        load_app_config({"auth": {"keys": [{"sha256": "00", "tenant": "a"}]}})


def test_token_bucket_allows_the_burst_then_the_rate():
    now = [0.0]
    bucket = TokenBucket(rate=10, burst=5, clock=lambda: now[0])
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]
    now[0] += 0.25  # 2.5 tokens
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] += 100  # never more than the burst
    assert sum(bucket.take() for _ in range(20)) == 5


def test_lone_surrogates_and_over_long_text_are_invalid_fields():
    with pytest.raises(P.ProtocolError) as e:
        P.parse_utterance(json.loads('{"type":"utterance","speaker":"A","text":"x\\ud800"}'), ["A"], 1000)
    assert e.value.code == P.INVALID_FIELD and "Unicode" in e.value.message
    with pytest.raises(P.ProtocolError) as e:
        P.parse_start(json.loads('{"type":"start","conversation_id":"\\udfff"}'))
    assert e.value.code == P.INVALID_FIELD
    with pytest.raises(P.ProtocolError) as e:
        P.parse_transcript({"speaker": "A", "text": "x" * 11, "start_ms": 0, "end_ms": 5}, ["A"], max_chars=10)
    assert e.value.code == P.INVALID_FIELD and "longer than 10" in e.value.message
    with pytest.raises(P.ProtocolError) as e:
        P.parse_text_message('{"type":"utterance","start_ms":' + "9" * 5000 + "}")  # past Python's int-digits limit
    assert e.value.code == P.BAD_JSON
    with pytest.raises(P.ProtocolError) as e:
        P.parse_text_message("[" * 100_000)
    assert e.value.code == P.BAD_JSON
