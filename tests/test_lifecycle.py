"""`tracker serve` as a process manager runs it: started as a subprocess, stopped with SIGTERM or SIGINT.

The stop must leave nothing behind (Ray's raylet, GCS, agents and workers, Serve's replicas, the
embedded redis-server), remove the state file and exit 0; with the embedded Redis's append-only
file the next start serves the same history and the same keys.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import REPO, free_port, save_tiny_checkpoint

pytestmark = [pytest.mark.service, pytest.mark.timeout(900)]


class ServeProcess:
    """`python -m tracker_cli serve` with its own cache directory, on a free port."""

    def __init__(self, config: Path, cache: Path, port: int, *extra: str, ignore_sigint: bool = False):
        self.cache, self.port = cache, port
        cache.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TRACKER_CACHE_DIR": str(cache), "PYTHONUNBUFFERED": "1"}
        env.pop("REDIS_URL", None)
        self.log = cache / f"serve-{uuid.uuid4().hex[:6]}.log"
        cmd = [sys.executable, "-m", "tracker_cli", "serve", "--config", str(config), "--port", str(port), *extra]
        # a shell script's background job starts with SIGINT ignored; so can we
        preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=self.log.open("wb"),
                                     stderr=subprocess.STDOUT, preexec_fn=preexec, start_new_session=True)
        self.tree: dict[int, str] = {}

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def state(self) -> dict:
        path = self.cache / "local-service.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def wait_ready(self, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"tracker serve exited with {self.proc.returncode}:\n{self.output()}")
            state = self.state()
            if state.get("http_url"):
                try:
                    with urllib.request.urlopen(f"{self.http}/healthz", timeout=5) as resp:
                        if resp.status == 200:
                            return state
                except OSError:
                    pass
            time.sleep(0.5)
        raise AssertionError(f"tracker serve did not come up in {timeout} s:\n{self.output()}")

    def record_tree(self) -> dict[int, str]:
        """Every process started by `tracker serve`, directly or not (Ray's daemons re-parent to init, so
        they are found by session too: they keep the session `start_new_session` gave the serve process)."""
        root = psutil.Process(self.proc.pid)
        procs = {root, *root.children(recursive=True)}
        sid = os.getsid(self.proc.pid)
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getsid(p.pid) == sid:
                    procs.add(p)
            except (ProcessLookupError, PermissionError):
                pass
        for p in procs:
            try:
                self.tree[p.pid] = " ".join(p.cmdline())[:120]
            except psutil.Error:
                pass
        return self.tree

    def stop(self, sig: int, timeout: float = 30) -> tuple[int, float]:
        t0 = time.time()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            raise AssertionError(f"tracker serve did not exit within {timeout} s of {signal.Signals(sig).name}:\n{self.output()}")
        return code, time.time() - t0

    def left_over(self, grace: float = 10) -> dict[int, str]:
        deadline = time.time() + grace
        while True:
            alive = {pid: cmd for pid, cmd in self.tree.items() if psutil.pid_exists(pid) and _not_zombie(pid)}
            if not alive or time.time() > deadline:
                return alive
            time.sleep(0.2)

    def kill_tree(self) -> None:
        """Cleanup for a failed test: only processes this test started."""
        for pid in list(self.tree) + [self.proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture(scope="module")
def serve_config(tmp_path_factory, tiny_backbone) -> Path:
    folder = tmp_path_factory.mktemp("serve")
    ckpt = save_tiny_checkpoint(tiny_backbone, folder / "tiny", seed=0)
    raw = yaml.safe_load((REPO / "configs" / "serve" / "local.yaml").read_text())
    args = raw["applications"][0]["args"]
    args["model"].update({"checkpoint": str(ckpt), "dtype": "fp32", "max_batch_size": 4, "num_threads": 1})
    args["deployments"] = {"ingress": {"num_cpus": 0.1}, "feature_extractor": {"num_cpus": 0.1},
                           "emotion_model": {"num_cpus": 0.5, "max_ongoing_requests": 16},
                           "context_aggregator": {"num_cpus": 0.1}}
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _get(url: str, key: str) -> dict:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def test_sigterm_stops_every_process_of_the_service_removes_the_state_file_and_exits_0(serve_config, tmp_path):
    serve = ServeProcess(serve_config, tmp_path / "cache", free_port(), "--ephemeral")
    try:
        serve.wait_ready()
        tree = serve.record_tree()
        names = " | ".join(tree.values())
        for part in ("redis-server", "raylet", "gcs_server", "DashboardAgent", "RuntimeEnvAgent", "ServeReplica"):
            assert part in names, names
        code, seconds = serve.stop(signal.SIGTERM)
        assert code == 0, serve.output()
        assert seconds < 30
        assert serve.left_over() == {}
        assert not (tmp_path / "cache" / "local-service.json").exists()
        out = serve.output()
        assert "Traceback" not in out, out  # no crash-style dump on the user's console
        assert out.rstrip().endswith("stopping the service ..."), out  # and none of Ray's shutdown chatter
    finally:
        serve.kill_tree()


def test_sigterm_with_the_haproxy_transport_leaves_no_haproxy_holding_the_port(serve_config, tmp_path, monkeypatch):
    """HAProxy runs as a child of a Serve actor. With Ray's default 30 s drain of a direct-ingress replica a
    stop took longer than Serve's shutdown waits, and HAProxy was left behind, orphaned, on the service
    port (tracker/ray_env.py shortens the drain; services/runner.py also stops what is left)."""
    monkeypatch.setenv("RAY_SERVE_HAPROXY_METRICS_PORT", str(free_port()))  # its fixed defaults may be taken
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", str(free_port()))
    port = free_port()
    serve = ServeProcess(serve_config, tmp_path / "cache", port, "--ephemeral", "--transport", "haproxy")
    try:
        serve.wait_ready()
        tree = serve.record_tree()
        assert any(cmd.split()[0].endswith("/haproxy") for cmd in tree.values()), " | ".join(tree.values())
        code, seconds = serve.stop(signal.SIGTERM)
        assert code == 0, serve.output()
        assert serve.left_over() == {}
        with socket.socket() as s:  # the service port is free again for a restart (as servers bind: SO_REUSEADDR,
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # which still fails while anything listens)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        serve.kill_tree()


def test_the_embedded_redis_keeps_the_history_and_the_key_across_a_restart(serve_config, tmp_path):
    """Also the SIGINT case: the first service starts with SIGINT ignored (a script's background job)."""
    from clients.stream_client import demo_recording, stream_recording
    import asyncio

    cache = tmp_path / "cache"
    recording, _ = demo_recording()
    cid = f"persist-{uuid.uuid4().hex[:6]}"
    first = ServeProcess(serve_config, cache, free_port(), ignore_sigint=True)
    try:
        state = first.wait_ready()
        key = state["api_key"]
        first.record_tree()
        out = asyncio.run(stream_recording(state["ws_url"], cid, recording, speed=0,
                                           headers={"Authorization": f"Bearer {key}"}))
        assert out.errors == [] and len(out.results) >= 5
        before = _get(f"{first.http}/v1/conversations/{cid}", key)
        assert len(before["utterances"]) == len(out.results)
        code, _ = first.stop(signal.SIGINT)
        assert code == 0 and first.left_over() == {}
        assert not (cache / "local-service.json").exists()
    finally:
        first.kill_tree()
    assert (cache / "redis" / "appendonly.aof").stat().st_size > 0

    second = ServeProcess(serve_config, cache, free_port())
    try:
        state = second.wait_ready()
        second.record_tree()
        assert state["api_key"] == key  # the remembered local key is still valid, so it is reused
        after = _get(f"{second.http}/v1/conversations/{cid}", key)
        assert after["utterances"] == before["utterances"]  # the whole call, byte for byte
        assert after["status"] == "ended"
        code, _ = second.stop(signal.SIGTERM)
        assert code == 0 and second.left_over() == {}
    finally:
        second.kill_tree()
