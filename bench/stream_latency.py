"""Streaming latency: N concurrent voiced conversations in real time through the real service.

For each utterance, latency = the wall-clock time its final label arrived minus the moment the
stream's audio reached the utterance's true end (from the voiced clip spans). Prints p50/p99 latency
and labelled utterances per second for each N.

Usage: python bench/stream_latency.py [--n 1 4 16] [--checkpoint DIR] [--speed 1.0]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import time
import uuid

import numpy as np

from clients.stream_client import Recording, stream_recording
from services.runner import LocalService
from tracker.audio.synth import voice_conversation

CALLS = [
    [("Agent", "Thank you for calling, how can I help you today?"),
     ("Caller", "My order never arrived and I was charged twice."),
     ("Agent", "I am so sorry about that, let me look into it right away."),
     ("Caller", "This is really frustrating, I needed it for the weekend."),
     ("Agent", "I have refunded the second charge and shipped a replacement."),
     ("Caller", "Okay, thank you, that is a relief.")],
    [("Agent", "Good afternoon, you are speaking with support."),
     ("Caller", "Hi, I cannot log into my account since yesterday."),
     ("Agent", "Let me reset your password, one moment please."),
     ("Caller", "Great, it works now, thanks a lot!"),
     ("Agent", "You are welcome, have a nice day.")],
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_call(url: str, rec: Recording, truth: list[dict], speed: float, lat: list[float]) -> int:
    t0 = time.perf_counter()
    arrivals: list[tuple[float, dict]] = []
    out = await stream_recording(url, f"bench-{uuid.uuid4().hex[:8]}", rec, speed=speed,
                                 on_message=lambda m: arrivals.append((time.perf_counter(), m)) if m.get("type") == "utterance" else None)
    for when, msg in arrivals:
        match = [u for u in truth if u["speaker"] == msg["speaker"]
                 and min(u["end_ms"], msg["end_ms"]) > max(u["start_ms"], msg["start_ms"])]
        if match:
            lat.append(when - (t0 + match[0]["end_ms"] / 1000 / speed))
    return len(out.results)


async def run_n(url: str, recs: list[tuple[Recording, list[dict]]], n: int, speed: float) -> tuple[list[float], int, float]:
    lat: list[float] = []
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one_call(url, *recs[i % len(recs)], speed, lat) for i in range(n)))
    return lat, sum(counts), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--speed", type=float, default=1.0)
    ap.add_argument("--max-batch-size", type=int, default=16)
    args = ap.parse_args()
    recs = []
    for call in CALLS:
        v = voice_conversation(call)
        recs.append((Recording(v.samples, v.sample_rate, v.speakers,
                               [{k: u[k] for k in ("speaker", "text", "start_ms", "end_ms")} for u in v.utterances]), v.utterances))
    svc_args = {"asr": "off",  # the call streams its transcripts; as measured in BENCHMARKS.md
                "model": {"checkpoint": args.checkpoint, "max_batch_size": args.max_batch_size},
                "deployments": {"emotion_model": {"num_cpus": 1.0, "max_ongoing_requests": max(32, args.max_batch_size)}}}
    with LocalService(port=free_port(), args=svc_args) as svc:
        url = f"{svc.ws_url}?token={svc.api_key}" if svc.api_key else svc.ws_url  # the local API key
        asyncio.run(run_n(url, recs, 1, 8.0))  # warm-up
        print(f"{'N':>3} {'utterances':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'utt/s':>7}")
        for n in args.n:
            lat, count, secs = asyncio.run(run_n(url, recs, n, args.speed))
            ms = np.array(lat) * 1000
            print(f"{n:>3} {count:>10} {np.percentile(ms, 50):8.0f} {np.percentile(ms, 99):8.0f} {ms.max():8.0f} {count / secs:7.2f}", flush=True)


if __name__ == "__main__":
    main()
