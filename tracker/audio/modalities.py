"""The acoustic inputs a recognizer was built for, computed from one clip in one place.

An adapter may read several acoustic modalities; each names its ``source`` (see
``tracker.model.adapter.ModalityConfig``):

- ``egemaps_lld``: eGeMAPSv02 low-level descriptors, (frames, 25), one frame per 10 ms;
- ``egemaps_functionals``: eGeMAPSv02 functionals over the whole clip, (1, 88);
- ``whisper_<model>_l<layer>_<pooling>``: the states after encoder block ``layer`` of a packaged
  Whisper model (``base``: d = 512, 6 blocks; ``tiny.en``: d = 384, 4 blocks) over the clip's real
  length, pooled to (1, d) by ``mean`` or (1, 2d) by ``meanstd``; e.g. ``whisper_base_l4_meanstd``
  (1, 1024). See ``tracker.audio.whisper_features``.

Training (``tracker.training.examples``), replay and the FeatureExtractor deployment all call
:class:`ModalityFeatures`, so a model sees the same features offline and live; each source is
cached per clip on disk by audio content and settings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from tracker.audio.features import CachedExtractor, FeatureExtractor, FeatureExtractorConfig
from tracker.config import ConfigError
from tracker.sources import SOURCE_HELP, SOURCES, SourceSpec, parse_source  # noqa: F401  (their home is tracker.sources)

def build_extractor(source: str, base: FeatureExtractorConfig | None = None, threads: int = 1) -> CachedExtractor:
    """The cached extractor of one source; `base` gives the cache settings (and openSMILE's rate)."""
    spec = parse_source(source)
    base = base or FeatureExtractorConfig()
    if spec.kind == "egemaps":
        return FeatureExtractor(dataclasses.replace(base, level=spec.level))
    from tracker.audio.whisper_features import WhisperEncoderFeatures, WhisperFeatureConfig

    return WhisperEncoderFeatures(WhisperFeatureConfig(model=spec.model, layer=spec.layer, pooling=spec.pooling,
                                                       threads=threads, cache_dir=base.cache_dir, use_cache=base.use_cache))


class ModalityFeatures:
    """Computes ``{modality name: (frames, features) array}`` for the named acoustic modalities."""

    def __init__(self, modalities: Mapping[str, str] | Iterable, base: FeatureExtractorConfig | None = None,
                 threads: int = 1):
        """`modalities`: {name: source} or ModalityConfig-like objects with ``name`` and ``source``."""
        if not isinstance(modalities, Mapping):
            modalities = {m.name: getattr(m, "source", "egemaps_lld") for m in modalities}
        self.sources = dict(modalities)
        self._extractors: dict[str, CachedExtractor] = {}
        for name, source in self.sources.items():
            try:
                parse_source(source)
            except ConfigError as exc:
                raise ValueError(f"modality {name!r}: {exc}") from None
            if source not in self._extractors:
                self._extractors[source] = build_extractor(source, base, threads)

    @property
    def names(self) -> list[str]:
        return list(self.sources)

    def from_file(self, path: str | Path, start: float | None = None, end: float | None = None) -> dict[str, np.ndarray]:
        by_source = {s: ex.process_file(path, start, end) for s, ex in self._extractors.items()}
        return {name: by_source[source] for name, source in self.sources.items()}

    def from_signal(self, signal: np.ndarray, sample_rate: int) -> dict[str, np.ndarray]:
        by_source = {s: ex.process_signal(signal, sample_rate) for s, ex in self._extractors.items()}
        return {name: by_source[source] for name, source in self.sources.items()}
