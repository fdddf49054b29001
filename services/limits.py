"""Connection-level limits and the failures worth retrying (pure, no I/O)."""

from __future__ import annotations

import time


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; one token per client frame."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.at = clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def is_replica_failure(exc: BaseException) -> bool:
    """A Ray/Serve error meaning the replica (or its actor) died or is being replaced: retry the request.

    Errors raised by our own code inside a replica arrive as RayTaskError and are not retried.
    """
    try:
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
    except ImportError:  # pragma: no cover - services always run with Ray
        return False
    return isinstance(exc, (RayActorError, ActorUnavailableError, ReplicaUnavailableError, DeploymentUnavailableError))
