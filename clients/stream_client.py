"""A WebSocket streaming client for the tracker protocol (docs/protocol.md).

Streams interleaved PCM16 audio in chunks, in real time or faster, and sends each transcript once
the audio has played past its end (as a speech recognizer would emit a final transcript). Results
are collected in order and passed to ``on_message`` as they arrive.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np


@dataclass
class Recording:
    """Interleaved int16 audio with one speaker per channel, plus optional transcripts."""

    samples: np.ndarray  # (n, channels) int16
    sample_rate: int
    speakers: list[str]
    transcripts: list[dict[str, Any]] = field(default_factory=list)  # speaker, text, start_ms, end_ms

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_ms(self) -> int:
        return int(1000 * self.samples.shape[0] / self.sample_rate)


def load_recording(audio_path: str | Path, speakers: list[str] | None = None, transcripts: list[dict] | None = None) -> Recording:
    """Read a WAV/FLAC file (any channel count) as int16 at a rate the service accepts (16 kHz if not)."""
    from tracker.audio.pcm import read_audio

    samples, rate = read_audio(audio_path, dtype="int16", target_rate=None, mono=False)
    samples = np.asarray(samples)
    if samples.ndim == 1:
        samples = samples[:, None]
    if rate not in (8000, 16000, 32000, 48000):
        samples, rate = read_audio(audio_path, dtype="int16", target_rate=16000, mono=False)
        samples = np.asarray(samples).reshape(len(samples), -1)
    ch = samples.shape[1]
    speakers = speakers or [f"Speaker {i + 1}" for i in range(ch)]
    if len(speakers) != ch:
        raise ValueError(f"{audio_path}: {ch} channel(s) but {len(speakers)} speaker name(s)")
    return Recording(samples.astype(np.int16), rate, list(speakers), list(transcripts or []))


def demo_recording() -> tuple[Recording, dict[str, Any]]:
    """The conversation shipped with the package (MELD dev text voiced with espeak-ng, one speaker per channel)."""
    base = Path(__file__).resolve().parents[1] / "tracker" / "assets" / "demo"
    meta = json.loads((base / "conversation.json").read_text())
    transcripts = [{"speaker": u["speaker"], "text": u["text"], "start_ms": u["start_ms"], "end_ms": u["end_ms"]}
                   for u in meta["utterances"]]
    return load_recording(base / "conversation.flac", meta["channels"], transcripts), meta


@dataclass
class StreamOutcome:
    started: dict[str, Any] | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    stopped: dict[str, Any] | None = None
    close_code: int | None = None


async def stream_recording(
    url: str,
    conversation_id: str,
    recording: Recording,
    speed: float = 1.0,
    chunk_ms: int = 100,
    on_message: Callable[[dict[str, Any]], None] | None = None,
    send_transcripts: bool = True,
    headers: dict[str, str] | None = None,
) -> StreamOutcome:
    """Stream a recording to the service and return everything it answered."""
    import websockets

    out = StreamOutcome()
    rate, ch = recording.sample_rate, recording.channels
    per_chunk = max(1, rate * chunk_ms // 1000)
    pending = sorted(recording.transcripts, key=lambda t: t["end_ms"]) if send_transcripts else []
    async with websockets.connect(url, max_size=2**24, additional_headers=headers) as ws:

        async def reader() -> None:
            async for raw in ws:
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "started":
                    out.started = msg
                elif kind == "utterance":
                    out.results.append(msg)
                elif kind == "error":
                    out.errors.append(msg)
                elif kind == "stopped":
                    out.stopped = msg
                if on_message:
                    on_message(msg)
                if kind == "stopped":
                    return  # everything is labelled; we close

        task = asyncio.create_task(reader())
        await ws.send(json.dumps({"type": "start", "conversation_id": conversation_id, "sample_rate": rate,
                                  "encoding": "linear16", "channels": ch, "speakers": recording.speakers}))
        t0 = asyncio.get_running_loop().time()
        for start in range(0, recording.samples.shape[0], per_chunk):
            chunk = recording.samples[start : start + per_chunk]
            await ws.send(np.ascontiguousarray(chunk, dtype="<i2").tobytes())
            played_ms = 1000 * (start + len(chunk)) / rate
            while pending and pending[0]["end_ms"] <= played_ms:
                await ws.send(json.dumps({"type": "transcript", **pending.pop(0)}))
            if speed > 0:
                wait = t0 + played_ms / 1000 / speed - asyncio.get_running_loop().time()
                if wait > 0:
                    await asyncio.sleep(wait)
        for t in pending:
            await ws.send(json.dumps({"type": "transcript", **t}))
        await ws.send(json.dumps({"type": "stop"}))
        try:
            await asyncio.wait_for(task, timeout=300)
        except asyncio.TimeoutError:
            task.cancel()
        await ws.close()
        out.close_code = ws.close_code
    return out
