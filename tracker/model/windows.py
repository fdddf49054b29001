"""Receptive fields: overlapping windows of a conversation so that every utterance lies in exactly t of them.

With window size ``w`` and stride ``s`` (``w % s == 0``), ``t = w // s``. Window ``k`` (k = 0, 1, ...)
nominally covers utterances ``[k*s - (w - s), k*s + s)``, i.e. window starts are the multiples of ``s``
from ``-(w - s)`` on, and every window is clipped to the conversation ``[0, n)``:

* The first utterances are covered by windows that start before the conversation (their nominal start is
  negative) and are therefore shorter: with w=6, s=2 utterance 0 lies in windows [0,2), [0,4) and [0,6).
* The last utterances are covered by windows that run past the end and are clipped there; live, such a
  window closes when the conversation ends instead of when its last nominal utterance arrives.

Utterance ``i`` lies in the windows whose nominal start is a multiple of ``s`` in ``(i - w, i]``: exactly
``t`` of them, whatever ``n`` is (for a very short conversation several clipped windows can hold the same
utterances; each still counts as one of the t judgements). An utterance's *position* in a window is
counted from the nominal start (``i - start``, in ``0..w-1``), so an edge window's judgement keeps the
position the utterance would have had in the full window.

Live, window k closes once utterance ``k*s + s - 1`` has arrived (its last nominal member), so utterance
``i``'s last window closes ``s*floor(i/s) + w - 1 - i`` utterances after it: between ``w - s`` and ``w - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """One receptive field: nominal ``[start, start + size)`` clipped to ``[lo, hi)``."""

    index: int  # k: 0 for the first window of the conversation
    start: int  # nominal start (may be negative)
    lo: int  # first utterance index inside the conversation
    hi: int  # one past the last utterance index inside the conversation

    @property
    def members(self) -> range:
        return range(self.lo, self.hi)

    def position(self, i: int) -> int:
        """Utterance i's position within the nominal window (0..w-1)."""
        return i - self.start


@dataclass(frozen=True)
class WindowSpec:
    """Window size ``w`` and stride ``s``; ``t = w // s`` windows hold each utterance."""

    size: int
    stride: int

    def __post_init__(self) -> None:
        if self.size < 1 or self.stride < 1:
            raise ValueError(f"window size and stride must be >= 1, got w={self.size}, s={self.stride}")
        if self.size % self.stride:
            raise ValueError(f"window size {self.size} must be a multiple of the stride {self.stride} (t = w/s)")

    @property
    def t(self) -> int:
        return self.size // self.stride

    def first_start(self) -> int:
        return -(self.size - self.stride)

    def window(self, k: int, n: int | None = None) -> Window:
        """Window k clipped to ``[0, n)`` (``n=None``: only clipped at 0, the end not known yet)."""
        start = self.first_start() + k * self.stride
        hi = start + self.size if n is None else min(start + self.size, n)
        return Window(index=k, start=start, lo=max(0, start), hi=hi)

    def windows(self, n: int) -> list[Window]:
        """All windows of a conversation of n utterances, in order of their nominal start."""
        if n < 0:
            raise ValueError(f"conversation length must be >= 0, got {n}")
        out = []
        k = 0
        while n and self.first_start() + k * self.stride < n:
            out.append(self.window(k, n))
            k += 1
        return out

    def windows_of(self, i: int) -> list[int]:
        """Indices k of the t windows holding utterance i (in any conversation long enough to hold i)."""
        last = i // self.stride + (self.t - 1)  # the window whose nominal start is s*floor(i/s)
        return list(range(last - self.t + 1, last + 1))

    def closing_after(self, i: int) -> list[int]:
        """Windows that close when utterance i arrives live (those whose last nominal member is i)."""
        if (i + 1) % self.stride:
            return []
        k = (i + 1 - self.stride) // self.stride  # nominal end k*s + s - 1 == i
        return [k]

    def final_delay(self, i: int) -> int:
        """Utterances that must arrive after i before its last window closes live."""
        return self.stride * (i // self.stride) + self.size - 1 - i
