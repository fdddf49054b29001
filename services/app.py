"""The Ray Serve application: Ingress -> FeatureExtractor, EmotionModel, ContextAggregator (and, when
configured, the RefinerModel and the AlertDispatcher that delivers webhooks).

``serve run configs/serve/local.yaml`` imports :func:`build_app` with the file's ``args``;
``tracker serve`` does the same in-process after starting Ray and Redis.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application

from services.config import AppConfig, load_app_config
from services.deployments import ContextAggregator, EmotionModel, FeatureExtractor
from services.ingress import Ingress

_EMBEDDED = []  # keeps an embedded Redis started by build_app alive for the process's lifetime


def resolve_redis_url(config: AppConfig) -> str:
    """The configured URL, else $REDIS_URL, else a private embedded Redis started now."""
    if config.redis_url:
        return config.redis_url
    if os.environ.get("REDIS_URL"):
        return os.environ["REDIS_URL"]
    from tracker.context.redis_server import EmbeddedRedis

    server = EmbeddedRedis()
    server.start()
    _EMBEDDED.append(server)
    os.environ["REDIS_URL"] = server.url
    return server.url


def verify_checkpoint(config: AppConfig) -> None:
    """Config JSON and safetensors header of the served checkpoint; raises CheckpointError."""
    from tracker.model.checkpoint import verify_files
    from tracker.model.default import default_checkpoint

    verify_files(default_checkpoint() if config.model.checkpoint == "default" else config.model.checkpoint)


def model_label_set(config: AppConfig) -> dict[str, Any]:
    from tracker.model.checkpoint import read_config
    from tracker.model.default import default_checkpoint

    path = default_checkpoint() if config.model.checkpoint == "default" else config.model.checkpoint
    return read_config(path)["label_set"]


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Compose the four deployments; `args` is an AppConfig as a mapping (validated here)."""
    config = load_app_config(args)
    args = dict(args or {})
    verify_checkpoint(config)  # a corrupt checkpoint stops the deploy here, with the file and the reason
    redis_url = resolve_redis_url(config)
    d = config.deployments
    features = FeatureExtractor.options(**d.feature_extractor.ray_options()).bind(args)
    model = EmotionModel.options(**d.emotion_model.ray_options()).bind(args)
    context = ContextAggregator.options(**d.context_aggregator.ray_options()).bind(args, redis_url, model_label_set(config))
    extra = {}
    if config.refine.checkpoint:  # conversation-level refinement: interim, then final labels
        from services.refinement import RefinerModel

        extra["refiner"] = RefinerModel.options(**d.refiner.ray_options()).bind(args)
    if config.webhooks.endpoints:  # alert events POSTed from the Redis outbox (docs/alerts.md)
        from services.deployments import AlertDispatcher

        extra["webhooks"] = AlertDispatcher.options(**d.webhooks.ray_options()).bind(args, redis_url)
    return Ingress.options(**d.ingress.ray_options()).bind(features, model, context, {**args, "redis_url": redis_url}, **extra)
