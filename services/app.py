"""The Ray Serve application: Ingress -> FeatureExtractor, EmotionModel, ContextAggregator.

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


def resolve_checkpoint(config: AppConfig) -> str:
    """The served checkpoint's directory (``default`` = the shipped model), resolved once per build."""
    from tracker.model.default import default_checkpoint

    return str(default_checkpoint()) if config.model.checkpoint == "default" else config.model.checkpoint


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Compose the four deployments; `args` is an AppConfig as a mapping (validated here).

    The checkpoint is resolved and verified once here, and the deployments get its path; the context
    window policy is read from it once and bound into the ContextAggregator.
    """
    from ray.serve.config import RequestRouterConfig

    from tracker.config import load_dataclass
    from tracker.model.checkpoint import read_config, verify_files
    from tracker.model.prompt import PromptConfig

    config = load_app_config(args)
    args = dict(args or {})
    path = resolve_checkpoint(config)
    verify_files(path)  # a corrupt checkpoint stops the deploy here, with the file and the reason
    args["model"] = {**(args.get("model") or {}), "checkpoint": path}
    ckpt = read_config(path)
    prompt = load_dataclass(PromptConfig, ckpt["recognizer"].get("prompt") or {}, "prompt")
    window = (prompt.context_turns, prompt.context_min_turns)
    redis_url = resolve_redis_url(config)
    d = config.deployments
    features = FeatureExtractor.options(**d.feature_extractor.ray_options()).bind(args)
    model_options = d.emotion_model.ray_options()
    if config.model.affinity_routing:
        model_options["request_router_config"] = RequestRouterConfig(
            request_router_class="services.routing:ConversationAffinityRouter")
    model = EmotionModel.options(**model_options).bind(args)
    context = ContextAggregator.options(**d.context_aggregator.ray_options()).bind(args, redis_url, ckpt["label_set"], window)
    extra = {}
    if config.refine.checkpoint:  # conversation-level refinement: interim, then final labels
        from services.refinement import RefinerModel

        extra["refiner"] = RefinerModel.options(**d.refiner.ray_options()).bind(args)
    return Ingress.options(**d.ingress.ray_options()).bind(features, model, context, {**args, "redis_url": redis_url}, **extra)
