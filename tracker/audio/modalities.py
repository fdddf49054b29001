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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from tracker.audio.features import CachedExtractor, FeatureExtractor, FeatureExtractorConfig
from tracker.config import ConfigError

SOURCES: dict[str, str] = {"egemaps_lld": "lld", "egemaps_functionals": "functionals"}  # eGeMAPS source -> level
_WHISPER = re.compile(r"^whisper_(?P<model>[A-Za-z0-9.\-]+)_l(?P<layer>\d+)_(?P<pooling>meanstd|mean)$")
SOURCE_HELP = "egemaps_lld, egemaps_functionals or whisper_<model>_l<layer>_<mean|meanstd> (e.g. whisper_base_l4_meanstd)"


@dataclass(frozen=True)
class SourceSpec:
    """A parsed feature source: its kind and parameters."""

    name: str
    kind: str  # "egemaps" or "whisper"
    level: str = ""  # egemaps: lld | functionals
    model: str = ""  # whisper: a packaged model name
    layer: int = 0
    pooling: str = ""

    @property
    def feature_dim(self) -> int:
        if self.kind == "egemaps":
            return 25 if self.level == "lld" else 88
        from tracker.audio.whisper_models import PACKAGED

        d = PACKAGED[self.model].d_model
        return 2 * d if self.pooling == "meanstd" else d


def parse_source(source: str) -> SourceSpec:
    """The spec of a source name, or a ConfigError that lists the known forms."""
    if source in SOURCES:
        return SourceSpec(source, "egemaps", level=SOURCES[source])
    m = _WHISPER.match(source) if isinstance(source, str) else None
    if m is None:
        raise ConfigError(f"unknown source {source!r} (known: {SOURCE_HELP})")
    from tracker.audio.whisper_models import PACKAGED

    model, layer = m["model"], int(m["layer"])
    if model not in PACKAGED:
        raise ConfigError(f"feature source {source!r}: unknown Whisper model {model!r} (packaged: {', '.join(PACKAGED)})")
    depth = PACKAGED[model].encoder_layers
    if not 1 <= layer <= depth:
        raise ConfigError(f"feature source {source!r}: Whisper {model} has encoder blocks 1..{depth}, got l{layer}")
    return SourceSpec(source, "whisper", model=model, layer=layer, pooling=m["pooling"])


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
