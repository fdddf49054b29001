"""Which past turns an utterance sees: a sliding window that moves in blocks, so a prefix cache can be reused.

With ``max_turns = M`` and ``min_turns = m`` (0 <= m <= M) the context of the utterance at
position ``i`` of its conversation (0-based, so it has ``i`` past turns) is turns ``[a(i), i)``::

    s    = M - m + 1                       # how far the anchor jumps
    a(i) = s * max(0, (i - m) // s)

The window grows one turn per utterance from ``m`` to ``M`` turns; the utterance that would see
``M + 1`` turns moves the anchor forward so it sees only the last ``m``. Between two jumps the
context of utterance ``i + 1`` is the context of ``i`` plus turn ``i``, so the key/value cache of
the prompt prefix built for ``i`` extends to ``i + 1`` by appending one line; at a jump it is
rebuilt (once every ``s`` utterances). ``m = M`` (the default) gives ``s = 1``: always the last
``M`` turns, rebuilt every time. The window depends only on ``i`` and the turns, so training data
(tracker.data.records) and the live service compute the same contexts.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def window_start(index: int, max_turns: int, min_turns: int | None = None) -> int:
    """First past turn shown to the utterance at position `index` (0-based) of its conversation."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    if max_turns < 0:
        raise ValueError(f"max_turns must be >= 0, got {max_turns}")
    m = max_turns if min_turns is None else min_turns
    if not 0 <= m <= max_turns:
        raise ValueError(f"min_turns must be in [0, max_turns={max_turns}], got {min_turns}")
    step = max_turns - m + 1
    return step * max(0, (index - m) // step)


def window_length(index: int, max_turns: int, min_turns: int | None = None) -> int:
    """How many past turns the utterance at `index` sees: between min(index, m) and M."""
    return index - window_start(index, max_turns, min_turns)


def window_turns(past: Sequence[T], index: int, max_turns: int, min_turns: int | None = None) -> list[T]:
    """The context of utterance `index` from `past`, the turns just before it (the last ones suffice).

    `past` may hold the whole history (``len(past) == index``) or only its tail (at least the
    window's length, e.g. the last ``max_turns`` fetched from Redis).
    """
    n = window_length(index, max_turns, min_turns)
    if n > len(past):
        raise ValueError(f"utterance {index} needs its last {n} turns, got only {len(past)}")
    return list(past[len(past) - n :]) if n else []
