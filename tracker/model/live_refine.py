"""Live refinement state of one conversation: which windows close when, and when an utterance is final.

Transport-free bookkeeping (no model, no Redis): the caller adds each utterance with its base
distribution as it is labelled, runs the LLM over the windows this returns, feeds the window's
logits back, and gets the utterances whose t judgements are now complete. ``end()`` closes the
windows still open, clipped at the last utterance, so every utterance gets its t judgements.

A conversation that resumes on a new connection is restored from its stored records: finalized
utterances stay final (their final result is never stored again), and the windows from the first
one holding the first utterance without a final are run again, so each of those (and each new
utterance) still gets t judgements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from tracker.model.refine import Judgement
from tracker.model.windows import Window, WindowSpec


@dataclass
class LiveUtterance:
    index: int
    utterance_id: str
    speaker: str
    text: str
    base_probs: list[float]
    record: dict[str, Any]  # the interim record as stored
    final: bool = False
    judgements: list[Judgement] = field(default_factory=list)


class LiveRefinement:
    """Receptive-field bookkeeping for one live conversation."""

    def __init__(self, spec: WindowSpec):
        self.spec = spec
        self.utts: list[LiveUtterance] = []
        self._next_window = 0  # windows 0.._next_window-1 are closed

    def __len__(self) -> int:
        return len(self.utts)

    def restore(self, records: Sequence[dict[str, Any]], labels: Sequence[str]) -> list[Window]:
        """Rebuild from stored records (stream order): interims give the utterance order; finals mark done.

        Returns the windows that are already complete but hold an utterance without a final: judge them now.
        """
        finals = {r["utterance_id"] for r in records if r.get("is_final")}
        seen: set[str] = set()
        for r in records:
            uid = r["utterance_id"]
            if uid in seen or (r.get("is_final") and r.get("refined")):
                continue  # a refined final follows its interim, which already placed the utterance
            seen.add(uid)
            probs = [float((r.get("probabilities") or {}).get(lab, 0.0)) for lab in labels]
            u = self._append(uid, r.get("speaker", ""), r.get("text", ""), probs, dict(r))
            u.final = uid in finals
        # run again every window holding the first utterance without a final (or the next new one)
        first_open = next((u.index for u in self.utts if not u.final), len(self.utts))
        self._next_window = max(0, self.spec.windows_of(first_open)[0])
        n, due = len(self.utts), []
        while self.spec.window(self._next_window).start + self.spec.size <= n:  # already complete: judge now
            due.append(self.spec.window(self._next_window, n))
            self._next_window += 1
        return due

    def _append(self, uid: str, speaker: str, text: str, base_probs: Sequence[float], record: dict[str, Any]) -> LiveUtterance:
        u = LiveUtterance(len(self.utts), uid, speaker, text, [float(p) for p in base_probs], record)
        self.utts.append(u)
        return u

    def known(self, utterance_id: str) -> bool:
        return any(u.utterance_id == utterance_id for u in self.utts)

    def add(self, utterance_id: str, speaker: str, text: str, base_probs: Sequence[float],
            record: dict[str, Any]) -> list[Window]:
        """Add the next utterance; returns the windows that close with it (to be judged now)."""
        u = self._append(utterance_id, speaker, text, base_probs, record)
        out = []
        for k in self.spec.closing_after(u.index):
            if k >= self._next_window:
                out.append(self.spec.window(k, len(self.utts)))
                self._next_window = k + 1
        return out

    def end(self) -> list[Window]:
        """Close every window still open (clipped at the last utterance)."""
        n = len(self.utts)
        windows = self.spec.windows(n)
        out = windows[self._next_window :]
        self._next_window = len(windows)
        return out

    def members(self, window: Window) -> list[LiveUtterance]:
        return [self.utts[i] for i in window.members]

    def needs_forward(self, window: Window) -> bool:
        """A window whose members are all final already changes nothing."""
        return any(not self.utts[i].final for i in window.members)

    def add_judgements(self, window: Window, logits: np.ndarray) -> list[LiveUtterance]:
        """Record a window's logits (members, L); returns utterances that now have all t judgements."""
        logits = np.asarray(logits)
        if logits.shape[0] != len(window.members):
            raise ValueError(f"window {window.index}: {logits.shape[0]} rows of logits for {len(window.members)} members")
        done = []
        for row, i in enumerate(window.members):
            u = self.utts[i]
            if u.final:
                continue
            first = self.spec.windows_of(i)[0]
            u.judgements.append(Judgement(logits[row], window.position(i), window.index - first))
            if len(u.judgements) >= self.spec.t:
                done.append(u)
        return done

    def pending(self) -> list[LiveUtterance]:
        """Utterances without a final yet, in order."""
        return [u for u in self.utts if not u.final]
