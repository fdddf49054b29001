"""Start the whole service on this machine: local Ray, Redis (embedded unless REDIS_URL), the Serve app."""

from __future__ import annotations

import logging
import os
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCAL_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve" / "local.yaml"
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keeps every listener on loopback
    # a 2-core machine that is also training or testing answers health checks slowly; don't kill the proxy for it
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
}


@dataclass
class LocalService:
    """A running tracker service; use as a context manager or call stop()."""

    host: str = "127.0.0.1"
    port: int = 8000
    args: dict[str, Any] = field(default_factory=dict)
    num_cpus: int | None = None
    api_key: str | None = None  # a key to reuse if it is valid in this Redis; else start() creates one
    key_tenant: str = "default"
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
        keys = KeyStore(self.redis_url, config.store.key_prefix)
        try:
            if not (self.api_key and keys.verify(self.api_key)):
                self.api_key, _ = keys.create(self.key_tenant, name="local (tracker serve)")
        finally:
            keys.redis.close()

    def start(self, timeout_s: float = 300.0) -> "LocalService":
        for k, v in RAY_ENV.items():
            os.environ.setdefault(k, v)
        import ray
        from ray import serve

        from services.app import build_app

        if not self.args.get("redis_url") and not os.environ.get("REDIS_URL"):
            from tracker.context.redis_server import EmbeddedRedis

            self._redis = EmbeddedRedis()
            self._redis.start()
            self.args = {**self.args, "redis_url": self._redis.url}
        self._ensure_key()
        if not ray.is_initialized():
            ray.init(num_cpus=self.num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=False)
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
        import ray
        from ray import serve

        self._running = False
        try:
            serve.shutdown()
        finally:
            if self._ray_started and ray.is_initialized():
                ray.shutdown()
            if self._redis is not None:
                self._redis.stop()
                self._redis = None

    def __enter__(self) -> "LocalService":
        return self if self._running else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def service_from_file(path: str | Path = LOCAL_CONFIG, **overrides: Any) -> LocalService:
    """A LocalService configured from a Serve YAML (configs/serve/local.yaml by default)."""
    from services.config import read_serve_file

    sf = read_serve_file(path)
    args = sf.raw["applications"][0].get("args") or {}
    return LocalService(host=sf.http_host, port=int(overrides.pop("port", sf.http_port)), args={**args, **overrides})


__all__ = ["LocalService", "service_from_file"]
