"""Soak: N concurrent conversations for M minutes through the real service on loopback.

Each of N workers streams conversations back to back: the bundled demo call's utterances (voiced
audio + text) as `utterance` events, `--gap` seconds apart, `--per-call` per conversation, then
`stop` and a new conversation id. At the end Redis is read directly and every utterance sent is
accounted for:

  sent        utterance events sent
  labelled    distinct final results received
  stored      distinct utterance ids stored in Redis (stream entries)
  lost        sent but not stored (must be 0)
  duplicated  results received twice + stream entries beyond one per utterance (must be 0)

plus p50/p99 latency (event sent -> final result received) in the first and the last third of the
run (the ratio shows drift under sustained load) and the resident memory of the service's
processes (Ray workers and Redis) after warm-up and at the end.

Usage: flock /tmp/tracker-heavy.lock python bench/soak.py --conversations 4 --minutes 3 [--checkpoint default|tiny|DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np

from tracker.stream import protocol as P


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_utterances() -> list[dict]:
    """The demo call's utterances: speaker, text and that speaker's channel audio as PCM16 bytes."""
    from clients.stream_client import demo_recording

    rec, meta = demo_recording()
    out = []
    for u in meta["utterances"]:
        a, b = u["start_ms"] * rec.sample_rate // 1000, u["end_ms"] * rec.sample_rate // 1000
        pcm = np.ascontiguousarray(rec.samples[a:b, u["channel"]], dtype="<i2").tobytes()
        out.append({"speaker": u["speaker"], "text": u["text"], "audio": pcm,
                    "dur": u["end_ms"] - u["start_ms"]})
    return out, rec.sample_rate, list(meta["channels"])


def tiny_checkpoint() -> str:
    import torch

    from tracker.model.adapter import AdapterConfig
    from tracker.model.backbone import load_backbone
    from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig

    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp(prefix="soak-tiny-")) / "tiny"
    EmotionRecognizer(load_backbone("tiny", dtype="fp32", seed=0),
                      RecognizerConfig(backbone="tiny", dtype="fp32", adapter=AdapterConfig(d_model=32, n_pseudo_tokens=4))
                      ).save_pretrained(path)
    return str(path)


def service_rss_mb(redis_pid: int | None) -> float:
    """Resident memory of the service: Ray's worker processes (replicas, proxy, controller) and Redis."""
    import psutil

    total = 0
    for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["pid"] == redis_pid or cmd.startswith("ray::") or "default_worker.py" in cmd:
                total += p.info["memory_info"].rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, TypeError):
            pass
    return total / 2**20


class Tally:
    def __init__(self) -> None:
        self.sent: dict[str, float] = {}  # utterance id -> send time
        self.received: Counter[str] = Counter()
        self.latency: list[tuple[float, float]] = []  # (send time, seconds)
        self.errors: list[dict] = []
        self.conversations: list[str] = []


async def worker(url: str, headers: dict, utts: list[dict], rate: int, speakers: list[str], deadline: float,
                 gap: float, per_call: int, tally: Tally, w: int) -> None:
    import websockets

    k = 0
    while time.time() < deadline:
        cid = f"soak-{w}-{uuid.uuid4().hex[:8]}"
        tally.conversations.append(cid)
        async with websockets.connect(url, additional_headers=headers, max_size=2**24) as ws:
            await ws.send(json.dumps(P.start_message(cid, speakers, sample_rate=rate)))

            async def reader():
                async for raw in ws:
                    msg = json.loads(raw)
                    if msg["type"] == "utterance" and msg["is_final"]:
                        uid = msg["utterance_id"]
                        tally.received[uid] += 1
                        if tally.received[uid] == 1:
                            tally.latency.append((tally.sent[uid], time.time() - tally.sent[uid]))
                    elif msg["type"] == "error":
                        tally.errors.append(msg)
                    elif msg["type"] == "stopped":
                        return

            task = asyncio.create_task(reader())
            clock = 0
            for i in range(per_call):
                if time.time() >= deadline:
                    break
                u = utts[k % len(utts)]
                k += 1
                uid = f"{cid}-{i}"
                tally.sent[uid] = time.time()
                await ws.send(json.dumps(P.utterance_message(u["speaker"], u["text"], utterance_id=uid, audio=u["audio"],
                                                             start_ms=clock, end_ms=clock + u["dur"])))
                clock += u["dur"] + 300
                await asyncio.sleep(gap)
            await ws.send(json.dumps(P.stop_message()))
            await asyncio.wait_for(task, 600)


def count_stored(redis_url: str, tenant: str, conversations: list[str]) -> tuple[Counter[str], int]:
    import redis

    r = redis.Redis.from_url(redis_url)
    stored: Counter[str] = Counter()
    entries = 0
    for cid in conversations:
        for _, fields in r.xrange(f"tracker:{tenant}:conv:{cid}:stream"):
            if fields.get(b"is_final") == b"1":
                stored[fields[b"utterance_id"].decode()] += 1
                entries += 1
    r.close()
    return stored, entries


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", "-n", type=int, default=4)
    ap.add_argument("--minutes", "-m", type=float, default=3.0)
    ap.add_argument("--checkpoint", default="default", help="default (the shipped model), tiny (random, tiny backbone) or a directory")
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between one conversation's utterances")
    ap.add_argument("--per-call", type=int, default=20, help="utterances per conversation before a new one starts")
    ap.add_argument("--warmup-s", type=float, default=20.0, help="memory baseline taken after this long")
    args = ap.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from services.runner import LocalService

    ckpt = tiny_checkpoint() if args.checkpoint == "tiny" else args.checkpoint
    utts, rate, speakers = demo_utterances()
    svc_args = {"asr": "off",  # the figures in BENCHMARKS.md were measured without speech recognition
                "model": {"checkpoint": ckpt, "num_threads": 1, **({"dtype": "fp32"} if args.checkpoint == "tiny" else {})},
                "deployments": {"emotion_model": {"num_cpus": 1.0}}}
    t_start = time.time()
    with LocalService(port=free_port(), args=svc_args) as svc:
        print(f"service up in {time.time() - t_start:.0f} s; {args.conversations} conversations x {args.minutes:g} min, "
              f"gap {args.gap:g} s, checkpoint {args.checkpoint}", flush=True)
        tally = Tally()
        redis_pid = svc._redis.pid if svc._redis is not None else None
        mem: list[tuple[float, float]] = []

        async def sample_memory(deadline: float) -> None:
            while time.time() < deadline:
                await asyncio.sleep(min(15.0, max(0.1, deadline - time.time())))
                mem.append((time.time(), await asyncio.to_thread(service_rss_mb, redis_pid)))

        async def go() -> None:
            t0 = time.time()
            deadline = t0 + 60 * args.minutes
            sampler = asyncio.create_task(sample_memory(deadline))
            await asyncio.gather(*(worker(svc.ws_url, svc.auth_headers, utts, rate, speakers, deadline, args.gap,
                                          args.per_call, tally, w) for w in range(args.conversations)))
            await sampler

        run_t0 = time.time()
        asyncio.run(go())
        elapsed = time.time() - run_t0
        time.sleep(0.5)
        stored, entries = count_stored(svc.redis_url, "default", tally.conversations)
        end_rss = service_rss_mb(redis_pid)

    sent = set(tally.sent)
    lost = sorted(sent - set(stored))
    dup_received = sum(c - 1 for c in tally.received.values() if c > 1)
    dup_stored = entries - len(stored)
    lat = sorted(tally.latency)
    third = elapsed / 3
    first = [s for t, s in lat if t < run_t0 + third]
    last = [s for t, s in lat if t >= run_t0 + 2 * third]
    base = [m for t, m in mem if t >= run_t0 + args.warmup_s]
    base_rss = base[0] if base else (mem[0][1] if mem else end_rss)
    print(f"conversations        {len(tally.conversations)}")
    print(f"utterances sent      {len(sent)}  ({len(sent) / elapsed:.2f}/s over {elapsed:.0f} s)")
    print(f"labelled             {len(tally.received)}")
    print(f"stored               {len(stored)}")
    print(f"lost                 {len(lost)}{'  ' + ', '.join(lost[:5]) if lost else ''}")
    print(f"duplicated           {dup_received + dup_stored}  (received twice {dup_received}, stored twice {dup_stored})")
    print(f"errors               {len(tally.errors)}{'  ' + str(tally.errors[:3]) if tally.errors else ''}")
    print(f"latency ms           p50 {pct([s for _, s in lat], 50):.0f}  p99 {pct([s for _, s in lat], 99):.0f}  "
          f"max {1000 * max((s for _, s in lat), default=float('nan')):.0f}")
    print(f"p99 first/last third {pct(first, 99):.0f} / {pct(last, 99):.0f} ms  (ratio last/first {pct(last, 99) / pct(first, 99):.2f})")
    print(f"service RSS MB       after warm-up {base_rss:.0f}  end {end_rss:.0f}  growth {end_rss - base_rss:+.0f} "
          f"({100 * (end_rss - base_rss) / base_rss:+.1f}%)")
    print("memory samples MB    " + " ".join(f"{m:.0f}" for _, m in mem))
    if lost or dup_received or dup_stored:
        raise SystemExit("FAIL: utterances were lost or duplicated")


if __name__ == "__main__":
    main()
