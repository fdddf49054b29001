"""Redis-held dialogue history: `ConversationStore` (blocking) and `AsyncConversationStore`.

Both are thin drivers around `ops.Ops`, which holds every operation once; the key schema and
encoding live in `schema`, the atomic writes in `scripts`. See docs/redis.md.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Mapping

import redis
import redis.asyncio

from tracker.labels import MELD7, LabelSet
from tracker.types import Turn

from .ops import Eval, Op, Ops, Step, T
from .schema import StoreConfig
from .scripts import SCRIPTS


__all__ = ["StoreConfig", "ConversationStore", "AsyncConversationStore"]


# Errors of an unreachable Redis (down, restarting, loading its AOF): the call is retried. Every
# step is safe to repeat: reads are reads, the append script (which assigns seq) is idempotent per
# utterance id, END is idempotent, and a repeated NEXT_SEQ only leaves a gap in the seq numbers.
TRANSIENT = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


def _backoff(attempt: int) -> float:
    return min(1.0, 0.05 * 2**attempt)


class _StoreBase:
    def __init__(self, config: StoreConfig | None, label_set: LabelSet, tenant: str) -> None:
        self.config = config or StoreConfig()
        self.label_set = label_set
        self._ops = Ops(self.config, label_set, tenant)
        self.retries = 0  # transient Redis errors survived (for tests and /healthz)

    @property
    def tenant(self) -> str:
        return self._ops.tenant


class ConversationStore(_StoreBase):
    """Dialogue history of many conversations in one Redis, for one tenant (thread-safe)."""

    def __init__(
        self,
        redis_client_or_url: redis.Redis | str,
        config: StoreConfig | None = None,
        label_set: LabelSet = MELD7,
        *,
        tenant: str = "default",
    ) -> None:
        super().__init__(config, label_set, tenant)
        self._owns_client = isinstance(redis_client_or_url, str)
        self.redis: redis.Redis = (
            redis.Redis.from_url(redis_client_or_url) if isinstance(redis_client_or_url, str) else redis_client_or_url
        )
        self._scripts = {name: self.redis.register_script(src) for name, src in SCRIPTS.items()}

    def with_tenant(self, tenant: str) -> "ConversationStore":
        """The same Redis connection pool, another tenant's namespace."""
        return ConversationStore(self.redis, self.config, self.label_set, tenant=tenant)

    def _step(self, step: Step) -> Any:
        deadline, attempt = time.monotonic() + self.config.retry_seconds, 0
        while True:
            try:
                return self._step_once(step)
            except TRANSIENT:
                if time.monotonic() >= deadline:
                    raise
                self.retries += 1
                time.sleep(_backoff(attempt))
                attempt += 1

    def _step_once(self, step: Step) -> Any:
        if isinstance(step, Eval):
            return self._scripts[step.name](keys=list(step.keys), args=list(step.args))
        if len(step.calls) == 1:  # no pipeline: a blocking XREAD must not sit in one
            c = step.calls[0]
            return [getattr(self.redis, c.name)(*c.args, **c.kwargs)]
        pipe = self.redis.pipeline(transaction=False)
        for c in step.calls:
            getattr(pipe, c.name)(*c.args, **c.kwargs)
        return pipe.execute()

    def _run(self, op: Op[T]) -> T:
        try:
            step = next(op)
            while True:
                step = op.send(self._step(step))
        except StopIteration as stop:
            return stop.value

    def append(self, conversation_id: str, record: Mapping[str, Any]) -> tuple[bool, str]:
        """Store `record` once per (utterance_id, is_final); returns (stored_now, entry_id)."""
        return self._run(self._ops.append(conversation_id, record))

    def history(self, conversation_id: str, finals_only: bool = True, count: int | None = None) -> list[dict]:
        return self._run(self._ops.history(conversation_id, finals_only, count))

    def context(self, conversation_id: str, k: int) -> list[Turn]:
        return self._run(self._ops.context(conversation_id, k))

    def context_window(self, conversation_id: str, max_turns: int, min_turns: int | None = None) -> tuple[int, list[Turn]]:
        return self._run(self._ops.context_window(conversation_id, max_turns, min_turns))

    def begin(self, conversation_id: str, utterance_id: str, max_turns: int, min_turns: int | None = None,
              speaker: str | None = None) -> tuple[dict | None, int, list[Turn], dict[str, str] | None]:
        """(stored final or None, index, context window, the speaker's norm state if `speaker` is given)
        of an utterance about to be labelled: one round trip."""
        return self._run(self._ops.begin(conversation_id, utterance_id, max_turns, min_turns, speaker))

    def commit(self, conversation_id: str, record: Mapping[str, Any]) -> dict:
        """Store `record` once (the script assigns ``seq``) and return what is stored: one round trip."""
        return self._run(self._ops.commit(conversation_id, record))

    def list_conversations(self, limit: int = 50) -> list[dict]:
        return self._run(self._ops.list_conversations(limit))

    def count_conversations(self) -> int:
        return self._run(self._ops.count_conversations())

    def admission(self, conversation_id: str) -> tuple[bool, int]:
        """(exists, the tenant's conversation count): one round trip."""
        return self._run(self._ops.admission(conversation_id))

    def get_conversation(self, conversation_id: str, finals_only: bool = True) -> dict | None:
        return self._run(self._ops.get_conversation(conversation_id, finals_only))

    def speaker_state(self, conversation_id: str, speaker: str) -> dict:
        return self._run(self._ops.speaker_state(conversation_id, speaker))

    def end_conversation(self, conversation_id: str) -> bool:
        return self._run(self._ops.end_conversation(conversation_id))

    def delete_conversation(self, conversation_id: str) -> bool:
        """Delete everything stored of the conversation; False if there was nothing."""
        return self._run(self._ops.delete_conversation(conversation_id))

    def run(self, op: Op[T]) -> T:
        """Run an operation written like `ops.Ops`'s (e.g. `tracker.context.alerts.AlertOps`) on this store."""
        return self._run(op)

    def read_since(
        self, conversation_id: str, last_entry_id: str = "0-0", block_ms: int | None = None, count: int = 100
    ) -> list[dict]:
        return self._run(self._ops.read_since(conversation_id, last_entry_id, block_ms, count))

    def next_seq(self, conversation_id: str) -> int:
        return self._run(self._ops.next_seq(conversation_id))

    def get_final(self, conversation_id: str, utterance_id: str) -> dict | None:
        return self._run(self._ops.get_final(conversation_id, utterance_id))

    def ping(self) -> bool:
        return self._run(self._ops.ping())

    def exists(self, conversation_id: str) -> bool:
        return self._run(self._ops.exists(conversation_id))

    def close(self) -> None:
        """Close the client if this store created it from a URL."""
        if self._owns_client:
            self.redis.close()

    def __enter__(self) -> "ConversationStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncConversationStore(_StoreBase):
    """`ConversationStore` for asyncio code (``redis.asyncio``); same methods, awaited."""

    def __init__(
        self,
        redis_client_or_url: redis.asyncio.Redis | str,
        config: StoreConfig | None = None,
        label_set: LabelSet = MELD7,
        *,
        tenant: str = "default",
    ) -> None:
        super().__init__(config, label_set, tenant)
        self._owns_client = isinstance(redis_client_or_url, str)
        self.redis: redis.asyncio.Redis = (
            redis.asyncio.Redis.from_url(redis_client_or_url)
            if isinstance(redis_client_or_url, str)
            else redis_client_or_url
        )
        self._scripts = {name: self.redis.register_script(src) for name, src in SCRIPTS.items()}

    def with_tenant(self, tenant: str) -> "AsyncConversationStore":
        return AsyncConversationStore(self.redis, self.config, self.label_set, tenant=tenant)

    async def _step(self, step: Step) -> Any:
        deadline, attempt = time.monotonic() + self.config.retry_seconds, 0
        while True:
            try:
                return await self._step_once(step)
            except TRANSIENT:
                if time.monotonic() >= deadline:
                    raise
                self.retries += 1
                await asyncio.sleep(_backoff(attempt))
                attempt += 1

    async def _step_once(self, step: Step) -> Any:
        if isinstance(step, Eval):
            return await self._scripts[step.name](keys=list(step.keys), args=list(step.args))
        if len(step.calls) == 1:
            c = step.calls[0]
            return [await getattr(self.redis, c.name)(*c.args, **c.kwargs)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for c in step.calls:
                getattr(pipe, c.name)(*c.args, **c.kwargs)
            return await pipe.execute()

    async def _run(self, op: Op[T]) -> T:
        try:
            step = next(op)
            while True:
                step = op.send(await self._step(step))
        except StopIteration as stop:
            return stop.value

    async def append(self, conversation_id: str, record: Mapping[str, Any]) -> tuple[bool, str]:
        return await self._run(self._ops.append(conversation_id, record))

    async def history(self, conversation_id: str, finals_only: bool = True, count: int | None = None) -> list[dict]:
        return await self._run(self._ops.history(conversation_id, finals_only, count))

    async def context(self, conversation_id: str, k: int) -> list[Turn]:
        return await self._run(self._ops.context(conversation_id, k))

    async def context_window(self, conversation_id: str, max_turns: int, min_turns: int | None = None) -> tuple[int, list[Turn]]:
        return await self._run(self._ops.context_window(conversation_id, max_turns, min_turns))

    async def begin(self, conversation_id: str, utterance_id: str, max_turns: int, min_turns: int | None = None,
                    speaker: str | None = None) -> tuple[dict | None, int, list[Turn], dict[str, str] | None]:
        return await self._run(self._ops.begin(conversation_id, utterance_id, max_turns, min_turns, speaker))

    async def commit(self, conversation_id: str, record: Mapping[str, Any]) -> dict:
        return await self._run(self._ops.commit(conversation_id, record))

    async def list_conversations(self, limit: int = 50) -> list[dict]:
        return await self._run(self._ops.list_conversations(limit))

    async def count_conversations(self) -> int:
        return await self._run(self._ops.count_conversations())

    async def admission(self, conversation_id: str) -> tuple[bool, int]:
        return await self._run(self._ops.admission(conversation_id))

    async def get_conversation(self, conversation_id: str, finals_only: bool = True) -> dict | None:
        return await self._run(self._ops.get_conversation(conversation_id, finals_only))

    async def speaker_state(self, conversation_id: str, speaker: str) -> dict:
        return await self._run(self._ops.speaker_state(conversation_id, speaker))

    async def end_conversation(self, conversation_id: str) -> bool:
        return await self._run(self._ops.end_conversation(conversation_id))

    async def delete_conversation(self, conversation_id: str) -> bool:
        return await self._run(self._ops.delete_conversation(conversation_id))

    async def run(self, op: Op[T]) -> T:
        return await self._run(op)

    async def read_since(
        self, conversation_id: str, last_entry_id: str = "0-0", block_ms: int | None = None, count: int = 100
    ) -> list[dict]:
        return await self._run(self._ops.read_since(conversation_id, last_entry_id, block_ms, count))

    async def next_seq(self, conversation_id: str) -> int:
        return await self._run(self._ops.next_seq(conversation_id))

    async def get_final(self, conversation_id: str, utterance_id: str) -> dict | None:
        return await self._run(self._ops.get_final(conversation_id, utterance_id))

    async def ping(self) -> bool:
        return await self._run(self._ops.ping())

    async def exists(self, conversation_id: str) -> bool:
        return await self._run(self._ops.exists(conversation_id))

    async def aclose(self) -> None:
        if self._owns_client:
            await self.redis.aclose()

    async def __aenter__(self) -> "AsyncConversationStore":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
