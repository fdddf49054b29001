"""Plain types shared by every room of the library (no torch): what the recognizer takes for one utterance.

They live on the ground floor so that ``tracker.data``, ``tracker.audio``, ``tracker.context`` and
``tracker.stream`` use them without importing ``tracker.model`` (whose package pulls in torch).
"""

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
