"""`tracker stream`: stream a file or the microphone to a running tracker and show a live per-speaker view."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tracker.stream import protocol as P
from clients.stream_client import MicRecording, Recording, load_recording, stream_resumable


def read_transcripts(path: str | Path) -> tuple[list[dict[str, Any]], list[str] | None]:
    """A transcript file: a JSON list of {speaker, text, start_ms, end_ms}, a JSON object with
    ``utterances`` (and optional ``channels`` = speaker per channel, as in the bundled demo), or JSONL."""
    text = Path(path).read_text(encoding="utf-8")
    if Path(path).suffix == ".jsonl":
        items, channels = [json.loads(line) for line in text.splitlines() if line.strip()], None
    else:
        data = json.loads(text)
        items = data["utterances"] if isinstance(data, dict) else data
        channels = data.get("channels") if isinstance(data, dict) else None
    out = []
    for i, t in enumerate(items):
        try:
            out.append({"speaker": str(t["speaker"]), "text": str(t["text"]), "start_ms": int(t["start_ms"]), "end_ms": int(t["end_ms"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: transcript {i + 1} needs speaker, text, start_ms, end_ms ({exc})") from None
    return out, channels


class LiveView:
    """Prints each final result as it arrives and a per-speaker summary at the end."""

    def __init__(self) -> None:
        self.by_speaker: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def __call__(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "utterance" and msg.get("is_final"):
            self.by_speaker[msg["speaker"]].append(msg)
            conf = msg["probabilities"].get(msg["label"], 0.0)
            when = f"{msg['end_ms'] / 1000:7.1f}s" if msg.get("end_ms") is not None else "        "
            current = "  ".join(f"{sp}: {rs[-1]['label']}" for sp, rs in sorted(self.by_speaker.items()))
            print(f"{when} {msg['speaker']:>12s} | {msg['label']:<9s} {conf:4.0%} | {msg['text'][:60]!r:62s} [{current}]", flush=True)
        elif kind == "error":
            print(f"error {msg['code']}: {msg['message']}", flush=True)

    def summary(self) -> str:
        lines = ["", f"{'speaker':>12s}  utterances  labels"]
        for sp, rs in sorted(self.by_speaker.items()):
            counts = Counter(r["label"] for r in rs)
            lines.append(f"{sp:>12s}  {len(rs):10d}  " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
        return "\n".join(lines)


DEFAULT_URL = "ws://127.0.0.1:8000/v1/stream"


def resolve_url(explicit: str | None) -> str:
    """--url, else the running local service's (from its state file), else the default port."""
    from clients.local import read_state

    return explicit or read_state().get("ws_url") or DEFAULT_URL


def check_listening(url: str, timeout: float = 3.0) -> None:
    """Fail at once, with what to do, when nothing accepts connections at `url`'s host and port."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme not in ("ws", "wss") or not parsed.hostname:
        raise ValueError(f"--url must be a ws:// or wss:// address such as {DEFAULT_URL}, got {url!r}")
    port = parsed.port or (443 if parsed.scheme == "wss" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(
            f"nothing is listening at {parsed.hostname}:{port} ({url}): {exc.strerror or exc}. Start the service with "
            "`tracker serve` (it prints its address), or pass --url with the address of a running one"
        ) from None


def run_stream(url: str | None, file: str | None, mic: bool, transcript: str | None, speakers: list[str] | None,
               speed: float, conversation_id: str | None, device: str | None, channels: int, seconds: float | None,
               api_key: str | None = None) -> int:
    from clients.local import auth_headers, resolve_api_key

    url = resolve_url(url)
    check_listening(url)
    headers = auth_headers(resolve_api_key(api_key))
    transcripts, channel_names = read_transcripts(transcript) if transcript else ([], None)
    speakers = speakers or channel_names
    cid = conversation_id or f"stream-{uuid.uuid4().hex[:8]}"
    view = LiveView()
    if mic:
        rec: Recording = MicRecording(P.DEFAULT_SAMPLE_RATE, channels, speakers, device=int(device) if device and device.isdigit() else device)
        rec.start()
        speed = 0  # live audio paces itself
        print(f"streaming the microphone as conversation {cid} (Ctrl-C to stop) ...", flush=True)
    else:
        rec = load_recording(file, speakers, transcripts)
        print(f"streaming {file} ({rec.duration_ms / 1000:.1f} s, {rec.channels} channel(s): {', '.join(rec.speakers)}) "
              f"as conversation {cid} at {speed:g}x ...", flush=True)

    async def go():
        task = asyncio.create_task(stream_resumable(url, cid, rec, speed=speed, on_message=view, headers=headers))
        if mic:
            try:
                if seconds:
                    await asyncio.sleep(seconds)
                else:
                    while not task.done():
                        await asyncio.sleep(0.5)
            finally:
                rec.stop()
        return await task

    try:
        out = asyncio.run(go())
    except KeyboardInterrupt:
        if mic:
            rec.stop()
        return 130
    print(view.summary())
    print(f"\n{len(out.results)} utterances labelled, {out.reconnects} reconnect(s)")
    return 0
