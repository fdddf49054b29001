"""Finding a Hugging Face causal LM's decoder layers and final norm, and stopping a forward early.

Shared by the recognizer (label head on a middle layer) and the refiner (window slots on a middle layer).
"""

from __future__ import annotations

from torch import nn

from tracker.config import ConfigError


class EarlyExit(Exception):
    """Raised by a forward hook to stop the LLM after the layer a head reads."""


def decoder_layers(llm: nn.Module) -> nn.ModuleList:
    base = llm.base_model
    for path in ("layers", "h", "encoder.layers", "decoder.layers"):
        obj = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ConfigError(f"head_layer: cannot find the decoder layers of {type(base).__name__}; use head_layer 0")


def final_norm(llm: nn.Module) -> nn.Module:
    base = llm.base_model
    for name in ("norm", "final_layernorm", "ln_f"):
        if isinstance(getattr(base, name, None), nn.Module):
            return getattr(base, name)
    return nn.Identity()
