"""Dialogue history held in Redis: the per-conversation stream, meta and per-speaker state.

`ConversationStore` / `AsyncConversationStore` are what the live service uses; `ensure_redis`
gives a URL (``$REDIS_URL`` or a private embedded server). Key schema: docs/redis.md.
"""

from .redis_server import EmbeddedRedis, ensure_redis
from .schema import StoreConfig
from .store import AsyncConversationStore, ConversationStore

__all__ = ["AsyncConversationStore", "ConversationStore", "EmbeddedRedis", "StoreConfig", "ensure_redis"]
