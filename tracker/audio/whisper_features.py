"""Whisper encoder states as an acoustic feature: one layer's states over the clip's real length, pooled.

Route (chosen on measurement, BENCHMARKS.md "Whisper encoder features"): CTranslate2's
``Whisper.encode`` accepts log-mel features of any length up to 30 s and returns the last encoder
layer's states after the encoder's final LayerNorm; to read block ``layer`` we load a copy of the
model whose encoder stops after that block (:func:`tracker.audio.whisper_models.ensure_encoder_model`).
So a 3 s clip costs about 150 encoder frames instead of the 1,500 of the padded 30 s window that
transcription needs, and no torch model is involved. :func:`reference_encoder_states` is the
same encoder in plain torch (fp32, all layers at once), used to check this route in the tests.

Output per clip: ``(1, d)`` for ``mean`` or ``(1, 2d)`` for ``meanstd`` (mean then standard
deviation over the frames of real audio), float32; d = 384 (tiny.en) or 512 (base).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tracker.audio.features import CachedExtractor
from tracker.audio.pcm import resample
from tracker.config import ConfigError

CACHE_VERSION = 1
WHISPER_RATE = 16000
HOP = 160  # samples per mel frame (10 ms)
MAX_FRAMES = 3000  # mel frames in Whisper's 30 s window (1,500 encoder positions)
MIN_SECONDS = 0.1  # shorter clips are zero-padded to this
POOLINGS = ("mean", "meanstd")


@dataclass
class WhisperFeatureConfig:
    """Which Whisper encoder layer to read and how to pool it, on which runtime settings."""

    model: str = "base"  # a packaged model (base, tiny.en) or a faster-whisper model folder
    layer: int = 4  # read the states after this encoder block (1-based; the last block = the whole encoder)
    pooling: Literal["mean", "meanstd"] = "meanstd"
    compute_type: str = "int8"  # CTranslate2 compute type (int8 on CPU, float16 on GPU, float32 for reference)
    device: str = "cpu"
    threads: int = 1  # CTranslate2 intra-op threads
    cache_dir: str | None = None  # None: <tracker cache dir>/features
    use_cache: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ConfigError(f"layer: expected an encoder block number >= 1, got {self.layer!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling: expected one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ConfigError(f"device: expected cpu, cuda or auto, got {self.device!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(f"threads: expected an int >= 0, got {self.threads!r}")


def to_whisper_input(x: np.ndarray, sample_rate: int) -> np.ndarray:
    """float32 mono samples at any rate -> 16 kHz float32, as Whisper expects."""
    x = np.asarray(x, dtype=np.float32)
    return resample(x, sample_rate, WHISPER_RATE) if sample_rate != WHISPER_RATE else x


_MEL: Any = None


def log_mel(x16k: np.ndarray) -> np.ndarray:
    """Whisper's log-mel spectrogram (80, frames), one frame per 10 ms, over the audio as it is (no 30 s padding)."""
    global _MEL
    if _MEL is None:
        from faster_whisper.feature_extractor import FeatureExtractor

        _MEL = FeatureExtractor()
    return _MEL(np.asarray(x16k, dtype=np.float32), padding=0)


def pool(states: np.ndarray, pooling: str) -> np.ndarray:
    """(frames, d) -> (1, d) mean or (1, 2d) mean and standard deviation."""
    mean = states.mean(axis=0)
    if pooling == "mean":
        return mean[None, :].astype(np.float32)
    return np.concatenate([mean, states.std(axis=0)])[None, :].astype(np.float32)


class WhisperEncoderFeatures(CachedExtractor):
    """Pooled states of one Whisper encoder layer per clip, computed on the clip's real length."""

    def __init__(self, config: WhisperFeatureConfig | None = None):
        super().__init__()
        self.config = config or WhisperFeatureConfig()
        from tracker.audio.whisper_models import PACKAGED, ensure_whisper_model, model_info

        spec = PACKAGED.get(self.config.model)
        if spec is not None:
            self.d_model, self.depth, self._identity = spec.d_model, spec.encoder_layers, spec.model_sha256
        else:
            folder = ensure_whisper_model(self.config.model)
            info = model_info(folder)
            stat = (folder / "model.bin").stat()
            self.d_model, self.depth = info["d_model"], info["encoder_layers"]
            self._identity = f"{folder.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if self.config.layer > self.depth:
            raise ConfigError(f"layer: Whisper {self.config.model} has {self.depth} encoder blocks, got layer {self.config.layer}")
        self._model: Any = None

    @property
    def n_features(self) -> int:
        return self.d_model * (2 if self.config.pooling == "meanstd" else 1)

    def settings(self) -> dict[str, Any]:
        import ctranslate2

        c = self.config
        return {"whisper": self._identity, "layer": c.layer, "pooling": c.pooling, "compute_type": c.compute_type,
                "ctranslate2": ctranslate2.__version__, "min_seconds": MIN_SECONDS, "cache_version": CACHE_VERSION}

    def _get_model(self) -> Any:
        if self._model is None:
            import ctranslate2

            from tracker.audio.whisper_models import ensure_encoder_model

            folder = ensure_encoder_model(self.config.model, self.config.layer)
            self._model = ctranslate2.models.Whisper(str(folder), device=self.config.device,
                                                     compute_type=self.config.compute_type, intra_threads=self.config.threads)
        return self._model

    def states(self, x: np.ndarray, sample_rate: int) -> np.ndarray:
        """The layer's states (frames, d) over the real length, one frame per 20 ms; clips over 30 s run in 30 s pieces."""
        import ctranslate2

        x16 = to_whisper_input(x, sample_rate)
        min_len = int(MIN_SECONDS * WHISPER_RATE)
        if x16.shape[0] < min_len:
            x16 = np.pad(x16, (0, min_len - x16.shape[0]))
        mel = log_mel(x16)
        mel = mel[:, : mel.shape[1] - mel.shape[1] % 2]  # the stride-2 convolution halves the frames
        pieces = []
        with self._lock:
            model = self._get_model()
            for start in range(0, mel.shape[1], MAX_FRAMES):
                chunk = np.ascontiguousarray(mel[None, :, start:start + MAX_FRAMES])  # (1, 80, frames)
                pieces.append(np.asarray(model.encode(ctranslate2.StorageView.from_array(chunk)))[0])  # (frames/2, d)
            self.compute_calls += 1
        return np.concatenate(pieces, axis=0).astype(np.float32)

    def _compute(self, x: np.ndarray, sample_rate: int) -> np.ndarray:
        return pool(self.states(x, sample_rate), self.config.pooling)


def reference_encoder_states(model_dir: str | Path, mel: np.ndarray) -> list[np.ndarray]:
    """Every encoder layer's states for one (80, frames) log-mel, in torch fp32 from the model.bin weights.

    Returns, for each block l = 1..N, the encoder's final LayerNorm applied to the states after
    block l, as (frames/2, d) arrays: what CTranslate2 returns for a model cut after block l (the
    last entry is the full encoder's output). The pre-LN Whisper encoder: conv-GELU x2, sinusoidal
    positions, N blocks of self-attention and a GELU MLP; CTranslate2 stores the query/key/value
    projections fused in one matrix, split back into three here.
    """
    import torch
    import torch.nn.functional as F

    from tracker.audio.whisper_models import read_ct2_model

    W = read_ct2_model(Path(model_dir) / "model.bin").variables

    def g(name: str) -> torch.Tensor:
        return torch.from_numpy(W[name].astype(np.float32))

    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(mel, dtype=np.float32))[None]  # (1, 80, T)
        x = F.gelu(F.conv1d(x, g("encoder/conv1/weight"), g("encoder/conv1/bias"), padding=1))
        x = F.gelu(F.conv1d(x, g("encoder/conv2/weight"), g("encoder/conv2/bias"), stride=2, padding=1))
        x = x.transpose(1, 2)  # (1, T/2, d)
        T, d = x.shape[1], x.shape[2]
        x = x + g("encoder/position_encodings/encodings")[:T]
        heads = int(W["encoder/num_heads"]) if "encoder/num_heads" in W else d // 64
        out = []
        layer = 0
        while f"encoder/layer_{layer}/ffn/linear_0/weight" in W:
            p = f"encoder/layer_{layer}/"
            h = F.layer_norm(x, (d,), g(p + "self_attention/layer_norm/gamma"), g(p + "self_attention/layer_norm/beta"))
            qkv = F.linear(h, g(p + "self_attention/linear_0/weight"), g(p + "self_attention/linear_0/bias"))
            q, k, v = (t.view(1, T, heads, d // heads).transpose(1, 2) for t in qkv.split(d, dim=-1))
            a = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(d // heads)).transpose(1, 2).reshape(1, T, d)
            x = x + F.linear(a, g(p + "self_attention/linear_1/weight"), g(p + "self_attention/linear_1/bias"))
            h = F.layer_norm(x, (d,), g(p + "ffn/layer_norm/gamma"), g(p + "ffn/layer_norm/beta"))
            x = x + F.linear(F.gelu(F.linear(h, g(p + "ffn/linear_0/weight"), g(p + "ffn/linear_0/bias"))),
                             g(p + "ffn/linear_1/weight"), g(p + "ffn/linear_1/bias"))
            out.append(F.layer_norm(x, (d,), g("encoder/layer_norm/gamma"), g("encoder/layer_norm/beta"))[0].numpy())
            layer += 1
    return out
