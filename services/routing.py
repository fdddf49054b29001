"""Conversation-affine routing of EmotionModel calls (Ray Serve's request-router API).

Each EmotionModel replica keeps the prompt-prefix key/value caches of the conversations it labelled
(tracker.model.incremental); a conversation whose next utterance lands on another replica rebuilds
its prefix there. :class:`ConversationAffinityRouter` sends every call that names a
``conversation_id`` keyword (``label``, ``forget``) to the replica that wins rendezvous hashing
(highest-random-weight) on that id among the running replicas. When replicas come or go only the
conversations of the replica that left (or a share for the one that came) move; when the chosen
replica is full (``max_ongoing_requests``) or gone, the request falls back to the default
power-of-two-choices pick. Calls without a conversation (``info``, ``set_batching``) route as usual.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, List, Optional

from ray.serve.request_router import PendingRequest, RunningReplica
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter

ROUTE_KEY = "conversation_id"  # the keyword argument that carries the conversation (tenant/conversation)


def rendezvous_weight(key: str, replica: str) -> int:
    """The weight of `replica` for `key`: the replica with the highest weight serves the key."""
    return int.from_bytes(hashlib.blake2b(f"{key}\x1f{replica}".encode(), digest_size=8).digest(), "big")


def rendezvous_order(key: str, replicas: Iterable[str]) -> list[str]:
    """Replica ids in preference order for `key` (first = its home)."""
    return sorted(replicas, key=lambda r: rendezvous_weight(key, r), reverse=True)


def route_key(pending_request: Optional[PendingRequest]) -> str | None:
    if pending_request is None:
        return None
    key = (pending_request.kwargs or {}).get(ROUTE_KEY)
    return key if isinstance(key, str) and key else None


class ConversationAffinityRouter(PowerOfTwoChoicesRequestRouter):
    """A conversation's model calls go to its rendezvous-hash home replica; else power of two choices."""

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        fallback = await super().choose_replicas(candidate_replicas, pending_request)
        key = route_key(pending_request)
        if key is None or not candidate_replicas:
            return fallback
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        home = by_id[rendezvous_order(key, by_id)[0]]
        return [[home]] + fallback  # ranked: the home first; if it is full, the default choice
