"""The in-memory form every reader produces: conversations of utterances, plus past-only context.

Readers renumber ``Utterance.index`` to the position 0..n-1 within its conversation after ordering
(source ids can have gaps: MELD and EmoryNLP drop rows), and keep the source's own ids in
``utterance_id`` and ``extra``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from tracker.context_window import window_turns
from tracker.types import Turn, UtteranceInput


@dataclass
class Utterance:
    """One utterance of a conversation.

    ``start_s``/``end_s`` delimit the segment of ``audio_path`` (seconds; ``None`` means from the
    start / to the end of the file). They are never set without ``audio_path``: episode timestamps
    of MELD and EmoryNLP (whose audio is not available here) live in ``extra``.
    """

    conversation_id: str
    utterance_id: str
    index: int
    speaker: str
    text: str
    label: str | None = None
    audio_path: str | None = None
    start_s: float | None = None
    end_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def turn(self) -> Turn:
        """This utterance as a context turn for later utterances."""
        return Turn(speaker=self.speaker, text=self.text)

    def to_input(self, context: Iterable[Turn] = ()) -> UtteranceInput:
        """The recognizer input for this utterance (text only; audio features are added elsewhere)."""
        return UtteranceInput(text=self.text, speaker=self.speaker, context=tuple(context))


@dataclass
class Conversation:
    """An ordered list of utterances sharing one ``conversation_id``."""

    conversation_id: str
    utterances: list[Utterance] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.utterances)

    def __iter__(self) -> Iterator[Utterance]:
        return iter(self.utterances)


def build_conversation(conversation_id: str, utterances: Iterable[Utterance]) -> Conversation:
    """A conversation from already-ordered utterances, renumbering ``index`` to 0..n-1."""
    utts = list(utterances)
    for i, utt in enumerate(utts):
        if utt.conversation_id != conversation_id:
            raise ValueError(f"utterance {utt.utterance_id!r} belongs to {utt.conversation_id!r}, not {conversation_id!r}")
        utt.index = i
    return Conversation(conversation_id=conversation_id, utterances=utts)


def to_inputs(
    conversation: Conversation, k: int | None = None, min_k: int | None = None
) -> Iterator[tuple[Utterance, list[Turn]]]:
    """Yield ``(utterance, context)`` for each utterance, in order.

    The context is built from earlier utterances of this conversation only (the tracker runs live,
    so it never sees the future), at most the last ``k`` of them (``None``: all; ``0``: none).
    With ``min_k`` the window slides in blocks between ``min_k`` and ``k`` turns, exactly as the
    service computes it (tracker.model.context_window).
    """
    if k is not None and k < 0:
        raise ValueError(f"k must be >= 0 or None, got {k}")
    turns: list[Turn] = []
    for utt in conversation.utterances:
        if utt.conversation_id != conversation.conversation_id:
            raise ValueError(
                f"utterance {utt.utterance_id!r} belongs to {utt.conversation_id!r}, "
                f"not {conversation.conversation_id!r}"
            )
        if k is None:
            context = list(turns)
        else:
            context = window_turns(turns, len(turns), k, min_k)
        yield utt, context
        turns.append(utt.turn())


def iter_examples(
    conversations: Iterable[Conversation], k: int | None = None, min_k: int | None = None
) -> Iterator[tuple[Utterance, list[Turn]]]:
    """`to_inputs` over many conversations, one after another."""
    for conversation in conversations:
        yield from to_inputs(conversation, k, min_k)


def count_utterances(conversations: Iterable[Conversation]) -> int:
    return sum(len(c) for c in conversations)
