"""Data readers: MELD, EmoryNLP, RAVDESS and users' JSONL files, all as `Conversation` lists.

``load_dataset("meld:dev")`` is the one entry point the rest of the project needs; the specs are
listed in docs/data-format.md. Each dataset's test split is held out of the shared data on purpose.
"""

from __future__ import annotations

from pathlib import Path

from tracker.data.emorynlp import read_emorynlp
from tracker.data.jsonl import JsonlFormatError, ValidationError, read_jsonl, validate_jsonl, write_jsonl
from tracker.data.meld import fix_mojibake, read_meld
from tracker.data.paths import ENV_VAR, DatasetError, data_dir
from tracker.data.ravdess import ravdess_split, read_ravdess
from tracker.data.records import Conversation, Utterance, count_utterances, iter_examples, to_inputs
from tracker.labels import EMORYNLP7, MELD7, RAVDESS8, LabelSet

DATASETS: dict[str, tuple[str, ...]] = {
    "meld": ("train", "dev"),
    "emorynlp": ("train", "dev"),
    "ravdess": ("train", "dev"),
}
HELD_OUT = {
    "meld": "MELD's test split",
    "emorynlp": "EmoryNLP's test split",
    "ravdess": "RAVDESS actors 21-24",
}
LABEL_SETS: dict[str, LabelSet] = {"meld": MELD7, "emorynlp": EMORYNLP7, "ravdess": RAVDESS8}


def _is_jsonl_spec(spec: str) -> bool:
    return spec.lower().endswith(".jsonl") or Path(spec).is_file()


def parse_spec(spec: str) -> tuple[str, str]:
    """``"meld:dev"`` -> ``("meld", "dev")``, checking the name and split; a path -> ``("jsonl", path)``."""
    spec = spec.strip()
    if _is_jsonl_spec(spec):
        return "jsonl", spec
    name, sep, split = spec.partition(":")
    name, split = name.strip().lower(), split.strip().lower()
    known = ", ".join(f"{n}:{s}" for n, splits in DATASETS.items() for s in splits)
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {spec!r}: expected one of {known}, or a path to a .jsonl file")
    if not sep or not split:
        raise DatasetError(f"dataset spec {spec!r} needs a split: {' or '.join(f'{name}:{s}' for s in DATASETS[name])}")
    if split == "test":
        raise DatasetError(
            f"{name}:test is held out ({HELD_OUT[name]}): it is deliberately absent from the shared data so "
            f"final figures can be checked independently; tune on {name}:train and select/report on {name}:dev"
        )
    if split not in DATASETS[name]:
        raise DatasetError(f"unknown split {split!r} for {name} (known: {', '.join(DATASETS[name])})")
    return name, split


def dataset_label_set(spec: str) -> LabelSet | None:
    """The label set a named dataset's labels come from (None for JSONL: the user decides)."""
    name, _ = parse_spec(spec)
    return LABEL_SETS.get(name)


def labels_read_as(spec: str, model_label_set: str) -> str:
    """How to read `spec`'s labels for a model over `model_label_set`: RAVDESS folds into meld7."""
    return "meld7" if model_label_set == "meld7" and not _is_jsonl_spec(spec) and parse_spec(spec)[0] == "ravdess" else ""


def load_dataset(spec: str, root: str | Path | None = None, label_set: LabelSet | str | None = None) -> list[Conversation]:
    """The conversations of ``spec``: ``meld:train``, ``meld:dev``, ``emorynlp:train``, ``emorynlp:dev``,
    ``ravdess:train``, ``ravdess:dev`` or a path to a ``.jsonl`` file.

    ``root`` overrides `data_dir`. ``label_set`` restricts a JSONL file's labels; for RAVDESS,
    ``"meld7"`` folds its labels into MELD7.
    """
    name, split = parse_spec(spec)
    base = Path(root) if root is not None else None
    if name == "jsonl":
        path = Path(split).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"JSONL file not found: {path}")
        return read_jsonl(path, label_set=label_set)
    ls_name = label_set.name if isinstance(label_set, LabelSet) else label_set
    if name == "ravdess":
        if ls_name not in (None, RAVDESS8.name, MELD7.name):
            raise DatasetError(f"ravdess labels can be read as ravdess8 or meld7, not {ls_name!r}")
        return read_ravdess(split, root=base, to_meld=ls_name == MELD7.name)
    if ls_name not in (None, LABEL_SETS[name].name):
        raise DatasetError(f"{name} labels are {LABEL_SETS[name].name}, not {ls_name!r}")
    reader = read_meld if name == "meld" else read_emorynlp
    return reader(split, root=base)


__all__ = [
    "Conversation", "Utterance", "to_inputs", "iter_examples", "count_utterances",
    "load_dataset", "labels_read_as", "parse_spec", "dataset_label_set", "data_dir", "DatasetError", "ENV_VAR",
    "read_meld", "read_emorynlp", "read_ravdess", "ravdess_split", "fix_mojibake",
    "read_jsonl", "write_jsonl", "validate_jsonl", "ValidationError", "JsonlFormatError",
]
