"""Where the shared data lives, and the error the readers raise for bad specs or missing files."""

from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


def split_file(dataset: str, split: str, splits: tuple[str, ...], relative: str, root: Path | None = None) -> Path:
    """The CSV of `dataset`'s `split`; a held-out ``test`` split or an unknown one is a clear error."""
    if split == "test":
        raise DatasetError(
            f"{dataset}:{split} is held out: it is deliberately absent from the shared data so final figures can be "
            f"checked independently; tune on {dataset}:train and select/report on {dataset}:dev"
        )
    if split not in splits:
        raise DatasetError(f"unknown {dataset} split {split!r} (known: {', '.join(splits)})")
    return require_file((root or data_dir()) / relative)


@contextmanager
def csv_rows(path: Path, columns: tuple[str, ...]) -> Iterator[csv.DictReader]:
    """A DictReader over `path` after checking it has `columns` (``reader.line_num`` gives line numbers)."""
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or ())]
        if missing:
            raise DatasetError(f"{path}: missing columns {missing}")
        yield reader
