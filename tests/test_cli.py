"""The command line: every flag explained, `tracker stream` failing fast, `tracker data` check and prepare."""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
import time
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import REPO, free_port
from tracker_cli import build_parser, main


def walk(parser: argparse.ArgumentParser, path: str = "tracker"):
    """(command path, parser) for the parser and every sub-command under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")


def test_every_option_and_argument_of_every_command_has_help_text():
    missing, commands = [], 0
    for path, parser in walk(build_parser()):
        commands += 1
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert commands >= 12  # the sub-commands and their own sub-commands were walked
    assert missing == []


def test_stream_with_nothing_listening_fails_at_once_with_a_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRACKER_CACHE_DIR", str(tmp_path))  # no local service recorded
    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(1600, dtype=np.int16), 16000)
    port = free_port()
    t0 = time.monotonic()
    code = main(["stream", str(wav), "--url", f"ws://127.0.0.1:{port}/v1/stream"])
    assert code == 1 and time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert f"nothing is listening at 127.0.0.1:{port}" in err and "tracker serve" in err


# -- tracker data ----------------------------------------------------------------------------------


def fake_ravdess_release(path: Path, as_zip: bool) -> list[str]:
    """A small release with the official naming: Actor_XX/03-01-EE-II-SS-RR-AA.wav, 48 kHz 16-bit mono,
    plus a song clip (02 vocal channel), a video-only clip and a macOS resource fork, all to be skipped."""
    rng = np.random.default_rng(0)
    speech = ["03-01-01-01-01-01-01", "03-01-05-02-02-01-01", "03-01-04-01-01-02-02", "03-01-08-02-02-02-21"]
    skipped = ["03-02-05-01-01-01-01", "02-01-05-01-01-01-01"]

    def wav_bytes(seconds: float) -> bytes:
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(48000)
            t = np.arange(int(48000 * seconds)) / 48000
            w.writeframes((8000 * np.sin(2 * np.pi * 220 * t) + rng.normal(0, 50, t.size)).astype("<i2").tobytes())
        return buf.getvalue()

    files = {f"Actor_{int(n[-2:]):02d}/{n}.wav": wav_bytes(1.5 + 0.25 * i) for i, n in enumerate(speech + skipped)}
    files["__MACOSX/Actor_01/._03-01-01-01-01-01-01.wav"] = b"\0\5\26\7junk"
    if as_zip:
        with zipfile.ZipFile(path, "w") as z:
            for name, data in files.items():
                z.writestr(name, data)
    else:
        for name, data in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
    return speech


@pytest.mark.parametrize("as_zip", [True, False], ids=["zip", "folder"])
def test_data_prepare_ravdess_builds_the_16k_layout_and_labels_the_readers_use(tmp_path, monkeypatch, as_zip):
    src = tmp_path / ("Audio_Speech_Actors_01-24.zip" if as_zip else "release")
    if not as_zip:
        src.mkdir()
    speech = fake_ravdess_release(src, as_zip)
    root = tmp_path / "data"
    assert main(["data", "prepare", "ravdess", str(src), "--root", str(root)]) == 0
    folder = root / "ravdess_16k"
    with (folder / "labels.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "speaker", "gender", "emotion", "emotion_code", "intensity", "statement_id",
                             "statement_text", "repetition", "duration_s"]
    assert [r["path"] for r in rows] == sorted(f"Actor_{int(n[-2:]):02d}/{n}.flac" for n in speech)
    angry = next(r for r in rows if r["path"] == "Actor_01/03-01-05-02-02-01-01.flac")
    assert angry == {"path": "Actor_01/03-01-05-02-02-01-01.flac", "speaker": "actor_01", "gender": "male",
                     "emotion": "angry", "emotion_code": "05", "intensity": "strong", "statement_id": "02",
                     "statement_text": "Dogs are sitting by the door", "repetition": "01", "duration_s": "1.750"}
    assert next(r for r in rows if r["speaker"] == "actor_02")["gender"] == "female"
    info = sf.info(folder / angry["path"])
    assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "FLAC")
    assert info.frames == 1.75 * 16000
    audio, _ = sf.read(folder / angry["path"])
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 220) < 2  # the tone survived the resampling

    from tracker.data import load_dataset

    monkeypatch.setenv("TRACKER_DATA_DIR", str(root))
    train = load_dataset("ravdess:train")  # actors 01-16; actor 21 is held out and the readers skip it
    assert sorted(c.utterances[0].speaker for c in train) == ["actor_01", "actor_01", "actor_02"]
    assert {c.utterances[0].label for c in train} == {"neutral", "angry", "sad"}

    assert main(["data", "prepare", "ravdess", str(src), "--root", str(root)]) == 1  # not over existing data
    assert main(["data", "prepare", "ravdess", str(src), "--root", str(root), "--actors", "1-20", "--overwrite"]) == 0
    assert sum(1 for _ in (folder / "labels.csv").open()) - 1 == 3


def test_data_check_lists_what_is_there_and_where_to_get_the_rest(tmp_path, capsys):
    root = tmp_path / "data"
    (root / "meld").mkdir(parents=True)
    (root / "meld" / "dev_sent_emo.csv").write_text("Sr No.,Utterance\n1,hi\n2,yo\n")
    assert main(["data", "check", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "dev_sent_emo.csv  2 rows" in out and "train_sent_emo.csv  missing" in out
    assert "declare-lab/MELD" in out and "Audio_Speech_Actors_01-24.zip" in out and "zenodo" in out.lower()


def test_data_check_on_the_shared_data_is_all_present(data_dir):
    out = subprocess.run([sys.executable, "-m", "tracker_cli", "data", "check", "--root", str(data_dir)],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "MISSING" not in out.stdout and "audio clips: 1,200 present" in out.stdout


def test_progress_bars_are_drawn_only_on_a_terminal(monkeypatch):
    from tracker.progress import progress_bar, progress_enabled

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("TRACKER_PROGRESS", raising=False)
    log_file = io.StringIO()
    assert not progress_enabled(log_file) and progress_enabled(Tty())
    for _ in progress_bar(range(3), file=log_file):
        pass
    assert log_file.getvalue() == ""  # no carriage-return bars in a log
    terminal = Tty()
    for _ in progress_bar(range(3), file=terminal):
        pass
    assert "3/3" in terminal.getvalue()
    monkeypatch.setenv("TRACKER_PROGRESS", "1")
    assert progress_enabled(log_file)
