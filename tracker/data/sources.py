"""What the data folder should hold, where each dataset comes from, and a check of what is there.

One table serves `tracker data check`, the test suite's skip messages and the README, so that
every place that says "data missing" also says where to get it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from tracker.data.paths import ENV_VAR, data_dir


@dataclass(frozen=True)
class DatasetSource:
    """One dataset folder under the data folder: its files and where they come from."""

    name: str
    folder: str  # under the data folder
    files: tuple[str, ...]  # under `folder`; CSVs are counted by rows
    source: str  # where to get it (a sentence)
    prepare: str = ""  # the command that builds the folder from the download, if one is needed
    licence: str = ""

    def where(self) -> str:
        """How to get this dataset, in one line (for error and skip messages)."""
        return self.source + (f"; then `{self.prepare}`" if self.prepare else "")


MELD_REPO = "https://github.com/declare-lab/MELD"
RAVDESS_RECORD = "https://zenodo.org/records/1188976"

SOURCES: dict[str, DatasetSource] = {
    "meld": DatasetSource(
        "meld", "meld", ("train_sent_emo.csv", "dev_sent_emo.csv"),
        f"MELD text and labels: the CSVs in data/MELD/ of the declare-lab/MELD repository ({MELD_REPO})",
        prepare="tracker data prepare meld MELD_CHECKOUT", licence="GPL-3.0",
    ),
    "emorynlp": DatasetSource(
        "emorynlp", "emorynlp", ("emorynlp_train_final.csv", "emorynlp_dev_final.csv"),
        f"EmoryNLP: the CSVs in data/emorynlp/ of the declare-lab/MELD repository ({MELD_REPO})",
        prepare="tracker data prepare meld MELD_CHECKOUT", licence="as stated by the source",
    ),
    "ravdess": DatasetSource(
        "ravdess", "ravdess_16k", ("labels.csv",),
        f"RAVDESS speech: Audio_Speech_Actors_01-24.zip of the Zenodo record 1188976 ({RAVDESS_RECORD}), "
        "Livingstone & Russo (2018)",
        prepare="tracker data prepare ravdess Audio_Speech_Actors_01-24.zip", licence="CC BY-NC-SA 4.0",
    ),
}


def missing_data_message(path: Path, dataset: str | None = None) -> str:
    """Why data tests cannot run and how to fix that: names the folder and where the data comes from."""
    chosen = [SOURCES[dataset]] if dataset else list(SOURCES.values())
    where = "; ".join(f"{s.folder}/: {s.where()}" for s in chosen)
    return (f"shared data not found at {path} (set {ENV_VAR} to the folder holding "
            f"{', '.join(s.folder + '/' for s in SOURCES.values())}); {where}")


@dataclass
class DatasetStatus:
    source: DatasetSource
    folder: Path
    present: dict[str, int | None]  # file -> rows (CSV data rows), None for other files
    missing: list[str]
    clips: int | None = None  # RAVDESS: audio files listed in labels.csv that exist
    clips_missing: int = 0

    @property
    def ok(self) -> bool:
        return not self.missing and not self.clips_missing


def _csv_rows(path: Path) -> int:
    with path.open(encoding="utf-8", newline="") as fh:
        return max(0, sum(1 for _ in csv.reader(fh)) - 1)


def check_data(root: Path | None = None) -> list[DatasetStatus]:
    """What is present in the data folder and what is missing, per dataset (RAVDESS clips included)."""
    root = Path(root) if root is not None else data_dir()
    out = []
    for src in SOURCES.values():
        folder = root / src.folder
        present: dict[str, int | None] = {}
        missing = []
        for name in src.files:
            path = folder / name
            if path.is_file():
                present[name] = _csv_rows(path) if name.endswith(".csv") else None
            else:
                missing.append(name)
        status = DatasetStatus(src, folder, present, missing)
        if src.name == "ravdess" and "labels.csv" in present:
            with (folder / "labels.csv").open(encoding="utf-8", newline="") as fh:
                paths = [row.get("path", "") for row in csv.DictReader(fh)]
            status.clips = sum(1 for p in paths if p and (folder / p).is_file())
            status.clips_missing = len(paths) - status.clips
        out.append(status)
    return out


def format_check(statuses: list[DatasetStatus], root: Path) -> str:
    lines = [f"data folder {root}  (${ENV_VAR} to change it)"]
    for st in statuses:
        mark = "ok     " if st.ok else "MISSING"
        lines.append(f"  {mark} {st.source.folder}/")
        for name, rows in st.present.items():
            lines.append(f"          {name}" + (f"  {rows:,} rows" if rows is not None else ""))
        for name in st.missing:
            lines.append(f"          {name}  missing")
        if st.clips is not None:
            lines.append(f"          audio clips: {st.clips:,} present" +
                         (f", {st.clips_missing:,} listed in labels.csv but missing" if st.clips_missing else ""))
        if not st.ok:
            lines.append(f"          get it: {st.source.where()}")
    return "\n".join(lines)


__all__ = ["SOURCES", "DatasetSource", "DatasetStatus", "check_data", "format_check", "missing_data_message"]
