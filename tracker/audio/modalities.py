"""The acoustic inputs a recognizer was built for, computed from one clip in one place.

An adapter may read several acoustic modalities; each names its ``source`` (see
``tracker.model.adapter.ModalityConfig``):

- ``egemaps_lld``: eGeMAPSv02 low-level descriptors, (frames, 25), one frame per 10 ms;
- ``egemaps_functionals``: eGeMAPSv02 functionals over the whole clip, (1, 88).

Training (``tracker.training.examples``), replay and the FeatureExtractor deployment all call
:class:`ModalityFeatures`, so a model sees the same features offline and live.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from tracker.audio.features import FeatureExtractor, FeatureExtractorConfig

SOURCES: dict[str, str] = {"egemaps_lld": "lld", "egemaps_functionals": "functionals"}


class ModalityFeatures:
    """Computes ``{modality name: (frames, features) array}`` for the named acoustic modalities."""

    def __init__(self, modalities: Mapping[str, str] | Iterable, base: FeatureExtractorConfig | None = None):
        """`modalities`: {name: source} or ModalityConfig-like objects with ``name`` and ``source``."""
        if not isinstance(modalities, Mapping):
            modalities = {m.name: getattr(m, "source", "egemaps_lld") for m in modalities}
        base = base or FeatureExtractorConfig()
        self.sources = dict(modalities)
        self._extractors: dict[str, FeatureExtractor] = {}
        for name, source in self.sources.items():
            if source not in SOURCES:
                raise ValueError(f"modality {name!r}: unknown source {source!r} (known: {', '.join(SOURCES)})")
            if source not in self._extractors:
                self._extractors[source] = FeatureExtractor(dataclasses.replace(base, level=SOURCES[source]))

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def from_file(self, path: str | Path, start: float | None = None, end: float | None = None) -> dict[str, np.ndarray]:
        by_source = {s: ex.process_file(path, start, end) for s, ex in self._extractors.items()}
        return {name: by_source[source] for name, source in self.sources.items()}

    def from_signal(self, signal: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        by_source = {s: ex.process_signal(signal, sample_rate) for s, ex in self._extractors.items()}
        return {name: by_source[source] for name, source in self.sources.items()}
