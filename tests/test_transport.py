"""`tracker serve --transport haproxy`: HAProxy forwards each WebSocket to the Ingress replica's own server.

The production path with the tiny model, as in tests/test_service_integration.py, but no message crosses
Ray Serve's Python proxy: HAProxy listens on the service port and the Ingress replica serves HTTP and
WebSockets itself (Ray Serve's direct ingress; tracker/ray_env.py TRANSPORT_ENV).
"""

from __future__ import annotations

import asyncio
import os
import uuid

import psutil
import pytest

from services.runner import _haproxy_processes
from tests.conftest import SUPPORT_CALL, free_port, save_tiny_checkpoint, start_test_service
from tracker.audio.synth import have_espeak, voice_conversation

pytestmark = [pytest.mark.service, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_backbone):
    # HAProxy's Prometheus and stats ports are fixed (9101, 8404) unless set: free ones, so that another
    # service on this machine cannot make the start fail
    ports = {"RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in ports}
    os.environ.update(ports)
    ckpt = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_tiny_checkpoint(tiny_backbone, ckpt, seed=0)
    svc = start_test_service(ckpt, transport="haproxy")
    svc.haproxy_ports = {int(v) for v in ports.values()}
    try:
        yield svc
    finally:
        svc.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _listeners(procs) -> dict[int, list[tuple[str, int]]]:
    """{pid: [(ip, port)]} of the TCP sockets each process listens on."""
    out: dict[int, list[tuple[str, int]]] = {}
    for p in procs:
        try:
            conns = p.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out[p.pid] = [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]
    return out


def test_haproxy_holds_the_service_port_and_the_ingress_replica_serves_http_itself(service):
    haproxies = _haproxy_processes()
    assert haproxies, "no haproxy process under the service"
    by_pid = _listeners(haproxies)
    assert any(("127.0.0.1", service.port) in socks for socks in by_pid.values())
    ingress = [p for p in psutil.Process().children(recursive=True) if "ServeReplica:tracker:Ingress" in " ".join(p.cmdline())]
    assert len(ingress) == 1
    own = _listeners(ingress)[ingress[0].pid]
    # its direct-ingress HTTP server: on loopback, in Ray Serve's port range for it (30000-31000)
    assert [port for ip, port in own if ip == "127.0.0.1" and 30000 <= port < 31000], own
    # the only listeners off loopback are HAProxy's Prometheus and stats pages (docs/deploy.md)
    off_loopback = {(ip, port) for socks in by_pid.values() for ip, port in socks if ip not in ("127.0.0.1", "::1")}
    assert {port for _, port in off_loopback} == service.haproxy_ports


def test_a_voiced_call_gets_one_final_per_utterance_through_haproxy(service):
    if not have_espeak():
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    from clients.stream_client import Recording, stream_recording

    voiced = voice_conversation(SUPPORT_CALL)
    cid = f"hap-{uuid.uuid4().hex[:8]}"
    rec = Recording(voiced.samples, voiced.sample_rate, voiced.speakers,
                    [{k: u[k] for k in ("speaker", "text", "start_ms", "end_ms")} for u in voiced.utterances])
    out = asyncio.run(stream_recording(service.ws_url, cid, rec, speed=4.0, headers=service.auth_headers))
    assert out.errors == []
    finals = [r for r in out.results if r["is_final"]]
    assert [(r["speaker"], r["text"]) for r in finals] == [(u["speaker"], u["text"]) for u in voiced.utterances]
    assert out.stopped == {"type": "stopped", "conversation_id": cid, "results": len(SUPPORT_CALL)}

    import httpx

    conv = httpx.get(f"{service.http_url}/v1/conversations/{cid}", timeout=30, headers=service.auth_headers).json()
    assert [u["utterance_id"] for u in conv["utterances"]] == [r["utterance_id"] for r in finals]
    # a request without the key is refused by the replica itself, not let through by the transport
    assert httpx.get(f"{service.http_url}/v1/conversations/{cid}", timeout=30).status_code == 401


def test_stopping_the_service_stops_haproxy(service):
    pids = [p.pid for p in _haproxy_processes()]
    assert pids
    service.stop()
    gone, alive = psutil.wait_procs([psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)], timeout=30)
    assert alive == [], f"haproxy still running after stop: {[p.pid for p in alive]}"
