"""Conversation-affine routing of EmotionModel calls (Ray Serve's request-router API).

Each EmotionModel replica keeps the prompt-prefix key/value caches of the conversations it labelled
(tracker.model.incremental); a conversation whose next utterance lands on another replica rebuilds
its prefix there. :class:`ConversationAffinityRouter` sends every call that names a
``conversation_id`` keyword (``label``, ``forget``) to the replica that wins rendezvous hashing
(highest-random-weight) on that id among the running replicas. When replicas come or go only the
conversations of the replica that left (or a share for the one that came) move; when the chosen
replica is full (``max_ongoing_requests``) the request goes to the least loaded other replica.
Calls without a conversation (``info``, ``set_batching``) take the less loaded of two random replicas.
"""

from __future__ import annotations

import hashlib
import random
from typing import Iterable, List, Optional

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

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


class ConversationAffinityRouter(RequestRouter):
    """A conversation's model calls go to its rendezvous-hash home replica; the rest by two random choices.

    Not built on Serve's FIFO mixin on purpose: that hands the replica found for one request to the
    oldest pending request (of any conversation), which would break affinity exactly under load.
    """

    async def choose_replicas(
        self,
        candidate_replicas: List[RunningReplica],
        pending_request: Optional[PendingRequest] = None,
    ) -> List[List[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all full: back off, do not spin
        if not candidate_replicas:
            return []
        key = route_key(pending_request)
        if key is None:  # power of two choices: the less loaded of two random replicas
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        order = [by_id[i] for i in rendezvous_order(key, by_id)]
        # ranked: the home first; if it is full, the least loaded of the others
        return [[order[0]], order[1:]] if len(order) > 1 else [order]
