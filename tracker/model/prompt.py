"""The prompt around the pseudo tokens, and where the answer is read.

Layout of one row (token ids; ``P`` marks the n pseudo-token slots the adapter fills)::

    <bos> <Multimodal> P P ... P </Multimodal>
    Conversation so far:
    Monica: ...                 (the last k utterances of the same conversation, past only)
    Phoebe: ...
    Current utterance:
    Monica: What?
    Which emotion does Monica express in the current utterance? Choose one of: neutral, joy, ...
    Answer:                     <- the label is read from the next-token logits here

With ``layout: context_first`` the past turns come first and the pseudo tokens after them::

    <bos> Conversation so far:
    Monica: ...                 (the window of tracker.model.context_window; each line capped)
    <Multimodal> P P ... P </Multimodal>
    Current utterance:
    ...                         (as above)

so everything up to the end of the last context line (``EncodedPrompt.prefix_len``) depends on
the past turns only, and its key/value cache can be kept between utterances
(tracker.model.incremental). The shipped model (default-v3) uses ``context_first``.

Each label's first token (normally `` neutral`` with its leading space) must differ from every
other label's; if the spaced forms collide (digit labels under a digit-splitting tokenizer) the
answer prefix takes the space and the bare words are scored instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from tracker.config import ConfigError
from tracker.labels import LabelSet
from tracker.types import Turn


@dataclass
class PromptConfig:
    """Wording and lengths of the prompt."""

    context_turns: int = 3  # k: past utterances of the conversation shown; 0 for none
    max_context_tokens: int = 192  # older context lines are dropped first to fit
    max_utterance_tokens: int = 64  # the target utterance is cut to this many tokens
    instruction: str = "Which emotion does {speaker} express in the current utterance? Choose one of: {labels}."
    msa_instruction: str = (
        "How positive or negative is {speaker}'s current utterance? Answer with one digit from 1 "
        "(very negative) to 7 (very positive)."
    )
    answer_prefix: str = "Answer:"
    open_tag: str = "<Multimodal>"
    close_tag: str = "</Multimodal>"
    # pseudo_first: <bos> <Multimodal> P..P </Multimodal> context utterance ... (default-v2 and earlier);
    # context_first: <bos> context <Multimodal> P..P </Multimodal> utterance ... (a cacheable prefix).
    layout: str = "pseudo_first"
    # m: the window of past turns slides in blocks between m and context_turns (M) turns
    # (tracker.model.context_window); None = M, always the last M turns.
    context_min_turns: int | None = None
    # Each context line is cut to this many tokens (0 = no cap). context_first needs a cap with
    # context_turns x cap within max_context_tokens, so no line is ever dropped to fit.
    max_context_line_tokens: int = 0

    def __post_init__(self) -> None:
        if self.layout not in ("pseudo_first", "context_first"):
            raise ConfigError(f"layout: must be pseudo_first or context_first, got {self.layout!r}")
        if self.context_min_turns is not None and not 0 <= self.context_min_turns <= self.context_turns:
            raise ConfigError(
                f"context_min_turns: must be between 0 and context_turns ({self.context_turns}), got {self.context_min_turns}"
            )
        if self.max_context_line_tokens < 0:
            raise ConfigError(f"max_context_line_tokens: must be >= 0, got {self.max_context_line_tokens}")
        if self.layout == "context_first" and self.context_turns and self.max_context_line_tokens == 0:
            raise ConfigError("max_context_line_tokens: layout context_first needs a cap per context line (e.g. 48)")
        if self.context_turns < 0:
            raise ConfigError(f"context_turns: must be >= 0, got {self.context_turns}")
        if self.max_context_tokens < 0 or self.max_utterance_tokens <= 0:
            raise ConfigError("max_context_tokens must be >= 0 and max_utterance_tokens > 0")
        for name in ("instruction", "msa_instruction"):
            try:
                getattr(self, name).format(speaker="x", labels="y")
            except (KeyError, IndexError) as exc:
                raise ConfigError(f"{name}: only {{speaker}} and {{labels}} may be used, got {exc}") from None


@dataclass
class EncodedPrompt:
    """Token ids of one row and where the pseudo tokens go and the answer is read."""

    input_ids: list[int]
    pseudo_start: int  # index of the first pseudo-token slot
    n_pseudo: int
    answer_index: int  # position whose next-token logits hold the answer
    utterance_ids: list[int]  # the target utterance's own tokens (for the adapter's text feature)
    prefix_len: int = 0  # the first prefix_len ids depend on the past turns only (cacheable)


def _clean(text: str) -> str:
    return " ".join(str(text).split())


class PromptBuilder:
    """Turns (utterance, speaker, past turns) into token ids for one forward pass."""

    def __init__(self, tokenizer, label_set: LabelSet, config: PromptConfig | None = None, n_pseudo: int = 8):
        self.tokenizer = tokenizer
        self.label_set = label_set
        self.config = config or PromptConfig()
        self.n_pseudo = n_pseudo
        self.label_token_ids, self.answer_space = self._label_tokens()
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        self._bos = bos
        self._prefix = bos + self._encode(self.config.open_tag)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad if pad is not None else 0)
        if label_set.name == "msa7":
            instruction = self.config.msa_instruction
        else:
            instruction = self.config.instruction
        self._instruction = instruction
        self._labels_text = ", ".join(label_set.words)
        self._header = self._encode("Conversation so far:\n")
        self._newline = self._encode("\n")
        cfg = self.config
        if cfg.layout == "context_first" and cfg.context_turns:
            worst = len(self._header) + cfg.context_turns * cfg.max_context_line_tokens
            if worst > cfg.max_context_tokens:
                raise ConfigError(
                    f"max_context_tokens: layout context_first needs at least {worst} "
                    f"(header + context_turns x max_context_line_tokens) so no context line is dropped, "
                    f"got {cfg.max_context_tokens}"
                )

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _label_tokens(self) -> tuple[list[int], bool]:
        """First token of each label word, with a leading space if that keeps them distinct."""
        for space in (" ", ""):
            firsts = []
            for word in self.label_set.words:
                ids = self._encode(space + word)
                firsts.append(ids[0] if ids else None)
            if None not in firsts and len(set(firsts)) == len(firsts):
                return firsts, space == ""
        raise ValueError(
            f"label set {self.label_set.name!r}: the tokenizer gives two labels the same first token, "
            f"so they cannot be told apart in one forward pass; choose other label words"
        )

    def context_line(self, turn: Turn) -> list[int]:
        """One past turn as ``Speaker: text\\n``, cut to max_context_line_tokens when that is set."""
        cap = self.config.max_context_line_tokens
        if cap == 0:
            return self._encode(f"{_clean(turn.speaker)}: {_clean(turn.text)}\n")
        body = self._encode(f"{_clean(turn.speaker)}: {_clean(turn.text)}")
        return body[: max(1, cap - len(self._newline))] + self._newline

    def context_lines(self, context: Sequence[Turn]) -> list[int]:
        """Token ids of the last k context turns, dropping the oldest to fit max_context_tokens."""
        k = self.config.context_turns
        if k == 0 or not context:
            return []
        lines = [self.context_line(t) for t in list(context)[-k:]]
        header = self._header
        budget = self.config.max_context_tokens - len(header)
        kept: list[list[int]] = []
        for line in reversed(lines):
            if len(line) > budget:
                break
            kept.insert(0, line)
            budget -= len(line)
        if not kept:
            return []
        return header + [tok for line in kept for tok in line]

    def encode(self, text: str, speaker: str = "Speaker", context: Sequence[Turn] = ()) -> EncodedPrompt:
        speaker = _clean(speaker) or "Speaker"
        utterance_ids = self._encode(_clean(text))[: self.config.max_utterance_tokens]
        if not utterance_ids:
            # An utterance with no words (audio only) is shown as "...", so the prompt stays well formed.
            utterance_ids = self._encode("...")
        instruction = self._instruction.format(speaker=speaker, labels=self._labels_text)
        answer = self.config.answer_prefix + (" " if self.answer_space else "")
        if self.config.layout == "context_first":
            ids = list(self._bos)
            ids += self.context_lines(context)
            prefix_len = len(ids)
            ids += self._encode(self.config.open_tag)
            pseudo_start = len(ids)
            ids += [self.pad_token_id] * self.n_pseudo
            ids += self._encode(self.config.close_tag + "\n")
        else:
            ids = list(self._prefix)
            prefix_len = pseudo_start = len(ids)
            ids += [self.pad_token_id] * self.n_pseudo  # slots, overwritten by the adapter's pseudo tokens
            ids += self._encode(self.config.close_tag + "\n")
            ids += self.context_lines(context)
        ids += self._encode("Current utterance:\n" + speaker + ": ")
        ids += utterance_ids
        ids += self._encode("\n" + instruction + "\n" + answer)
        return EncodedPrompt(
            input_ids=ids,
            pseudo_start=pseudo_start,
            n_pseudo=self.n_pseudo,
            answer_index=len(ids) - 1,
            utterance_ids=utterance_ids,
            prefix_len=prefix_len,
        )
