"""Build the data folder's layout from the official downloads.

- `prepare_ravdess(src, out)`: the RAVDESS speech release (``Audio_Speech_Actors_01-24.zip`` or
  its unpacked folder: ``Actor_XX/03-01-EE-II-SS-RR-AA.wav``, 48 kHz 16-bit) -> ``ravdess_16k/``:
  ``Actor_XX/<same stem>.flac`` at 16 kHz mono 16-bit plus ``labels.csv`` (columns in
  docs/data-format.md), exactly the layout `tracker.data.ravdess` reads.
- `prepare_meld(src, out)`: a checkout of declare-lab/MELD -> ``meld/`` and ``emorynlp/`` (the
  train and dev CSVs; the test splits are held out by design, see docs/data-format.md).

The RAVDESS file name is seven two-digit fields: modality (03 = audio only), vocal channel
(01 = speech, 02 = song), emotion (01 neutral, 02 calm, 03 happy, 04 sad, 05 angry, 06 fearful,
07 disgust, 08 surprised), intensity (01 normal, 02 strong), statement (01 "Kids are talking by
the door", 02 "Dogs are sitting by the door"), repetition (01, 02) and actor (01-24; odd male,
even female).
"""

from __future__ import annotations

import csv
import io
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tracker.data.paths import DatasetError

RAVDESS_EMOTIONS = {"01": "neutral", "02": "calm", "03": "happy", "04": "sad", "05": "angry", "06": "fearful",
                    "07": "disgust", "08": "surprised"}
RAVDESS_INTENSITY = {"01": "normal", "02": "strong"}
RAVDESS_STATEMENTS = {"01": "Kids are talking by the door", "02": "Dogs are sitting by the door"}
LABEL_COLUMNS = ("path", "speaker", "gender", "emotion", "emotion_code", "intensity", "statement_id",
                 "statement_text", "repetition", "duration_s")
TARGET_RATE = 16000
_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)\.wav$", re.IGNORECASE)


@dataclass(frozen=True)
class RavdessClip:
    """One clip of the release, parsed from its file name."""

    stem: str
    emotion_code: str
    intensity_code: str
    statement_code: str
    repetition: str
    actor: int

    @classmethod
    def parse(cls, name: str) -> "RavdessClip | None":
        """The clip named `name` if it is audio-only speech (03-01-...), else None; a malformed speech name raises."""
        m = _NAME.match(Path(name).name)
        if m is None:
            return None
        modality, channel, emotion, intensity, statement, repetition, actor = m.groups()
        if modality != "03" or channel != "01":
            return None  # video, or song
        where = f"{name}: "
        if emotion not in RAVDESS_EMOTIONS:
            raise DatasetError(where + f"emotion code {emotion} is not 01-08")
        if intensity not in RAVDESS_INTENSITY or statement not in RAVDESS_STATEMENTS or repetition not in ("01", "02"):
            raise DatasetError(where + "intensity, statement and repetition must be 01 or 02")
        if not 1 <= int(actor) <= 24:
            raise DatasetError(where + f"actor {actor} is not 01-24")
        return cls(Path(name).stem, emotion, intensity, statement, repetition, int(actor))

    @property
    def speaker(self) -> str:
        return f"actor_{self.actor:02d}"

    @property
    def relpath(self) -> str:
        return f"Actor_{self.actor:02d}/{self.stem}.flac"

    def row(self, duration_s: float) -> dict[str, str]:
        return {
            "path": self.relpath, "speaker": self.speaker, "gender": "male" if self.actor % 2 else "female",
            "emotion": RAVDESS_EMOTIONS[self.emotion_code], "emotion_code": self.emotion_code,
            "intensity": RAVDESS_INTENSITY[self.intensity_code], "statement_id": self.statement_code,
            "statement_text": RAVDESS_STATEMENTS[self.statement_code], "repetition": self.repetition,
            "duration_s": f"{duration_s:.3f}",
        }


def _release_files(src: Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """(name inside the release, reader of its bytes) for every .wav of a zip or a folder."""
    if src.is_file():
        if not zipfile.is_zipfile(src):
            raise DatasetError(f"{src} is neither a folder nor a zip file")
        with zipfile.ZipFile(src) as z:
            for info in z.infolist():
                if not info.is_dir() and info.filename.lower().endswith(".wav"):
                    yield info.filename, (lambda n=info.filename: z.read(n))
        return
    if not src.is_dir():
        raise FileNotFoundError(f"{src} not found: give the RAVDESS zip (Audio_Speech_Actors_01-24.zip) or its folder")
    for path in sorted(src.rglob("*")):
        if path.is_file() and path.suffix.lower() == ".wav":
            yield str(path.relative_to(src)), path.read_bytes


def to_16k_mono(samples: np.ndarray, rate: int) -> np.ndarray:
    """float samples (n,) or (n, channels) at `rate` -> (m,) float32 at 16 kHz (polyphase, as the shared copy)."""
    from math import gcd

    from scipy.signal import resample_poly

    x = np.asarray(samples, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if rate != TARGET_RATE:
        g = gcd(TARGET_RATE, rate)
        x = resample_poly(x, TARGET_RATE // g, rate // g)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def prepare_ravdess(src: str | Path, out: str | Path, actors: set[int] | None = None, overwrite: bool = False,
                    progress: Callable[[int, str], None] | None = None) -> Path:
    """Convert the release at `src` into `out` (normally ``<data dir>/ravdess_16k``); returns labels.csv.

    Clips are written to a temporary folder beside `out` and moved into place at the end, so an
    interrupted run never leaves a half-built folder that looks complete. `actors` keeps only
    those actor numbers (e.g. 1-20 to leave 21-24 held out).
    """
    import soundfile as sf

    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DatasetError(f"{out} already exists and is not empty (pass overwrite=True / --overwrite to rebuild it)")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows, seen = [], {}
    for name, read in _release_files(src):
        clip = RavdessClip.parse(name)
        if clip is None or (actors is not None and clip.actor not in actors):
            continue
        if clip.stem in seen:
            raise DatasetError(f"{name}: the clip {clip.stem} appears twice in the release (also {seen[clip.stem]})")
        if Path(name).parent.name and Path(name).parent.name.lower() != f"actor_{clip.actor:02d}":
            raise DatasetError(f"{name}: file of actor {clip.actor:02d} in folder {Path(name).parent.name}")
        seen[clip.stem] = name
        try:
            samples, rate = sf.read(io.BytesIO(read()), dtype="float32", always_2d=False)
        except RuntimeError as exc:
            raise DatasetError(f"{name}: not a readable WAV file ({exc})") from None
        audio = to_16k_mono(samples, rate)
        target = tmp / clip.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        sf.write(target, audio, TARGET_RATE, subtype="PCM_16", format="FLAC")
        rows.append(clip.row(len(audio) / TARGET_RATE))
        if progress:
            progress(len(rows), clip.relpath)
    if not rows:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetError(f"{src}: no RAVDESS speech clips (03-01-EE-II-SS-RR-AA.wav) found")
    rows.sort(key=lambda r: r["path"])
    with (tmp / "labels.csv").open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out / "labels.csv"


MELD_FILES = {  # in a declare-lab/MELD checkout -> in the data folder
    "data/MELD/train_sent_emo.csv": "meld/train_sent_emo.csv",
    "data/MELD/dev_sent_emo.csv": "meld/dev_sent_emo.csv",
    "data/emorynlp/emorynlp_train_final.csv": "emorynlp/emorynlp_train_final.csv",
    "data/emorynlp/emorynlp_dev_final.csv": "emorynlp/emorynlp_dev_final.csv",
}


def prepare_meld(src: str | Path, root: str | Path, overwrite: bool = False) -> list[Path]:
    """Copy MELD's and EmoryNLP's train and dev CSVs from a declare-lab/MELD checkout into `root`."""
    src, root = Path(src), Path(root)
    missing = [rel for rel in MELD_FILES if not (src / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"{src} is not a declare-lab/MELD checkout: missing {', '.join(missing)}")
    written = []
    for rel, target in MELD_FILES.items():
        dest = root / target
        if dest.exists() and not overwrite:
            raise DatasetError(f"{dest} already exists (pass overwrite=True / --overwrite to replace it)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, dest)
        written.append(dest)
    return written


__all__ = ["LABEL_COLUMNS", "RavdessClip", "prepare_meld", "prepare_ravdess", "to_16k_mono"]
