"""Names of the acoustic modality sources a model can read, parsed without loading any extractor.

On the ground floor so that ``tracker.model`` (an adapter validating its config) does not import
``tracker.audio``'s extractors; :mod:`tracker.audio.modalities` builds the extractors. A Whisper
source is checked against the packaged models' registry (``tracker.audio.whisper_models``, data
only, imported when such a name is parsed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
