"""Reading and writing adapter checkpoints: ``config.json`` plus ``model.safetensors``.

Only JSON and safetensors are ever read (no pickles). Every failure raises
:class:`CheckpointError` with a message that says which file and why, and shapes are checked
against the model from the safetensors header before any tensor is loaded.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "tracker.mse_adapter"
FORMAT_VERSION = 1
MAX_CONFIG_BYTES = 1 << 20  # a config.json larger than 1 MiB is not one of ours


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


def write_checkpoint(directory: str | Path, config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> Path:
    """Write config and weights; each file is written to a temporary name and renamed into place."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".weights-")
    os.close(fd)
    save_file(tensors, tmp, metadata={"format": FORMAT})
    os.replace(tmp, directory / WEIGHTS_NAME)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config-")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False)
        fh.write("\n")
    os.replace(tmp, directory / CONFIG_NAME)
    return directory


def read_config(directory: str | Path, expected_format: str = FORMAT) -> dict[str, Any]:
    """The checkpoint's config.json, checked to be one of ours (``expected_format``) and not too new."""
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"checkpoint {directory}: directory does not exist")
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory}: not a directory")
    path = directory / CONFIG_NAME
    if not path.exists():
        raise CheckpointError(f"checkpoint {directory}: {CONFIG_NAME} is missing, so this is not an adapter checkpoint")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size} bytes is too large for an adapter config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt, not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != expected_format:
        kind = "adapter" if expected_format == FORMAT else expected_format
        raise CheckpointError(f"{path}: not a tracker {kind} config (format is {data.get('format') if isinstance(data, dict) else None!r}, expected {expected_format!r})")
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {data['format_version']} is newer than this tracker reads ({FORMAT_VERSION})")
    return data


def read_weights(directory: str | Path, expected: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Load the weights, after checking names and shapes against `expected` from the header alone."""
    from safetensors import SafetensorError, safe_open

    path = Path(directory) / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(f"checkpoint {directory}: {WEIGHTS_NAME} is missing (the weights file)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            missing = sorted(set(expected) - keys)
            unexpected = sorted(keys - set(expected))
            if missing:
                raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            if unexpected:
                raise CheckpointError(f"{path}: unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
            for name in sorted(keys):
                shape = tuple(fh.get_slice(name).get_shape())
                if shape != tuple(expected[name]):
                    raise CheckpointError(
                        f"{path}: tensor {name} has shape {shape}, the model expects {tuple(expected[name])}"
                    )
            return {name: fh.get_tensor(name) for name in keys}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def verify_files(directory: str | Path) -> dict[str, Any]:
    """Check a checkpoint without building a model: its config, and that the safetensors header
    parses and every tensor's bytes lie inside the file (a truncated file fails here). Returns the config.

    Shapes against the model are checked when the model loads it (:func:`read_weights`).
    """
    from safetensors import SafetensorError, safe_open

    config = read_config(directory)
    path = Path(directory) / WEIGHTS_NAME
    if not path.exists():
        raise CheckpointError(f"checkpoint {directory}: {WEIGHTS_NAME} is missing (the weights file)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            if not list(fh.keys()):
                raise CheckpointError(f"{path}: holds no tensors")
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({exc})") from None
    return config
