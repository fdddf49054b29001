"""Configuration of the Ray Serve application (the `args` of configs/serve/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tracker.alerts.rule import EscalationConfig
from tracker.alerts.webhooks import WebhookConfig
from tracker.audio.asr import AsrConfig
from tracker.audio.features import FeatureExtractorConfig
from tracker.audio.vad import VadConfig
from tracker.config import ConfigError, load_dataclass
from tracker.context.store import StoreConfig
from services.auth import AuthConfig
from tracker.stream.session import SessionLimits


@dataclass
class DeploymentOptions:
    """Ray Serve options of one deployment; fractional CPUs let all four share a small machine."""

    num_replicas: int = 1
    num_cpus: float = 0.25
    num_gpus: float = 0.0  # from config; 0 on CPU machines and in tests
    max_ongoing_requests: int = 32
    # Ray custom resources each replica needs, e.g. {"tracker_model": 1}: only nodes started with
    # `ray start --resources='{"tracker_model": N}'` take it (a GPU node pool; docs/deploy.md).
    resources: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ConfigError(f"num_replicas: must be >= 1, got {self.num_replicas}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("num_cpus/num_gpus: must be >= 0")
        if self.max_ongoing_requests < 1:
            raise ConfigError(f"max_ongoing_requests: must be >= 1, got {self.max_ongoing_requests}")
        for name, amount in self.resources.items():
            if not name or name in ("CPU", "GPU", "memory", "object_store_memory"):
                raise ConfigError(f"resources.{name}: a custom resource name (use num_cpus/num_gpus for CPU and GPU)")
            if amount <= 0:
                raise ConfigError(f"resources.{name}: must be > 0, got {amount}")

    def ray_options(self) -> dict[str, Any]:
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        if self.resources:
            actor["resources"] = dict(self.resources)
        return {"num_replicas": self.num_replicas, "ray_actor_options": actor,
                "max_ongoing_requests": self.max_ongoing_requests}


@dataclass
class ModelServing:
    """Which model the EmotionModel deployment serves and how it batches."""

    checkpoint: str = "default"  # "default" = the model shipped in the package, else a checkpoint directory
    backbone: str = ""  # override the backbone the checkpoint names ("" = keep it)
    dtype: str = "auto"
    device: str = "cpu"  # cuda where num_gpus > 0
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.01
    num_threads: int = 0  # torch threads per replica (0 = torch's default)
    # Models with prompt layout context_first keep each conversation's prompt-prefix key/value
    # cache between utterances (tracker.model.incremental), at most kv_cache_mb per replica (LRU).
    incremental: bool = True
    kv_cache_mb: int = 1024
    # A conversation's cache unused this long is dropped (a call that went away without `stop`;
    # `stop` drops it at once). 0 = only the LRU byte budget evicts.
    kv_cache_idle_s: float = 900.0
    # Send each conversation's model calls to the same replica (services.routing), so its cache stays warm.
    affinity_routing: bool = True

    def __post_init__(self) -> None:
        if self.kv_cache_mb < 0:
            raise ConfigError(f"kv_cache_mb: must be >= 0, got {self.kv_cache_mb}")
        if self.kv_cache_idle_s < 0:
            raise ConfigError(f"kv_cache_idle_s: must be >= 0, got {self.kv_cache_idle_s}")
        if self.max_batch_size < 1:
            raise ConfigError(f"max_batch_size: must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0:
            raise ConfigError("batch_wait_timeout_s: must be >= 0")


@dataclass
class RefineServing:
    """Conversation-level refinement (interim then final labels); off unless a refiner checkpoint is named."""

    checkpoint: str = ""  # "" = off (every label is final at once), "default" = the shipped refiner, else a directory
    window: int = 0  # w and s the refiner must have been trained with (0 = take the checkpoint's)
    stride: int = 0

    def __post_init__(self) -> None:
        if self.window < 0 or self.stride < 0:
            raise ConfigError("refine.window/refine.stride: must be >= 0 (0 = the checkpoint's)")
        if self.window and self.stride and self.window % self.stride:
            raise ConfigError(f"refine.window: {self.window} must be a multiple of refine.stride {self.stride}")


@dataclass
class SpeechServing(AsrConfig):
    """The recognizer the FeatureExtractor runs when `asr` is on (tracker.audio.asr.AsrConfig) and its batching:
    utterances of all conversations wait up to `batch_wait_timeout_s` to share one recognizer pass."""

    threads: int = 1  # CTranslate2 threads per FeatureExtractor replica
    batch_wait_timeout_s: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_wait_timeout_s < 0:
            raise ConfigError(f"batch_wait_timeout_s: must be >= 0, got {self.batch_wait_timeout_s!r}")

    def asr_config(self) -> AsrConfig:
        from dataclasses import fields

        return AsrConfig(**{f.name: getattr(self, f.name) for f in fields(AsrConfig)})


@dataclass
class Deployments:
    ingress: DeploymentOptions = field(default_factory=lambda: DeploymentOptions(num_cpus=0.1, max_ongoing_requests=256))
    feature_extractor: DeploymentOptions = field(default_factory=lambda: DeploymentOptions(num_cpus=0.2))
    emotion_model: DeploymentOptions = field(default_factory=lambda: DeploymentOptions(num_cpus=1.0))
    context_aggregator: DeploymentOptions = field(default_factory=lambda: DeploymentOptions(num_cpus=0.1, max_ongoing_requests=256))
    refiner: DeploymentOptions = field(default_factory=lambda: DeploymentOptions(num_cpus=0.5))
    # delivers webhooks (only deployed when alerts.webhooks has endpoints); one replica is enough
    webhooks: DeploymentOptions = field(default_factory=lambda: DeploymentOptions(num_cpus=0.05))


@dataclass
class AppConfig:
    """Everything the Serve application needs; `configs/serve/local.yaml` holds one as `args`."""

    model: ModelServing = field(default_factory=ModelServing)
    redis_url: str = ""  # "" = $REDIS_URL, else a private embedded Redis started with the app
    # On a cluster every replica must reach one Redis: true refuses to fall back to a private
    # embedded Redis when neither redis_url nor $REDIS_URL is set (configs/serve/cluster.yaml).
    require_redis_url: bool = False
    store: StoreConfig = field(default_factory=StoreConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    features: FeatureExtractorConfig = field(default_factory=lambda: FeatureExtractorConfig(use_cache=False))
    limits: SessionLimits = field(default_factory=SessionLimits)
    auth: AuthConfig = field(default_factory=AuthConfig)
    deployments: Deployments = field(default_factory=Deployments)
    refine: RefineServing = field(default_factory=RefineServing)
    alerts: EscalationConfig = field(default_factory=EscalationConfig)  # the escalation rule (docs/alerts.md)
    webhooks: WebhookConfig = field(default_factory=WebhookConfig)  # where alert events are POSTed
    # speech recognition of segments without a client transcript: on | off | auto (on when the model's
    # weights and faster-whisper are installed); `speech` says which Whisper and how it runs
    asr: str | bool = "auto"
    speech: SpeechServing = field(default_factory=SpeechServing)

    def __post_init__(self) -> None:
        from tracker.audio.hearing import asr_mode

        self.asr = asr_mode(self.asr)
        if self.deployments.emotion_model.max_ongoing_requests < self.model.max_batch_size:
            raise ConfigError(
                "deployments.emotion_model.max_ongoing_requests: must be at least model.max_batch_size "
                f"({self.model.max_batch_size}) or batches can never fill"
            )


def load_app_config(args: dict[str, Any] | None) -> AppConfig:
    return load_dataclass(AppConfig, args or {})


@dataclass
class ServeFile:
    """A Serve config file as `serve run` reads it, plus our view of its first application."""

    http_host: str
    http_port: int
    app: AppConfig
    raw: dict[str, Any]


def read_serve_file(path: str | Path) -> ServeFile:
    """Read configs/serve/*.yaml (the Ray Serve config format) and validate our application's args."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"serve config not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    apps = raw.get("applications") or []
    if not apps or not isinstance(apps[0], dict):
        raise ConfigError(f"{path}: applications: expected a list with the tracker application")
    http = raw.get("http_options") or {}
    try:
        app = load_dataclass(AppConfig, apps[0].get("args") or {}, prefix="applications[0].args")
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return ServeFile(http_host=str(http.get("host", "127.0.0.1")), http_port=int(http.get("port", 8000)), app=app, raw=raw)
