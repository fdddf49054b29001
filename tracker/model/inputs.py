"""What the recognizer takes for one utterance."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np


@dataclass(frozen=True)
class Turn:
    """One past utterance of the conversation, as shown in the prompt's context."""

    speaker: str
    text: str


@dataclass
class UtteranceInput:
    """An utterance to label: its text, speaker, past context and optional frame features.

    ``features`` maps a modality name (``audio``) to a (frames, features) array; a modality that
    is absent is simply not in the mapping.
    """

    text: str
    speaker: str = "Speaker"
    context: Sequence[Turn] = ()
    features: Mapping[str, np.ndarray] = field(default_factory=dict)
