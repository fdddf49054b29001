"""Resumable trainer state without pickles: JSON for scalars, safetensors for tensors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "optimizer.safetensors"


def save_state(directory: Path, optimizer: torch.optim.Optimizer, scalars: dict[str, Any]) -> None:
    """Write the optimiser's tensors and the trainer's scalars (JSON written last: it marks completeness)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.random.get_rng_state()}
    for idx, per_param in opt["state"].items():
        for name, value in per_param.items():
            tensors[f"state.{idx}.{name}"] = torch.as_tensor(value).detach().cpu().contiguous()
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".opt-")
    os.close(fd)
    save_file(tensors, tmp)
    os.replace(tmp, directory / STATE_TENSORS)
    payload = {"param_groups": opt["param_groups"], **scalars}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".state-")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(tmp, directory / STATE_JSON)


def load_state(directory: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore the optimiser and torch RNG; return the trainer's scalars."""
    from safetensors.torch import load_file

    scalars = json.loads((directory / STATE_JSON).read_text())
    tensors = load_file(str(directory / STATE_TENSORS))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": scalars.pop("param_groups")})
    if "rng.torch" in tensors:
        torch.random.set_rng_state(tensors["rng.torch"])
    return scalars


def has_state(directory: Path) -> bool:
    return (directory / STATE_JSON).exists() and (directory / STATE_TENSORS).exists()
