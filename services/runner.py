"""Start the whole service on this machine: local Ray, Redis (embedded unless REDIS_URL), the Serve app."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tracker.ray_env import RAY_ENV, TRANSPORT_ENV

log = logging.getLogger(__name__)

LOCAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve" / "local.yaml"


@dataclass
class LocalService:
    """A running tracker service; use as a context manager or call stop()."""

    host: str = "127.0.0.1"
    port: int = 8000
    args: dict[str, Any] = field(default_factory=dict)
    num_cpus: int | None = None
    api_key: str | None = None  # a key to reuse if it is valid in this Redis; else start() creates one
    key_tenant: str = "default"
    # The embedded Redis (when no redis_url/REDIS_URL is given) keeps its data here with the
    # append-only file on, so history and API keys survive a restart; None = a throwaway temp dir.
    redis_dir: str | Path | None = None
    key_file: str | Path | None = None  # where the local key is remembered across restarts (mode 0600)
    # Prometheus scrape port of Ray's metrics agent (services/metrics.py, docs/operations.md); None = a
    # free port Ray picks (see `metrics_url` once started). Only used when this object starts Ray.
    metrics_port: int | None = None
    # "serve": every WebSocket message crosses Ray Serve's Python proxy; "haproxy": HAProxy forwards the
    # connection to the Ingress replica's own server (tracker.ray_env.TRANSPORT_ENV). Only used when this
    # object starts Ray; a cluster's transport is set when its nodes start.
    transport: str = "serve"
    _redis: Any = None
    _ray_started: bool = False
    _running: bool = False

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/stream"

    @property
    def metrics_url(self) -> str | None:
        """Where Prometheus scrapes this node's metrics (Ray's metrics export port), once Ray runs."""
        try:
            import ray

            node = ray._private.worker._global_node
            port = node.metrics_export_port if node is not None else None
        except Exception:
            port = None
        return f"http://{self.host}:{port}/metrics" if port else None

    @property
    def auth_headers(self) -> dict[str, str]:
        """Headers that authenticate as the local key (empty when auth is off)."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def redis_url(self) -> str:
        return self.args.get("redis_url") or os.environ.get("REDIS_URL", "")

    def _ensure_key(self) -> None:
        """The embedded default's local key: reuse `api_key` if this Redis knows it, else create one."""
        from services.auth import KeyStore
        from services.config import load_app_config

        config = load_app_config(self.args)
        if not config.auth.enabled:
            self.api_key = None
            return
        remembered = Path(self.key_file) if self.key_file else None
        keys = KeyStore(self.redis_url, config.store.key_prefix)
        try:
            candidates = [self.api_key, _read_secret(remembered) if remembered else None]
            valid = [k for k in candidates if k and keys.verify(k)]
            self.api_key = valid[0] if valid else keys.create(self.key_tenant, name="local (tracker serve)")[0]
        finally:
            keys.redis.close()
        if remembered is not None:
            _write_secret(remembered, self.api_key)

    def start(self, timeout_s: float = 300.0) -> "LocalService":
        """Start Redis, Ray and the app; whatever was started is stopped again if this fails or is interrupted."""
        try:
            return self._start(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout_s: float) -> "LocalService":
        if self.transport not in TRANSPORT_ENV:
            raise ValueError(f"transport: one of {sorted(TRANSPORT_ENV)}, got {self.transport!r}")
        for k, v in RAY_ENV.items():
            os.environ.setdefault(k, v)
        import ray
        from ray import serve

        from services.app import build_app

        if not self.args.get("redis_url") and not os.environ.get("REDIS_URL"):
            from tracker.context.redis_server import EmbeddedRedis

            persistent = self.redis_dir is not None
            self._redis = EmbeddedRedis(self.redis_dir, appendonly=persistent, startup_timeout=120 if persistent else 10,
                                        start=False)
            self._redis.start()
            self.args = {**self.args, "redis_url": self._redis.url}
        self._ensure_key()
        if not ray.is_initialized():
            for k in {k for env in TRANSPORT_ENV.values() for k in env}:
                os.environ.pop(k, None)  # Ray's processes inherit this environment: only the chosen transport
            os.environ.update(TRANSPORT_ENV[self.transport])
            keep = signal.getsignal(signal.SIGTERM)
            extra = {"_metrics_export_port": self.metrics_port} if self.metrics_port else {}
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=False, **extra)
            if threading.current_thread() is threading.main_thread() and keep is not None:
                signal.signal(signal.SIGTERM, keep)  # ray.init makes SIGTERM sys.exit(15); the process's owner decides
            self._ray_started = True
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # start-up chatter is not for users
        serve.start(http_options={"host": self.host, "port": self.port}, logging_config={"log_level": "WARNING"})
        serve.run(build_app(self.args), name="tracker", route_prefix="/", blocking=False)
        self._wait_healthy(timeout_s)
        self._running = True
        return self

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.time() + timeout_s
        last: Exception | None = None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.http_url}/healthz", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except Exception as exc:  # not up yet
                last = exc
            failed = self._deploy_failure()
            if failed:  # e.g. a checkpoint whose shapes do not fit the model: say why, do not wait
                self.stop()
                raise RuntimeError(f"the service failed to deploy: {failed}")
            time.sleep(0.5)
        raise TimeoutError(f"the service did not become healthy within {timeout_s:.0f} s ({last})")

    @staticmethod
    def _deploy_failure() -> str | None:
        from ray import serve

        try:
            app = serve.status().applications.get("tracker")
        except Exception:
            return None
        if app is None or str(app.status) not in ("DEPLOY_FAILED", "ApplicationStatus.DEPLOY_FAILED"):
            return None
        details = [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]
        return (app.message or "") + (" | " + " | ".join(details) if details else "")

    def stop(self) -> None:
        """Stop the app and Serve, then Ray and the embedded Redis if this object started them. Safe to call twice."""
        import ray
        from ray import serve

        self._running = False
        # HAProxy (--transport haproxy) runs as a child of a Serve actor; when the controller does not stop
        # it in time, ray.shutdown kills the actor and the orphan keeps the service port: stop it ourselves
        haproxies = _haproxy_processes() if self._ray_started and self.transport == "haproxy" else []
        try:
            with _console_to(_shutdown_log()):  # Ray reports the actors it kills on the way down: not for the user
                try:
                    if ray.is_initialized():
                        serve.shutdown()
                finally:
                    if self._ray_started and ray.is_initialized():
                        ray.shutdown()
                        self._ray_started = False
        finally:
            _terminate(haproxies)
            if self._redis is not None:
                self._redis.stop()  # SIGTERM: the AOF is fsynced before it exits
                self._redis = None

    def __enter__(self) -> "LocalService":
        return self if self._running else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _shutdown_log() -> str:
    """Where Ray's shutdown messages go: the Ray session's log folder (``-v`` keeps them on the console)."""
    if logging.getLogger().isEnabledFor(logging.INFO):
        return ""
    try:
        import ray

        node = ray._private.worker._global_node
        return os.path.join(node.get_logs_dir_path(), "tracker-shutdown.log") if node is not None else os.devnull
    except Exception:
        return os.devnull


@contextlib.contextmanager
def _console_to(path: str) -> Iterator[None]:
    """Send this process's stdout and stderr (the file descriptors, so C++ and thread output too) to `path`."""
    if not path:
        yield
        return
    import sys

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


def _haproxy_processes() -> list[Any]:
    """The haproxy processes under this one (psutil.Process objects)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name() == "haproxy":
                out.append(p)
        except psutil.Error:
            pass
    return out


def _terminate(procs: list[Any], timeout_s: float = 10.0) -> None:
    """SIGTERM the processes still running, SIGKILL those that outlive `timeout_s`."""
    import psutil

    alive = []
    for p in procs:
        try:
            if p.is_running():  # also false if the pid now belongs to another process
                p.terminate()
                alive.append(p)
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(alive, timeout=timeout_s)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass


def _read_secret(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # a key: owner only
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(value + "\n")


def service_from_file(path: str | Path = LOCAL_CONFIG, **overrides: Any) -> LocalService:
    """A LocalService configured from a Serve YAML (configs/serve/local.yaml by default)."""
    from services.config import read_serve_file

    sf = read_serve_file(path)
    args = sf.raw["applications"][0].get("args") or {}
    return LocalService(host=sf.http_host, port=int(overrides.pop("port", sf.http_port)), args={**args, **overrides})


__all__ = ["LocalService", "service_from_file"]
