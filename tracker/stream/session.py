"""One streaming connection: audio segmentation, transcript matching and the ordered labelling queue.

A :class:`StreamSession` is transport-free: the ingress feeds it decoded client messages and binary
frames and it calls ``send`` with server messages. The actual work (features, context, the model,
storage) goes through a :class:`tracker.stream.pipeline.Pipeline`: the ingress's is backed by Ray
Serve handles, ``tracker.stream.pipeline.LocalPipeline`` by objects in this process.

Timing: every time is stream time in milliseconds from sample counts (plus ``offset_ms`` of a
resumed stream), never the wall clock. A voiced segment of channel c takes the transcripts of
c's speaker that overlap it; it is released for labelling once such a transcript covers its end,
or once that channel's audio has run ``transcript_wait_ms`` past its end, or on finalize/stop.
A transcript no segment took (speech the VAD missed) is labelled from its text alone, so no
transcribed speech is lost.

Speech recognition (a pipeline with ``asr`` true and a ``listen`` method): a segment released
without any transcript is sent to the recognizer at once (one request gives its transcript and
its acoustic features), while it waits in the labelling queue. A client transcript always wins:
one that arrives for the segment before its turn to be labelled replaces the recognized text; one
that arrives after the segment was labelled from recognized text is dropped (its final result is
out; counted in ``transcripts_dropped``). Results say where their text came from:
``text_source`` "client" or "asr" (None when there is no text), with ``asr_confidence``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from tracker.stream import protocol as P
from tracker.audio.pcm import split_channels
from tracker.audio.vad import Segment, StreamingSegmenter, VadConfig
from tracker.stream.pipeline import Pipeline

log = logging.getLogger(__name__)


class SessionObserver(Protocol):
    """Optional hooks for the service's metrics (services/metrics.py); calls must be cheap and never raise."""

    def queued(self, delta: int) -> None:
        """Utterances waiting for labels went up (+1) or down (-1)."""

    def final_sent(self, record: dict[str, Any], seconds_since_release: float) -> None:
        """A final result left, `seconds_since_release` after its end of speech was known."""

    def error_sent(self, code: int) -> None:
        """An error message left."""


@dataclass
class SessionLimits:
    """Limits of the service (docs/protocol.md, "Limits"); each has a documented error or close code."""

    max_frame_bytes: int = 256 * 1024  # one binary frame (4005)
    max_text_frame_chars: int = 4 * 1024 * 1024  # one text frame, e.g. an `utterance` with base64 audio (4005)
    max_utterance_audio_bytes: int = 2 * 1024 * 1024  # base64-decoded audio of one `utterance` event (4002)
    max_utterance_chars: int = 4000  # text of one transcript or utterance (4002)
    max_queue: int = 64  # utterances waiting for labels before the stream is closed as overloaded (4029)
    transcript_wait_ms: int = 400  # how long a segment waits for its transcript (stream time)
    max_messages_per_second: float = 200.0  # sustained client frames per second per connection (4029)
    message_burst: int = 400  # frames a connection may send at once above that rate (4029)
    max_streams_per_key: int = 32  # open /v1/stream connections per API key, per ingress replica (4029)
    max_watches_per_key: int = 32  # open /v1/watch connections per API key, per ingress replica (4029)
    max_conversations_per_tenant: int = 10_000  # live and recent (unexpired) conversations of a tenant (4029)
    watch_send_timeout_s: float = 30.0  # a dashboard that takes longer to accept one message is closed (1013)

    def __post_init__(self) -> None:
        from tracker.config import ConfigError

        for name in ("max_frame_bytes", "max_text_frame_chars", "max_utterance_audio_bytes", "max_utterance_chars",
                     "max_queue", "message_burst", "max_streams_per_key", "max_watches_per_key",
                     "max_conversations_per_tenant"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)!r}")
        if self.transcript_wait_ms < 0:
            raise ConfigError(f"transcript_wait_ms: must be >= 0, got {self.transcript_wait_ms!r}")
        if not self.max_messages_per_second > 0:
            raise ConfigError(f"max_messages_per_second: must be > 0, got {self.max_messages_per_second!r}")
        if not self.watch_send_timeout_s > 0:
            raise ConfigError(f"watch_send_timeout_s: must be > 0, got {self.watch_send_timeout_s!r}")
        if self.max_frame_bytes % 2:
            raise ConfigError(f"max_frame_bytes: must be even (whole PCM16 samples), got {self.max_frame_bytes}")


@dataclass
class _Pending:
    channel: int
    segment: Segment
    start_ms: int
    end_ms: int


@dataclass
class _Job:
    utterance_id: str
    speaker: str
    text: str
    start_ms: int | None
    end_ms: int | None
    pcm: bytes | None
    sample_rate: int
    channel: int | None = None
    explicit: bool = False  # an `utterance` event: every request gets an answer, even a retry
    released_at: float = field(default_factory=time.monotonic)  # end of speech known (wall clock, for latency)
    hearing: asyncio.Task | None = None  # speech recognition of a job released without text (Pipeline.listen)
    late_text: list[P.Transcript] = field(default_factory=list)  # client transcripts that came while it waited
    labelling: bool = False  # its turn came: later transcripts no longer change it


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


class StreamSession:
    """The server side of one WebSocket stream."""

    def __init__(self, pipeline: Pipeline, send: Callable[[dict[str, Any]], Awaitable[None]],
                 vad: VadConfig | None = None, limits: SessionLimits | None = None,
                 observer: SessionObserver | None = None):
        self.pipeline = pipeline
        self.observer = observer
        self.send = send
        self.vad_config = vad or VadConfig()
        self.limits = limits or SessionLimits()
        self.start: P.Start | None = None
        self.stopped = False
        self._segmenters: list[StreamingSegmenter] = []
        self._channel_offset: list[float] = []  # stream time at which each segmenter began
        self._pending: list[_Pending] = []
        self._transcripts: list[P.Transcript] = []
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        self._auto_ids = 0
        self._last_end_ms = 0
        self._stored: list[dict[str, Any]] = []  # final results stored before this (resumed) connection
        self._delivered: set[str] = set()  # utterance ids whose final result the client has
        self._released_at: dict[str, float] = {}  # refining: when each interim's end of speech was known
        self.results_sent = 0
        self.fatal: P.ProtocolError | None = None
        self._hearing: list[_Job] = []  # jobs waiting for their recognized text (late client transcripts may take them)
        self._heard: list[tuple[str, int, int]] = []  # (speaker, start, end) of recent segments labelled from ASR
        self.transcripts_dropped = 0  # client transcripts that came after their segment was labelled from ASR
        self._refine = None  # a tracker.stream.refine.RefineStage when the pipeline refines (interim, then final)

    # ------------------------------------------------------------------ client messages
    async def on_text(self, raw: str | bytes) -> None:
        """Handle one text frame; non-fatal protocol errors are answered and the stream goes on."""
        try:
            if self.stopped:
                raise P.ProtocolError(P.AFTER_STOP, "the stream was stopped; open a new connection")
            obj = P.parse_text_message(raw)
            kind = obj["type"]
            if kind == "start":
                await self._on_start(obj)
                return
            if self.start is None:
                raise P.ProtocolError(P.NOT_STARTED, f"'{kind}' before 'start': send a start message first")
            if kind == "transcript":
                t = P.parse_transcript(obj, self.start.speakers, self.limits.max_utterance_chars)
                if not self._claim_late(t):
                    self._transcripts.append(t)
                self._release()
            elif kind == "utterance":
                ev = P.parse_utterance(obj, self.start.speakers, self.limits.max_utterance_audio_bytes,
                                       self.limits.max_utterance_chars)
                job = self._job_from_event(ev)
                self._enqueue(job)
                if not job.text.strip() and job.pcm:
                    self._listen(job)
            elif kind == "keepalive":
                pass
            elif kind == "finalize":
                self._finalize()
            elif kind == "stop":
                await self.stop()
        except P.ProtocolError as exc:
            await self._error(exc)

    async def on_binary(self, data: bytes) -> None:
        try:
            if self.stopped:
                raise P.ProtocolError(P.AFTER_STOP, "audio after 'stop'")
            if self.start is None:
                raise P.ProtocolError(P.NOT_STARTED, "audio before 'start': send a start message first")
            if len(data) > self.limits.max_frame_bytes:
                raise P.ProtocolError(P.FRAME_TOO_LARGE, f"binary frame of {len(data)} bytes exceeds the limit of {self.limits.max_frame_bytes}")
            if len(data) % (2 * self.start.channels):
                raise P.ProtocolError(P.BAD_AUDIO, f"binary frame of {len(data)} bytes is not whole PCM16 samples for {self.start.channels} channel(s)")
            for ch, pcm in enumerate(split_channels(data, self.start.channels) if self.start.channels > 1 else [data]):
                for seg in self._segmenters[ch].push(pcm):
                    self._add_segment(ch, seg)
            self._release()
        except P.ProtocolError as exc:
            await self._error(exc)

    async def _on_start(self, obj: dict[str, Any]) -> None:
        if self.start is not None:
            raise P.ProtocolError(P.ALREADY_STARTED, "the stream has already started")
        start = P.parse_start(obj)
        offset = start.offset_ms
        if start.resume and start.resume_after_seq > 0 and not await self.pipeline.conversation_known(start.conversation_id):
            # the client holds results of a conversation the server does not know: a wrong id, or expired
            raise P.ProtocolError(P.UNKNOWN_CONVERSATION, f"cannot resume unknown conversation {start.conversation_id!r}")
        await self.pipeline.admit_conversation(start.conversation_id)  # tenant limits (raises LIMIT_EXCEEDED)
        self.start = start
        self._segmenters = [StreamingSegmenter(self.vad_config, start.sample_rate) for _ in range(start.channels)]
        self._channel_offset = [float(offset)] * start.channels
        if getattr(self.pipeline, "refine_info", None):
            from tracker.stream.refine import RefineStage

            self._refine = RefineStage(self.pipeline, start.conversation_id, self.pipeline.refine_info, self._send_final)
            if start.resume:
                try:
                    await self._refine.restore()
                except Exception:  # storage trouble: refine from here on; stored finals are never redone
                    log.exception("restoring the refinement state of %s failed", start.conversation_id)
        self._worker = asyncio.create_task(self._work())
        done = await self.pipeline.stored_finals(start.conversation_id) if start.resume else []
        self._stored = done
        await self.send({
            "type": "started", "conversation_id": start.conversation_id, "sample_rate": start.sample_rate,
            "channels": start.channels, "speakers": start.speakers, "offset_ms": offset,
            "final_utterance_ids": [r["utterance_id"] for r in done],
            "last_seq": max((int(r.get("seq") or 0) for r in done), default=0),
        })
        # a resuming client gets the results it missed, and never one it already has
        for r in sorted(done, key=lambda r: int(r.get("seq") or 0)):
            if int(r.get("seq") or 0) > start.resume_after_seq:
                await self.send(P.result_message(r))
            self._delivered.add(r["utterance_id"])

    # ------------------------------------------------------------------ segmentation and matching
    def _add_segment(self, channel: int, seg: Segment) -> None:
        off = self._channel_offset[channel]
        self._pending.append(_Pending(channel, seg, int(off + seg.start_ms), int(off + seg.end_ms)))

    def _channel_time(self, channel: int) -> float:
        return self._channel_offset[channel] + self._segmenters[channel].position_ms

    def _release(self, force: bool = False) -> None:
        """Move segments (and orphan transcripts) whose text is settled to the labelling queue."""
        assert self.start is not None
        wait = self.limits.transcript_wait_ms
        self._pending.sort(key=lambda p: p.end_ms)
        still: list[_Pending] = []
        for p in self._pending:
            speaker = self.start.speakers[p.channel]
            mine = [t for t in self._transcripts if t.speaker == speaker and _overlap(t.start_ms, t.end_ms, p.start_ms, p.end_ms) > 0]
            covered = any(t.end_ms >= p.end_ms - wait for t in mine)
            if not (force or covered or self._channel_time(p.channel) >= p.end_ms + wait):
                still.append(p)
                continue
            # a transcript goes to the pending segment it overlaps most
            taken = [t for t in mine if self._best_segment(t) is p]
            for t in taken:
                self._transcripts.remove(t)
            taken.sort(key=lambda t: t.start_ms)
            text = " ".join(t.text.strip() for t in taken if t.text.strip())
            job = _Job(
                utterance_id=f"{speaker}-{p.start_ms}", speaker=speaker, text=text, start_ms=p.start_ms,
                end_ms=p.end_ms, pcm=p.segment.pcm, sample_rate=p.segment.sample_rate, channel=p.channel,
            )
            self._enqueue(job)
            if not text:
                self._listen(job)
        self._pending = still
        # transcripts that no segment took and none can take any more: label them from text
        for t in list(self._transcripts):
            ch = self.start.speakers.index(t.speaker)
            open_seg = self._segmenters[ch].in_speech
            overlaps_pending = any(_overlap(t.start_ms, t.end_ms, p.start_ms, p.end_ms) > 0 for p in self._pending)
            if force or (not overlaps_pending and not open_seg and self._channel_time(ch) >= t.end_ms + wait):
                self._transcripts.remove(t)
                self._enqueue(_Job(utterance_id=f"{t.speaker}-t{t.start_ms}", speaker=t.speaker, text=t.text,
                                   start_ms=t.start_ms, end_ms=t.end_ms, pcm=None, sample_rate=self.start.sample_rate))

    def _stored_id(self, speaker: str, start_ms: int, end_ms: int) -> str | None:
        """On resume, the id of a stored final this span re-detects (same speaker, >= half overlap).

        Re-sent audio is segmented afresh, and VAD boundaries can shift by a frame or two; matching by
        overlap rather than by exact start time keeps an utterance from being stored twice.
        """
        for r in self._stored:
            if r.get("speaker") != speaker or r.get("start_ms") is None:
                continue
            ov = _overlap(start_ms, end_ms, int(r["start_ms"]), int(r["end_ms"]))
            shorter = min(end_ms - start_ms, int(r["end_ms"]) - int(r["start_ms"]))
            if shorter > 0 and ov >= 0.5 * shorter:
                return r["utterance_id"]
        return None

    def _best_segment(self, t: P.Transcript) -> _Pending | None:
        best, best_ov = None, 0
        for p in self._pending:
            if self.start.speakers[p.channel] != t.speaker:
                continue
            ov = _overlap(t.start_ms, t.end_ms, p.start_ms, p.end_ms)
            if ov > best_ov:
                best, best_ov = p, ov
        return best

    # ------------------------------------------------------------------ speech recognition
    @property
    def asr(self) -> bool:
        return bool(getattr(self.pipeline, "asr", False)) and hasattr(self.pipeline, "listen")

    def _listen(self, job: _Job) -> None:
        """Start recognizing a queued job that has audio and no text (speech recognition on)."""
        if not self.asr or not job.pcm:
            return
        job.hearing = asyncio.ensure_future(self.pipeline.listen(job.pcm, job.sample_rate))
        if not job.explicit:
            self._hearing.append(job)

    def _claim_late(self, t: P.Transcript) -> bool:
        """A transcript for a segment already released to the recognizer: True if it was taken (or dropped).

        It goes to the waiting job it overlaps most, unless a pending segment overlaps it more; a
        transcript mostly over a segment already labelled from recognized text is dropped.
        """
        best, best_ov = None, 0
        for job in self._hearing:
            if job.labelling or job.speaker != t.speaker:
                continue
            ov = _overlap(t.start_ms, t.end_ms, job.start_ms or 0, job.end_ms or 0)
            if ov > best_ov:
                best, best_ov = job, ov
        pending = self._best_segment(t)
        if pending is not None and _overlap(t.start_ms, t.end_ms, pending.start_ms, pending.end_ms) >= best_ov:
            return False
        if best is not None:
            best.late_text.append(t)
            return True
        span = max(1, t.end_ms - t.start_ms)
        if any(s == t.speaker and _overlap(t.start_ms, t.end_ms, a, b) >= 0.5 * span for s, a, b in self._heard):
            self.transcripts_dropped += 1
            log.info("transcript %s-%d came after its segment was labelled from speech recognition; dropped",
                     t.speaker, t.start_ms)
            return True
        return False

    async def _text_of(self, job: _Job) -> dict[str, Any]:
        """The job's text and where it came from; for a recognized job also its features (one request)."""
        if job.hearing is None:
            return {"text_source": "client" if job.text.strip() else None}
        heard = None
        try:
            heard = await job.hearing
        except Exception:  # the recognizer failed: label on what there is (audio alone), the stream goes on
            log.exception("speech recognition of %s failed", job.utterance_id)
        job.labelling = True
        if job in self._hearing:
            self._hearing.remove(job)
        out: dict[str, Any] = {"text_source": None}
        if heard is not None and "audio_features" in heard:
            out["audio_features"] = heard["audio_features"]
        if job.late_text:
            job.text = " ".join(t.text.strip() for t in sorted(job.late_text, key=lambda t: t.start_ms) if t.text.strip())
            out["text_source"] = "client" if job.text else None
            return out
        transcript = (heard or {}).get("transcript") or {}
        if transcript.get("text", "").strip():
            job.text = transcript["text"].strip()
            out.update(text_source="asr", asr_confidence=round(float(transcript.get("confidence", 0.0)), 4))
            if job.start_ms is not None and job.end_ms is not None and not job.explicit:
                self._heard = (self._heard + [(job.speaker, job.start_ms, job.end_ms)])[-64:]
        return out

    def _finalize(self) -> None:
        """End every open segment now and label everything pending; the stream may go on."""
        assert self.start is not None
        for ch, seg in enumerate(self._segmenters):
            pos = self._channel_time(ch)
            for s in seg.flush():
                self._add_segment(ch, s)
            self._segmenters[ch] = StreamingSegmenter(self.vad_config, self.start.sample_rate)
            self._channel_offset[ch] = pos
        self._release(force=True)

    def _job_from_event(self, ev: P.UtteranceEvent) -> _Job:
        assert self.start is not None
        start, end = ev.start_ms, ev.end_ms
        if start is None:  # untimed: it happens now, on the stream clock, and lasts as long as its audio
            start = int(max([self._last_end_ms] + [self._channel_time(c) for c in range(self.start.channels)]))
        if end is None:
            end = start + (len(ev.audio) * 1000 // (2 * self.start.sample_rate) if ev.audio else 0)
        self._last_end_ms = max(self._last_end_ms, end)
        if ev.utterance_id is None:
            self._auto_ids += 1
            uid = f"{ev.speaker}-u{start}-{self._auto_ids}"
        else:
            uid = ev.utterance_id
        return _Job(utterance_id=uid, speaker=ev.speaker, text=ev.text, start_ms=start, end_ms=end,
                    pcm=ev.audio, sample_rate=self.start.sample_rate, explicit=True)

    # ------------------------------------------------------------------ labelling queue
    def _enqueue(self, job: _Job) -> None:
        if self._queue.qsize() >= self.limits.max_queue:
            raise P.ProtocolError(P.LIMIT_EXCEEDED, f"more than {self.limits.max_queue} utterances wait for labels; slow down")
        self._queue.put_nowait(job)
        if self.observer is not None:
            self.observer.queued(1)

    async def _work(self) -> None:
        """Label queued utterances one at a time, so results leave in order with increasing seq."""
        assert self.start is not None
        while True:
            job = await self._queue.get()
            try:
                if job is None:
                    return
                if self.observer is not None:
                    self.observer.queued(-1)
                if self.start.resume and not job.explicit:
                    # results the previous connection was still storing when it dropped count too
                    self._stored = await self.pipeline.stored_finals(self.start.conversation_id)
                    if job.start_ms is not None and job.end_ms is not None:
                        job.utterance_id = self._stored_id(job.speaker, job.start_ms, job.end_ms) or job.utterance_id
                heard = await self._text_of(job)
                payload = {
                    "utterance_id": job.utterance_id, "speaker": job.speaker, "text": job.text,
                    "start_ms": job.start_ms, "end_ms": job.end_ms, "pcm": job.pcm, "sample_rate": job.sample_rate,
                    "is_final": self._refine is None,  # refining: the base label is an interim one
                    **heard,  # text_source, asr_confidence, and the features computed with the transcript
                }
                try:
                    record = await self.pipeline.label_utterance(self.start.conversation_id, payload)
                except Exception as exc:  # one bad utterance must not end the stream
                    log.exception("labelling %s failed", job.utterance_id)
                    cause = getattr(exc, "cause", None) or exc  # a RayTaskError carries the worker's exception
                    await self._error(P.ProtocolError(P.PROCESSING_FAILED, f"utterance {job.utterance_id}: {type(cause).__name__}: {str(cause)[:200]}"))
                    continue
                if self._refine is not None and not record.get("is_final"):
                    self._released_at[record["utterance_id"]] = job.released_at  # its final comes later
                    await self._interim(record)
                    continue
                if job.explicit or record["utterance_id"] not in self._delivered:
                    await self.send(P.result_message(record))
                    self.results_sent += 1
                    for alert in P.alert_messages(record):
                        await self.send(alert)
                    if self.observer is not None:
                        self.observer.final_sent(record, time.monotonic() - job.released_at)
                self._delivered.add(record["utterance_id"])
            finally:
                self._queue.task_done()

    async def _interim(self, record: dict[str, Any]) -> None:
        """Refining: send the interim label, then let the refinement judge the windows it closes."""
        await self.send(P.result_message(record))
        try:
            await self._refine.on_interim(record)
        except Exception as exc:  # storage trouble: the utterance is finalized at the end, the stream goes on
            log.exception("refinement after %s failed", record["utterance_id"])
            await self._error(P.ProtocolError(P.PROCESSING_FAILED, f"utterance {record['utterance_id']}: refinement: {type(exc).__name__}"))

    async def _send_final(self, message: dict[str, Any]) -> None:
        """A refined final label (from the RefineStage), or an alert it caused."""
        if message.get("type") == "alert":
            await self.send(message)
            return
        if message["utterance_id"] not in self._delivered:
            await self.send(message)
            self.results_sent += 1
            released = self._released_at.pop(message["utterance_id"], None)
            if self.observer is not None and released is not None:
                self.observer.final_sent(message, time.monotonic() - released)
        self._delivered.add(message["utterance_id"])

    async def _finish_refinement(self) -> None:
        if self._refine is None:
            return
        try:
            await self._refine.finish()
        except Exception as exc:
            log.exception("finishing refinement failed")
            await self._error(P.ProtocolError(P.PROCESSING_FAILED, f"refinement: {type(exc).__name__}: {str(exc)[:200]}"))

    async def stop(self) -> None:
        """Flush everything, wait until every utterance is labelled, then report `stopped`."""
        if self.start is None:
            self.stopped = True
            return
        self._finalize()
        self.stopped = True
        await self._queue.put(None)
        if self._worker is not None:
            await self._worker
        await self._finish_refinement()  # the conversation ended: the open windows close, every label is final
        await self.pipeline.end_conversation(self.start.conversation_id)  # a dropped connection may resume; a stop ends it
        await self.send({"type": "stopped", "conversation_id": self.start.conversation_id, "results": self.results_sent})

    async def close(self) -> None:
        """The connection went away: finish what was already segmented, drop nothing stored."""
        if self._worker is not None and not self._worker.done():
            if not self.stopped and self.start is not None:
                self._release(force=True)
            await self._queue.put(None)
            try:
                await asyncio.wait_for(self._worker, timeout=30)
            except asyncio.TimeoutError:
                self._worker.cancel()
                for job in self._hearing:
                    if job.hearing is not None:
                        job.hearing.cancel()
            if not self.stopped:
                # the connection went: close the windows now so every stored interim gets its final
                await self._finish_refinement()

    async def _error(self, exc: P.ProtocolError) -> None:
        if self.observer is not None:
            self.observer.error_sent(exc.code)
        if exc.fatal:
            self.fatal = exc
        await self.send(exc.to_message())
