"""Where the shared data lives, and the error the readers raise for bad specs or missing files."""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "TRACKER_DATA_DIR"


class DatasetError(ValueError):
    """An unknown dataset or split, a held-out split, or a malformed source file."""


def data_dir() -> Path:
    """The folder holding ``meld/``, ``emorynlp/`` and ``ravdess_16k/``.

    ``$TRACKER_DATA_DIR`` if set; else ``shared/data`` beside the repository checkout (found from
    this file's location, which works for the editable install); else ``../shared/data`` relative
    to the working directory. When neither default exists the first is returned, so that errors
    name a sensible path.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    repo_root = Path(__file__).resolve().parents[2]
    beside_repo = (repo_root.parent / "shared" / "data").resolve()
    if beside_repo.is_dir():
        return beside_repo
    from_cwd = (Path.cwd().parent / "shared" / "data").resolve()
    if from_cwd.is_dir():
        return from_cwd
    return beside_repo


def require_file(path: Path) -> Path:
    """`path` if it is a file, else a FileNotFoundError that says how to point at the data."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found; set {ENV_VAR} to the folder holding meld/, emorynlp/ and ravdess_16k/ "
            f"(default: shared/data beside the repository checkout)"
        )
    return path
