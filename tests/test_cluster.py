"""A real two-node Ray cluster on one machine, the app deployed with `serve deploy`, a node lost mid-call.

The head node and a second node are started with the `ray start` CLI (each with its own temp dir
and ports, the second with its own custom resource), a Debian `redis-server` is the shared store,
and the app is deployed from a YAML generated out of configs/serve/cluster.yaml with the `serve
deploy` CLI. The model deployment has two replicas, each needing one unit of the custom resource
`tracker_model` that both nodes carry, so one replica sits on each node. While voiced calls stream
over the WebSocket, the second node is killed outright (SIGKILL of its raylet's whole process
tree: a machine that vanishes, not a drain). The calls must end with every utterance finalized
exactly once, on the wire and in Redis; a replacement node then joins, Serve puts the lost
replica back on it, and another call goes through the restored cluster.

The ingress has a replica on each node too (a test-only custom resource, one unit per node), so the
calls whose WebSocket went to node2's ingress replica lose their connection: the client reconnects
with `resume` as docs/protocol.md describes, and the head's replica takes the call over.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.conftest import SUPPORT_CALL, free_port, save_tiny_checkpoint
from tracker.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "configs" / "serve" / "cluster.yaml"
RAY_CLI = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]
SERVE_CLI = [sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]

TURNS = SUPPORT_CALL


# ---------------------------------------------------------------------------------- the config (fast)

def test_cluster_config_places_the_model_by_custom_resource_and_needs_a_shared_redis(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    from services.app import resolve_redis_url
    from services.config import read_serve_file

    sf = read_serve_file(CLUSTER_YAML)
    ServeDeploySchema.model_validate(sf.raw)  # what `serve deploy` checks before sending it
    opts = sf.app.deployments.emotion_model.ray_options()
    assert opts["ray_actor_options"]["resources"] == {"tracker_model": 1.0}
    assert "num_gpus" not in opts["ray_actor_options"]  # 0 GPUs in this file
    assert "resources" not in sf.app.deployments.ingress.ray_options()["ray_actor_options"]
    assert sf.raw["proxy_location"] == "EveryNode" and sf.app.require_redis_url
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(ConfigError, match="redis_url: require_redis_url"):
        resolve_redis_url(sf.app)  # never a private embedded Redis on a cluster
    monkeypatch.setenv("REDIS_URL", "redis://redis-host:6379/0")
    assert resolve_redis_url(sf.app) == "redis://redis-host:6379/0"


@pytest.mark.parametrize("resources, message", [({"GPU": 1}, "resources.GPU: a custom resource"),
                                                ({"tracker_model": 0}, "resources.tracker_model: must be > 0")])
def test_bad_custom_resources_are_named(resources, message):
    from services.config import load_app_config

    with pytest.raises(ConfigError, match=message):
        load_app_config({"deployments": {"emotion_model": {"resources": resources}}})


# ---------------------------------------------------------------------------------- processes

def cluster_env(redis_url: str) -> dict[str, str]:
    from tracker.ray_env import RAY_ENV

    env = {**os.environ, **RAY_ENV, "REDIS_URL": redis_url, "PYTHONPATH": str(REPO)}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "1"  # "0" (the single-machine default) forbids a second node
    # the GCS notices a vanished node after 3 missed health checks 1 s apart (default: 5 x 3 s)
    env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
               RAY_health_check_timeout_ms="1000")
    # the one proxy (both "machines" share one HTTP port) sends connections to either node's ingress
    # replica, as a load balancer in front of a proxy per node would; by default it prefers its own node's
    env["RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"] = "0"
    return env


def _kill_tree(root_pid: int, pgid: int, marker: str, sig: int) -> None:
    """Signal a node's processes: its process group, every descendant, and anything naming its temp dir."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(root_pid)
        procs[root.pid] = root
        procs.update({p.pid: p for p in root.children(recursive=True)})
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(p.pid) == pgid or marker in " ".join(p.info["cmdline"] or []):
                procs[p.pid] = p
        except (psutil.Error, OSError):
            continue
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


class RayNode:
    """One `ray start --block` node in its own process group and temp dir."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        # Ray's socket paths must stay under 107 bytes: a short temp dir of our own
        self.temp_dir = tempfile.mkdtemp(prefix=f"trk-{name}-", dir="/tmp")
        self.name = name
        self.node_id = ""  # set once the node has joined
        self.log = open(log_dir / f"ray-{name}.log", "w")
        ports = ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                 "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                 "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
                 "--min-worker-port", "0", "--max-worker-port", "0"]  # 0: workers take ports the OS hands out
        self.proc = subprocess.Popen(
            [*RAY_CLI, "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", self.temp_dir,
             "--object-store-memory", str(150 * 2**20), "--disable-usage-stats", *ports, *args],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def kill(self, graceful_s: float = 0.0) -> None:
        """SIGKILL the node's whole process tree (after a SIGTERM and `graceful_s` if > 0)."""
        if graceful_s > 0 and self.alive():
            _kill_tree(self.proc.pid, self.proc.pid, self.temp_dir, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(graceful_s)
        _kill_tree(self.proc.pid, self.proc.pid, self.temp_dir, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.log.close()

    def cleanup(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class Cluster:
    """Head + second node + redis-server; everything stopped by `close()`, whatever state it is in."""

    def __init__(self, work: Path):
        self.work = work
        self.nodes: list[RayNode] = []
        self.head: RayNode | None = None
        self.node2: RayNode | None = None
        self.redis: subprocess.Popen | None = None
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.http_port = free_port()
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start_redis(self) -> None:
        exe = "/usr/bin/redis-server" if os.access("/usr/bin/redis-server", os.X_OK) else shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)", pytrace=False)
        data = self.work / "redis"
        data.mkdir()
        self.redis = subprocess.Popen(
            [exe, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes",
             "--appendfsync", "everysec", "--save", ""],
            stdout=open(self.work / "redis.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        import redis

        deadline = time.time() + 30
        while True:
            try:
                redis.Redis.from_url(self.redis_url).ping()
                return
            except redis.ConnectionError:
                if time.time() > deadline or self.redis.poll() is not None:
                    raise
                time.sleep(0.2)

    def _start_node(self, name: str, args: list[str], joined, attempts: int = 3, timeout: float = 180) -> RayNode:
        """`ray start` until it is up and `joined()` holds; on a loaded machine Ray gives a node only 30 s
        to register with the GCS, so a node that times out is killed and started again."""
        for attempt in range(1, attempts + 1):
            node = RayNode(f"{name}-{attempt}", args(), cluster_env(self.redis_url), self.work)
            self.nodes.append(node)
            up = wait_until(lambda: "Ray runtime started" in node.log_text() and joined(), timeout, node)
            if up:
                return node
            print(f"ray start of {name}, attempt {attempt}: not up; log tail:\n{node.log_text()[-1500:]}")
            node.kill()
        pytest.fail(f"`ray start` of {name} did not come up in {attempts} attempts (logs in {self.work})")

    def start_head(self) -> RayNode:
        def args() -> list[str]:
            self.gcs_port, self.dashboard_port = free_port(), free_port()  # fresh ones on every attempt
            return ["--head", "--port", str(self.gcs_port), "--num-cpus", "4",
                    "--resources", json.dumps({"head": 1, "tracker_model": 1, "ingress_slot": 1}),
                    "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port())]

        return self._start_node("head", args, lambda: _http_ok(f"{self.dashboard}/api/version") and self.alive_nodes())

    def start_worker(self, name: str) -> RayNode:
        before = {n["node_id"] for n in self.alive_nodes()}

        def new() -> list[str]:
            return [n["node_id"] for n in self.alive_nodes()
                    if n["node_id"] not in before and n["resources_total"].get("node2")]

        def args() -> list[str]:
            return ["--address", f"127.0.0.1:{self.gcs_port}", "--num-cpus", "4",
                    "--resources", json.dumps({"node2": 1, "tracker_model": 1, "ingress_slot": 1})]

        node = self._start_node(name, args, lambda: len(new()) == 1)
        node.node_id = new()[0]
        return node

    def alive_nodes(self) -> list[dict[str, Any]]:
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.dashboard, raise_on_missing_output=False)
        except Exception:
            return []
        return [{"node_id": n.node_id, "resources_total": n.resources_total} for n in nodes if n.state == "ALIVE"]

    def serve(self, *args: str, timeout: float = 300) -> str:
        run = subprocess.run([*SERVE_CLI, *args, "--address", self.dashboard], env=cluster_env(self.redis_url),
                             capture_output=True, text=True, timeout=timeout)
        assert run.returncode == 0, f"serve {' '.join(args)} failed:\n{run.stdout}\n{run.stderr}"
        return run.stdout

    def serve_details(self) -> dict[str, Any]:
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        return ServeSubmissionClient(self.dashboard).get_serve_details()

    def close(self) -> None:
        for node in reversed(self.nodes):  # the workers first, then the head (GCS last)
            with contextlib.suppress(Exception):
                node.kill(graceful_s=5.0 if node.alive() else 0.0)
        if self.redis is not None:
            self.redis.terminate()
            try:
                self.redis.wait(10)
            except subprocess.TimeoutExpired:
                self.redis.kill()
                self.redis.wait(5)
        for node in self.nodes:
            node.cleanup()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except Exception:
        return False


def wait_until(cond, timeout: float, node: RayNode, every: float = 1.0) -> bool:
    """True once `cond()` holds; False if the node's `ray start` exits or `timeout` passes first."""
    deadline = time.time() + timeout
    while not cond():
        if not node.alive() or time.time() > deadline:
            return False
        time.sleep(every)
    return node.alive()


def wait_for(cond, timeout: float, what: str, node: RayNode | None = None, every: float = 1.0) -> None:
    deadline = time.time() + timeout
    while not cond():
        if node is not None and not node.alive():
            log = node.log_text()[-3000:]
            pytest.fail(f"waiting for {what}: `ray start` of {node.name} exited ({node.proc.returncode}):\n{log}")
        if time.time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start_redis()
        c.head = c.start_head()
        c.node2 = c.start_worker("node2")
        yield c
    finally:
        c.close()


def deploy_yaml(cluster: Cluster, checkpoint: Path) -> Path:
    """configs/serve/cluster.yaml, sized for a 2-core test machine and pointed at the tiny checkpoint."""
    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    raw["proxy_location"] = "HeadOnly"  # both nodes share one machine: one proxy, one HTTP port
    raw["http_options"] = {"host": "127.0.0.1", "port": cluster.http_port}
    args = raw["applications"][0]["args"]
    args["model"].update(checkpoint=str(checkpoint), dtype="fp32", max_batch_size=4, num_threads=1)
    args["asr"] = "off"  # the calls bring their transcripts
    d = args["deployments"]
    # one ingress replica per node (each node has one `ingress_slot`): the calls on node2's lose their connection
    d["ingress"] = {"num_replicas": 2, "num_cpus": 0.1, "resources": {"ingress_slot": 1}}
    d["feature_extractor"] = {"num_replicas": 1, "num_cpus": 0.1}
    d["context_aggregator"] = {"num_replicas": 1, "num_cpus": 0.1}
    d["emotion_model"].update(num_replicas=2, num_cpus=0.5, max_ongoing_requests=16)  # resources kept: one per node
    path = cluster.work / "serve.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def replicas(details: dict[str, Any], deployment: str) -> list[dict[str, Any]]:
    app = (details.get("applications") or {}).get("tracker") or {}
    return list(((app.get("deployments") or {}).get(deployment) or {}).get("replicas") or [])


def running_nodes(cluster: Cluster, deployment: str = "EmotionModel") -> list[str]:
    return sorted(r["node_id"] for r in replicas(cluster.serve_details(), deployment) if r["state"] == "RUNNING")


def app_running(cluster: Cluster) -> bool:
    try:
        app = cluster.serve_details()["applications"]["tracker"]
    except Exception:
        return False
    return app["status"] == "RUNNING" and all(d["status"] == "HEALTHY" for d in app["deployments"].values())


# ---------------------------------------------------------------------------------- the test

def stored_finals(redis_url: str, cid: str) -> list[dict[str, Any]]:
    """The conversation's final records, read straight from its Redis stream."""
    import redis

    from tracker.context.schema import decode_entry

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = list(r.scan_iter(match=f"*{cid}*stream*"))
    assert len(keys) == 1, keys
    return [rec for rec in (decode_entry(i, f) for i, f in r.xrange(keys[0])) if rec["is_final"]]


def check_call(cluster: Cluster, cid: str, outcome, truth: list[dict[str, Any]]) -> None:
    """Every spoken utterance: exactly one final on the wire and exactly one record in Redis."""
    assert outcome.duplicates == 0 and outcome.errors == [], (outcome.duplicates, outcome.errors)
    finals = [r for r in outcome.results if r["is_final"]]
    for t in truth:
        mine = [r for r in finals if r["speaker"] == t["speaker"]
                and min(r["end_ms"], t["end_ms"]) > max(r["start_ms"], t["start_ms"])]
        assert len(mine) == 1, (cid, t, mine)
        assert mine[0]["text"] == t["text"]
    assert len(finals) == len(truth), [(r["speaker"], r["text"]) for r in finals]
    stored = stored_finals(cluster.redis_url, cid)
    stored_ids = [r["utterance_id"] for r in stored]
    assert len(stored_ids) == len(set(stored_ids)) == len(truth), stored_ids  # 0 duplicated, 0 lost
    assert set(stored_ids) == {r["utterance_id"] for r in finals}
    assert outcome.stopped is not None and outcome.close_code == 1000  # `stop` answered once everything was labelled
    if not outcome.reconnects:  # `stopped.results` counts the finals sent on the last connection
        assert outcome.stopped["results"] == len(truth)


@pytest.mark.service
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_serve_deploy_on_two_nodes_survives_losing_a_node_mid_call(cluster, tiny_backbone, tmp_path):
    from clients.stream_client import Recording, stream_resumable
    from services.auth import KeyStore
    from services.config import read_serve_file
    from tracker.audio.synth import have_espeak, voice_conversation

    if not have_espeak():
        pytest.fail("espeak-ng is not installed (apt-get install espeak-ng)", pytrace=False)
    t0 = time.time()
    ckpt = save_tiny_checkpoint(tiny_backbone, tmp_path / "tiny", seed=0)
    config = deploy_yaml(cluster, ckpt)
    keys = KeyStore(cluster.redis_url, read_serve_file(config).app.store.key_prefix)
    key, _ = keys.create("default", name="cluster test")
    keys.redis.close()
    headers = {"Authorization": f"Bearer {key}"}

    cluster.serve("deploy", str(config))
    wait_for(lambda: app_running(cluster), 420, "the app to be RUNNING after `serve deploy`", cluster.head, every=2)
    wait_for(lambda: _http_ok(f"http://127.0.0.1:{cluster.http_port}/healthz"), 120, "/healthz")
    t_deployed = time.time()
    head_id = next(n["node_id"] for n in cluster.alive_nodes() if n["resources_total"].get("head"))
    both = sorted([head_id, cluster.node2.node_id])
    # one model replica and one ingress replica on each node
    assert running_nodes(cluster) == running_nodes(cluster, "Ingress") == both
    on_node2 = sorted(name for name in ("Ingress", "FeatureExtractor", "EmotionModel", "ContextAggregator")
                      for r in replicas(cluster.serve_details(), name) if r["node_id"] == cluster.node2.node_id)
    print(f"replicas on node2: {on_node2}")

    voiced = voice_conversation(TURNS)
    truth = [{k: u[k] for k in ("speaker", "text", "start_ms", "end_ms")} for u in voiced.utterances]
    rec = Recording(voiced.samples, voiced.sample_rate, voiced.speakers, truth)
    url = f"ws://127.0.0.1:{cluster.http_port}/v1/stream"
    finals_seen = 0
    killed_at: list[float] = []

    def count(msg: dict[str, Any]) -> None:
        nonlocal finals_seen
        if msg.get("type") == "utterance" and msg.get("is_final"):
            finals_seen += 1

    async def calls(cids: list[str], kill_after_finals: int | None):
        async def killer() -> None:
            while finals_seen < kill_after_finals:
                await asyncio.sleep(0.1)
            killed_at.append(time.time())
            await asyncio.to_thread(cluster.node2.kill)  # the machine vanishes mid-call

        async def call(i: int, cid: str):
            await asyncio.sleep(0.5 * i)  # staggered, so the proxy spreads the connections over both ingress replicas
            return await stream_resumable(url, cid, rec, speed=1.0, on_message=count, headers=headers,
                                          max_reconnects=20)

        tasks = [asyncio.create_task(call(i, cid)) for i, cid in enumerate(cids)]
        kill = asyncio.create_task(killer()) if kill_after_finals is not None else None
        try:
            return await asyncio.gather(*tasks)
        finally:
            if kill is not None and not kill.done():
                kill.cancel()  # the calls failed before the kill was due (the assertion below says so)
            elif kill is not None:
                await kill

    # four calls at once; node2 dies once three finals are out (mid-call: most utterances are still to come)
    cids = [f"cl-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    outcomes = asyncio.run(calls(cids, kill_after_finals=3))
    assert killed_at and not cluster.node2.alive()
    for cid, outcome in zip(cids, outcomes):
        check_call(cluster, cid, outcome, truth)
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{cluster.http_port}/healthz", timeout=30).read())
    t_calls = time.time()
    print(f"after the kill: reconnects {[o.reconnects for o in outcomes]}, replica retries {health['replica_retries']}")
    assert sum(o.reconnects for o in outcomes) >= 1  # calls whose ingress was on node2 resumed on the head's
    wait_for(lambda: cluster.node2.node_id not in {n["node_id"] for n in cluster.alive_nodes()}, 120,
             "the GCS to mark node2 dead")
    assert cluster.node2.node_id not in running_nodes(cluster)

    # Serve recovers: a replacement node joins and the lost model replica comes back on it
    node3 = cluster.start_worker("node3")
    restored = sorted([head_id, node3.node_id])
    wait_for(lambda: app_running(cluster) and running_nodes(cluster) == running_nodes(cluster, "Ingress") == restored,
             420, "Serve to restore the model and ingress replicas on the new node", cluster.head, every=2)
    cid = f"cl-{uuid.uuid4().hex[:8]}"
    after = asyncio.run(calls([cid], kill_after_finals=None))[0]
    check_call(cluster, cid, after, truth)
    print(f"timings: deploy {t_deployed - t0:.0f} s, calls with the kill {t_calls - t_deployed:.0f} s, "
          f"recovery + one call {time.time() - t_calls:.0f} s")
