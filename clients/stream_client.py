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

from tracker.stream import protocol as P


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

    def available(self) -> int:
        """Samples that can be sent now (a file: all of them; a microphone: what was captured)."""
        return int(self.samples.shape[0])

    @property
    def finished(self) -> bool:
        return True

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
    if rate not in P.SUPPORTED_RATES:
        samples, rate = read_audio(audio_path, dtype="int16", target_rate=P.DEFAULT_SAMPLE_RATE, mono=False)
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
    reconnects: int = 0
    duplicates: int = 0  # final results received again for an utterance already seen (should stay 0)


async def stream_recording(
    url: str,
    conversation_id: str,
    recording: Recording,
    speed: float = 1.0,
    chunk_ms: int = P.FRAME_MS,
    on_message: Callable[[dict[str, Any]], None] | None = None,
    headers: dict[str, str] | None = None,
) -> StreamOutcome:
    """Stream a recording once (no reconnecting) and return everything the service answered."""
    return await stream_resumable(url, conversation_id, recording, speed=speed, chunk_ms=chunk_ms,
                                  on_message=on_message, max_reconnects=0, headers=headers)


def _rewind_ms(results: list[dict[str, Any]], speakers: list[str]) -> int:
    """Where to resume sending audio: the earliest point after which some channel may hold speech
    without a final result (the minimum over channels of that channel's last final end)."""
    last = {sp: 0 for sp in speakers}
    for r in results:
        if r.get("is_final") and r.get("end_ms") is not None and r["speaker"] in last:
            last[r["speaker"]] = max(last[r["speaker"]], int(r["end_ms"]))
    point = min(last.values()) if last else 0
    return point - point % 30  # on a VAD frame boundary


async def stream_resumable(
    url: str,
    conversation_id: str,
    recording: Recording,
    speed: float = 1.0,
    chunk_ms: int = P.FRAME_MS,
    on_message: Callable[[dict[str, Any]], None] | None = None,
    max_reconnects: int = 10,
    cut_at_ms: list[int] | None = None,
    headers: dict[str, str] | None = None,
) -> StreamOutcome:
    """Like :func:`stream_recording`, but survives dropped connections.

    After a drop it reconnects with ``resume``, rewinds the audio to the last point every channel
    has final results for, and tells the server the last ``seq`` it saw; the server re-sends what
    was missed and answers re-detected utterances from storage, so each utterance ends up with
    exactly one final result. ``cut_at_ms`` drops the connection at those stream times (for tests).
    """
    import websockets

    out = StreamOutcome()
    seen: dict[str, dict[str, Any]] = {}
    cuts = sorted(cut_at_ms or [])
    rate = recording.sample_rate
    per_chunk = max(1, P.frame_bytes(rate, 1, chunk_ms) // P.SAMPLE_BYTES)  # samples per channel per frame
    attempt = 0
    while True:
        rewind = _rewind_ms(list(seen.values()), recording.speakers) if attempt else 0
        last_seq = max((int(r.get("seq") or 0) for r in seen.values()), default=0)
        try:
            async with websockets.connect(url, max_size=2**24, additional_headers=headers) as ws:
                async def reader() -> None:
                    async for raw in ws:
                        msg = json.loads(raw)
                        kind = msg.get("type")
                        if kind == "started":
                            out.started = msg
                        elif kind == "utterance" and msg.get("is_final"):
                            if msg["utterance_id"] in seen:
                                out.duplicates += 1
                                continue
                            seen[msg["utterance_id"]] = msg
                            out.results.append(msg)
                        elif kind == "error":
                            out.errors.append(msg)
                        elif kind == "stopped":
                            out.stopped = msg
                        if on_message:
                            on_message(msg)
                        if kind == "stopped":
                            return

                task = asyncio.create_task(reader())
                try:
                    await ws.send(json.dumps(P.start_message(conversation_id, recording.speakers, sample_rate=rate,
                                                             resume=attempt > 0, offset_ms=rewind,
                                                             resume_after_seq=last_seq)))
                    first = rewind * rate // 1000
                    pending = sorted((t for t in recording.transcripts if t["end_ms"] > rewind), key=lambda t: t["end_ms"])
                    loop = asyncio.get_running_loop()
                    t0 = loop.time() - first / rate / max(speed, 1e-9)
                    start = first
                    while True:
                        if start >= recording.available():
                            if recording.finished and start >= recording.available():
                                break
                            await asyncio.sleep(chunk_ms / 2000)  # live audio: wait for the microphone
                            continue
                        chunk = recording.samples[start : min(start + per_chunk, recording.available())]
                        start += len(chunk)
                        played_ms = 1000 * start / rate
                        if cuts and played_ms >= cuts[0]:
                            cuts.pop(0)
                            ws.transport.abort()  # the network drops, no close handshake
                            raise ConnectionError("connection cut")
                        await ws.send(np.ascontiguousarray(chunk, dtype="<i2").tobytes())
                        while pending and pending[0]["end_ms"] <= played_ms:
                            await ws.send(json.dumps(_transcript(pending.pop(0))))
                        if speed > 0:
                            wait = t0 + played_ms / 1000 / speed - loop.time()
                            if wait > 0:
                                await asyncio.sleep(wait)
                    for t in pending:
                        await ws.send(json.dumps(_transcript(t)))
                    await ws.send(json.dumps(P.stop_message()))
                    await asyncio.wait_for(task, timeout=300)  # returns at `stopped`; raises if the server drops us
                    await ws.close()
                    out.close_code = ws.close_code
                    return out
                finally:
                    task.cancel()  # ends the reader if we leave early (a cut, an error)
        except (ConnectionError, OSError, websockets.ConnectionClosed, asyncio.TimeoutError) as exc:
            if isinstance(exc, websockets.ConnectionClosed) and exc.rcvd is not None and 4000 <= exc.rcvd.code < 5000:
                raise  # a protocol error will not go away by reconnecting
            attempt += 1
            out.reconnects += 1
            if attempt > max_reconnects:
                raise
            await asyncio.sleep(min(5.0, 0.2 * 2 ** (attempt - 1)))


def _transcript(t: dict[str, Any]) -> dict[str, Any]:
    return P.transcript_message(t["speaker"], t["text"], t["start_ms"], t["end_ms"])


class MicRecording(Recording):
    """Live microphone audio (sounddevice), buffered so a reconnect can re-send from its rewind point."""

    def __init__(self, sample_rate: int = P.DEFAULT_SAMPLE_RATE, channels: int = 1, speakers: list[str] | None = None,
                 device: int | str | None = None, max_seconds: float = 4 * 3600):
        import sounddevice as sd

        super().__init__(np.zeros((int(sample_rate * max_seconds), channels), dtype=np.int16), sample_rate,
                         speakers or [f"Speaker {i + 1}" for i in range(channels)])
        self._n = 0
        self._done = False
        self._stream = sd.InputStream(samplerate=sample_rate, channels=channels, dtype="int16", device=device,
                                      callback=self._on_audio, blocksize=sample_rate // 50)

    def _on_audio(self, indata, frames, time_info, status) -> None:
        n = min(frames, self.samples.shape[0] - self._n)
        self.samples[self._n : self._n + n] = indata[:n]
        self._n += n
        if self._n >= self.samples.shape[0]:
            self._done = True

    def available(self) -> int:
        return self._n

    @property
    def finished(self) -> bool:
        return self._done

    def start(self) -> "MicRecording":
        self._stream.start()
        return self

    def stop(self) -> None:
        self._stream.stop()
        self._stream.close()
        self._done = True
