"""Streaming latency before and after: N concurrent voiced calls in real time through the real service.

For each utterance, latency = the wall-clock time its final label arrived minus the moment the
stream's audio reached the utterance's true end (from the voiced clip spans). For each N the bench
prints p50/p99 latency, labelled utterances per second, and the Ray calls and Redis round trips per
utterance, COUNTED in every process (bench/counting/sitecustomize.py patches redis-py's
``send_packed_command`` and Ray Serve's ``DeploymentHandle.remote``). A call's fixed cost (start,
auth, stop) is measured with an empty call and reported apart from the per-utterance cost.

It then measures the EmotionModel prefix-cache hit rate with 1 and 2 model replicas: 16 concurrent
text conversations of 30 turns on a tiny context_first model (M = 8, m = 4 past turns) whose
cache can be reused. hit rate = hits / reusable lookups, where a lookup is reusable unless it is a
conversation's first (a miss by nature) or falls on a window jump (a rebuild by nature): 100% means
every other utterance reached the replica holding its conversation's cache. hits/all is also shown.

Where the time goes: the CPU seconds each process of the service spent during a run (psutil, by role:
Ingress, Serve proxy, FeatureExtractor, EmotionModel, ...) per labelled utterance, and the service's
own histograms (services/metrics.py) as means: release-to-sent latency on the server, feature
seconds per utterance, model seconds per batch. ``--stagger`` spreads the calls' starts evenly over
one call's length and ``--random-starts`` starts each at a random moment of it (seed 0; independent
calls on a floor, some of whose utterances still end together); by default all N start together
(copies of two recordings, so their utterances end in bursts: the worst case).

"Before" is another commit (``--before moves``) checked out into a temporary git worktree and run
in the same bench run with the same script (PYTHONPATH puts its code first, in Ray's workers too).

Usage: python bench/stream_latency.py [--n 1 4 16 32] [--before moves] [--replicas 1 2] [--checkpoint DIR]
       [--feature-replicas 2] [--stagger | --random-starts] [--asr on [--no-transcripts]] [--transport haproxy]
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
COUNTING = Path(__file__).resolve().parent / "counting"
CACHE_WINDOW = (8, 4)  # the cache model's past-turn window: M, m

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


# ------------------------------------------------------------------ counting (see bench/counting)

def start_service(args: dict, transport: str = "serve"):
    """A LocalService on a free port (another process on this shared machine may take the port first: retry)."""
    import dataclasses

    from services.runner import LocalService

    kw = {}
    if "transport" in {f.name for f in dataclasses.fields(LocalService)}:
        kw["transport"] = transport
    elif transport == "haproxy":  # a commit from before the option: what tracker.ray_env.TRANSPORT_ENV sets, by hand
        os.environ.update(RAY_SERVE_ENABLE_HA_PROXY="1", RAY_SERVE_ENABLE_DIRECT_INGRESS="1",
                          RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="5")
    for attempt in range(3):
        try:
            return LocalService(port=free_port(), args=args, **kw).start()
        except Exception as exc:
            if attempt == 2 or "bind" not in str(exc):
                raise
    raise AssertionError("unreachable")


def counters() -> dict[str, dict[str, int]]:
    """The sum of every process's counters so far."""
    out: dict[str, dict[str, int]] = {"redis": {}, "ray": {}}
    for path in glob.glob(os.path.join(os.environ["TRACKER_BENCH_COUNT_DIR"], "*.json")):
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            continue
        for kind in out:
            for name, n in data.get(kind, {}).items():
                out[kind][name] = out[kind].get(name, 0) + n
    return out


def settled_counters() -> dict[str, dict[str, int]]:
    time.sleep(1.2)  # every process writes its counters twice a second
    return counters()


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of this process and each descendant, by pid: (role, seconds).

    The service's processes (Ray's GCS and raylet, the Serve controller and proxy, each deployment
    replica, redis-server) all descend from this process; Ray titles a replica
    ``ray::ServeReplica:<app>:<Deployment>``, which names its role."""
    import psutil

    me = psutil.Process()
    out: dict[int, tuple[str, float]] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times, cmd = proc.cpu_times(), " ".join(proc.cmdline())
        except psutil.Error:
            continue
        out[proc.pid] = (_role(proc.pid == me.pid, cmd), times.user + times.system)
    return out


def _role(is_me: bool, cmd: str) -> str:
    if is_me:
        return "bench driver + senders"
    if "ServeReplica:" in cmd:
        return cmd.split("ServeReplica:", 1)[1].split()[0].split(":")[-1].split(".")[0]
    for key, role in (("ServeController", "Serve controller"), ("ProxyActor", "Serve proxy"),
                      ("HAProxyManager", "HAProxy (manager + haproxy)"), ("haproxy", "HAProxy (manager + haproxy)"),
                      ("redis-server", "redis-server"),
                      ("raylet", "Ray raylet"), ("gcs_server", "Ray GCS"), ("dashboard", "Ray dashboard/agents"),
                      ("agent", "Ray dashboard/agents"), ("log_monitor", "Ray dashboard/agents")):
        if key in cmd:
            return role
    return "other (idle Ray workers etc.)"


def cpu_delta(after: dict[int, tuple[str, float]], before: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two snapshots, summed by role (a process new since `before` counts from 0)."""
    out: dict[str, float] = {}
    for pid, (role, secs) in after.items():
        out[role] = out.get(role, 0.0) + secs - before.get(pid, (role, 0.0))[1]
    return {k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0.005}


STAGES = {"server_final_s": "tracker_final_latency_seconds", "features_s": "tracker_features_seconds",
          "model_batch_s": "tracker_model_seconds{stage=label}"}


def stage_sums(svc) -> dict[str, tuple[float, float]]:
    """The service's own histograms (services/metrics.py), sums and counts so far; {} where not exported."""
    from services.metrics import scrape

    url = getattr(svc, "metrics_url", None)
    try:
        got = scrape(url) if url else {}
    except Exception:
        return {}
    out = {}
    for key, name in STAGES.items():
        base, _, tags = name.partition("{")
        tags = "{" + tags if tags else ""
        if f"{base}_count{tags}" in got:
            out[key] = (got[f"{base}_sum{tags}"], got[f"{base}_count{tags}"])
    return out


def stage_means(after: dict[str, tuple[float, float]], before: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Per-stage means between two scrapes: server-side release-to-sent latency, feature seconds per
    utterance, model seconds per batch; and the number of model batches."""
    out = {}
    for key, (total, count) in after.items():
        t0, c0 = before.get(key, (0.0, 0.0))
        if count > c0:
            out[key] = round((total - t0) / (count - c0), 4)
            if key == "model_batch_s":
                out["model_batches"] = int(count - c0)
    return out


def delta(after: dict, before: dict) -> dict[str, dict[str, int]]:
    return {k: {n: v - before[k].get(n, 0) for n, v in after[k].items() if v - before[k].get(n, 0)} for k in after}


# ------------------------------------------------------------------ one version (the child process)

async def one_call(url: str, rec, truth: list[dict], speed: float, lat: list[float], frame_ms: int | None = None) -> int:
    from clients.stream_client import stream_recording

    t0 = time.perf_counter()
    arrivals: list[tuple[float, dict]] = []
    kw = {"chunk_ms": frame_ms} if frame_ms else {}  # None: the client's default (tracker.stream.protocol.FRAME_MS)
    out = await stream_recording(url, f"bench-{uuid.uuid4().hex[:8]}", rec, speed=speed, **kw,
                                 on_message=lambda m: arrivals.append((time.perf_counter(), m)) if m.get("type") == "utterance" else None)
    for when, msg in arrivals:
        match = [u for u in truth if u["speaker"] == msg["speaker"]
                 and min(u["end_ms"], msg["end_ms"]) > max(u["start_ms"], msg["start_ms"])]
        if match:
            lat.append(when - (t0 + match[0]["end_ms"] / 1000 / speed))
    return len(out.results)


async def run_n(url: str, recs: list, n: int, speed: float, starts: str = "together",
                frame_ms: int | None = None, seed: int = 0) -> tuple[list[float], int, float]:
    """N calls at once. `starts`: "together" (all N, copies of two recordings, start at the same instant,
    so their utterances end in bursts: the worst case), "even" (call i starts i/N of a call's length after
    the first) or "random" (each call starts at a uniformly random moment of one call's length, seeded:
    calls on a floor start independently, so some utterances still end together)."""
    lat: list[float] = []
    period = max(len(rec.samples) / rec.sample_rate for rec, _ in recs) / speed
    rng = np.random.default_rng(seed)
    offsets = {"together": [0.0] * n, "even": [period * i / n for i in range(n)],
               "random": sorted(rng.uniform(0.0, period, size=n).tolist())}[starts]

    async def delayed(i: int) -> int:
        await asyncio.sleep(offsets[i])
        return await one_call(url, *recs[i % len(recs)], speed, lat, frame_ms)

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(delayed(i) for i in range(n)))
    return lat, sum(counts), time.perf_counter() - t0


async def empty_call(url: str) -> None:
    """start + stop, no utterance: what a call costs apart from its utterances."""
    import websockets

    async with websockets.connect(url) as ws:  # messages by hand: the same code drives older commits
        await ws.send(json.dumps({"type": "start", "conversation_id": f"empty-{uuid.uuid4().hex[:8]}",
                                  "sample_rate": 16000, "channels": 2, "speakers": ["Agent", "Caller"]}))
        await ws.send(json.dumps({"type": "stop"}))
        async for raw in ws:
            if json.loads(raw).get("type") == "stopped":
                break


async def text_conversations(url: str, n: int, turns: int) -> int:
    """`n` concurrent conversations of `turns` text utterances each, one utterance at a time."""
    import websockets

    async def one(i: int) -> int:
        got = 0
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "conversation_id": f"cache-{i}-{uuid.uuid4().hex[:6]}",
                                      "sample_rate": 16000, "channels": 2, "speakers": ["Agent", "Caller"]}))
            await ws.recv()  # started
            for t in range(turns):
                await ws.send(json.dumps({"type": "utterance", "utterance_id": f"u{t}", "speaker": ["Agent", "Caller"][t % 2],
                                          "text": f"Turn {t} of call {i}: {CALLS[t % 2][t % 5][1]}"}))
                while json.loads(await ws.recv()).get("type") != "utterance":
                    pass
                got += 1
            await ws.send(json.dumps({"type": "stop"}))
            async for raw in ws:
                if json.loads(raw).get("type") == "stopped":
                    break
        return got

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


def model_stats() -> dict[int, dict]:
    """Each EmotionModel replica's info (asked until every replica answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("EmotionModel", app_name="tracker")
    seen: dict[int, dict] = {}
    for _ in range(60):
        info = handle.info.remote().result()
        seen[info["pid"]] = info
    return seen


def cache_checkpoint(tmp: Path) -> str:
    """A tiny random context_first model whose prefix cache can be reused (window M = 8, m = 4)."""
    import torch

    from tracker.model.adapter import AdapterConfig
    from tracker.model.backbone import load_backbone
    from tracker.model.prompt import PromptConfig
    from tracker.model.recognizer import EmotionRecognizer, RecognizerConfig

    torch.manual_seed(0)
    config = RecognizerConfig(backbone="tiny", dtype="fp32", adapter=AdapterConfig(d_model=32, n_pseudo_tokens=4),
                              prompt=PromptConfig(layout="context_first", context_turns=CACHE_WINDOW[0], context_min_turns=CACHE_WINDOW[1],
                                                  max_context_line_tokens=24, max_context_tokens=256))
    return str(EmotionRecognizer(load_backbone("tiny", dtype="fp32", seed=0), config).save_pretrained(tmp / "cache-ckpt"))


def child(args: argparse.Namespace) -> dict:
    from clients.stream_client import Recording
    from tracker.audio.synth import voice_conversation

    result: dict = {"latency": [], "cache": []}
    if args.n:
        recs = []
        for call in CALLS:
            v = voice_conversation(call)
            said = [] if args.no_transcripts else [{k: u[k] for k in ("speaker", "text", "start_ms", "end_ms")} for u in v.utterances]
            recs.append((Recording(v.samples, v.sample_rate, v.speakers, said), v.utterances))
        svc_args = {"model": {"checkpoint": args.checkpoint, "max_batch_size": args.max_batch_size},
                    "deployments": {"emotion_model": {"num_cpus": 1.0, "max_ongoing_requests": max(32, args.max_batch_size)}}}
        if _knows_asr():  # versions with speech recognition: on only when asked (the calls bring transcripts)
            svc_args["asr"] = args.asr
        if args.feature_replicas > 1:
            svc_args["deployments"]["feature_extractor"] = {"num_replicas": args.feature_replicas, "num_cpus": 0.2}
        with start_service(svc_args, args.transport) as svc:
            url = f"{svc.ws_url}?token={svc.api_key}" if svc.api_key else svc.ws_url  # the local API key
            asyncio.run(run_n(url, recs, 1, 8.0))  # warm-up
            time.sleep(11)  # ... and its metrics exported before the first scrape
            c0 = settled_counters()
            asyncio.run(empty_call(url))
            per_call = delta(settled_counters(), c0)
            result["per_call"] = per_call
            print(json.dumps({"progress": per_call, "kind": "per_call"}), flush=True)
            for n in args.n:
                c0, cpu0, st0 = settled_counters(), cpu_seconds(), stage_sums(svc)
                lat, count, secs = asyncio.run(run_n(url, recs, n, args.speed, args.starts, args.frame_ms))
                cpu = cpu_delta(cpu_seconds(), cpu0)
                d = delta(settled_counters(), c0)
                time.sleep(11)  # Ray's metrics agent exports every few seconds
                stages = stage_means(stage_sums(svc), st0)
                ms = np.array(lat) * 1000
                row = {"n": n, "utterances": count, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                       "max": float(ms.max()), "utt_per_s": count / secs, "load": os.getloadavg()[0],
                       "redis": d["redis"], "ray": d["ray"], "cpu_s": cpu, "wall_s": secs, "stages": stages,
                       "redis_per_utt": (sum(d["redis"].values()) - n * sum(per_call["redis"].values())) / max(count, 1),
                       "ray_per_utt": (sum(d["ray"].values()) - n * sum(per_call["ray"].values())) / max(count, 1),
                       "redis_total_per_utt": sum(d["redis"].values()) / max(count, 1),
                       "ray_total_per_utt": sum(d["ray"].values()) / max(count, 1)}
                result["latency"].append(row)
                print(json.dumps({"progress": row, "kind": "latency"}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = cache_checkpoint(Path(tmp)) if args.replicas else ""
        for r in args.replicas:
            svc_args = {"model": {"checkpoint": ckpt, "dtype": "fp32", "max_batch_size": 16, "num_threads": 1},
                        "deployments": {"emotion_model": {"num_replicas": r, "num_cpus": 0.5, "max_ongoing_requests": 32},
                                        "ingress": {"num_cpus": 0.1}, "feature_extractor": {"num_cpus": 0.1},
                                        "context_aggregator": {"num_cpus": 0.1}}}
            with start_service(svc_args, args.transport) as svc:
                url = f"{svc.ws_url}?token={svc.api_key}" if svc.api_key else svc.ws_url
                before = model_stats()
                got = asyncio.run(text_conversations(url, args.cache_calls, args.cache_turns))
                after = model_stats()
            kv = {k: sum((after[p]["kv_cache"] or {}).get(k, 0) - ((before.get(p) or {}).get("kv_cache") or {}).get(k, 0)
                         for p in after) for k in ("hits", "misses", "rebuilds")}
            lookups = sum(kv.values())
            row = {"replicas": r, "replicas_seen": len(after), "utterances": got, **kv,
                   "hit": kv["hits"] / lookups if lookups else None,
                   "affine": (kv["hits"] + kv["rebuilds"]) / (lookups - args.cache_calls) if lookups > args.cache_calls else None}
            result["cache"].append(row)
            print(json.dumps({"progress": row, "kind": "cache"}), flush=True)
    return result


# ------------------------------------------------------------------ the parent: before and after

def run_version(label: str, code_dir: Path, args: argparse.Namespace) -> dict:
    count_dir = tempfile.mkdtemp(prefix=f"bench-count-{label}-")
    env = {**os.environ, "PYTHONPATH": f"{code_dir}:{COUNTING}", "TRACKER_BENCH_COUNT_DIR": count_dir}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--n", *map(str, args.n), "--replicas",
           *map(str, args.replicas), "--checkpoint", args.checkpoint, "--speed", str(args.speed),
           "--max-batch-size", str(args.max_batch_size), "--cache-calls", str(args.cache_calls),
           "--cache-turns", str(args.cache_turns), "--asr", args.asr, "--feature-replicas", str(args.feature_replicas),
           *{"together": [], "even": ["--stagger"], "random": ["--random-starts"]}[args.starts],
           *(["--no-transcripts"] if args.no_transcripts else []),
           *(["--frame-ms", str(args.frame_ms)] if args.frame_ms else []), "--transport", args.transport]
    print(f"== {label}: {code_dir} ({git_rev(code_dir)})", flush=True)
    proc = subprocess.run(cmd, env=env, cwd=code_dir, capture_output=True, text=True)
    result: dict = {"latency": [], "cache": []}
    for line in proc.stdout.splitlines():
        if line.startswith('{"progress"'):
            msg = json.loads(line)
            print(f"   {label} {msg['kind']}: {json.dumps(msg['progress'])}", flush=True)
            if msg["kind"] == "per_call":
                result["per_call"] = msg["progress"]
            else:
                result[msg["kind"]].append(msg["progress"])
    if proc.returncode:  # report what was measured, and why the rest is missing
        print(f"   {label} FAILED ({proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
    return result


def git_rev(path: Path) -> str:
    return subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def _knows_asr() -> bool:
    """Whether this tree's service config has the `asr` switch (versions before it reject the key)."""
    from dataclasses import fields

    from services.config import AppConfig

    return "asr" in {f.name for f in fields(AppConfig)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*", default=[1, 4, 16, 32])
    ap.add_argument("--before", default="moves", help="git ref to compare with ('' = after only)")
    ap.add_argument("--replicas", type=int, nargs="*", default=[1, 2], help="EmotionModel replicas for the cache hit rate")
    ap.add_argument("--checkpoint", default="default")
    ap.add_argument("--speed", type=float, default=1.0)
    ap.add_argument("--feature-replicas", type=int, default=1, help="FeatureExtractor replicas (each encodes on one thread)")
    ap.add_argument("--asr", choices=["on", "off"], default="off",
                    help="speech recognition in the service (the calls stream client transcripts either way)")
    ap.add_argument("--no-transcripts", action="store_true",
                    help="stream the calls' audio only, so that speech recognition (--asr on) transcribes every utterance")
    ap.add_argument("--frame-ms", type=int, default=None,
                    help="audio per binary frame the calls send (default: the bundled client's, 100 ms)")
    ap.add_argument("--stagger", dest="starts", action="store_const", const="even", default="together",
                    help="spread the calls' starts evenly over one call's length (default: all start together, the worst case)")
    ap.add_argument("--random-starts", dest="starts", action="store_const", const="random",
                    help="start each call at a random moment of one call's length (seed 0), as independent calls do")
    ap.add_argument("--transport", choices=["serve", "haproxy"], default="serve",
                    help="how the calls' WebSockets reach the ingress (services.runner.LocalService.transport)")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--cache-calls", type=int, default=16)
    ap.add_argument("--cache-turns", type=int, default=30)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps({"result": child(args)}), flush=True)
        return
    print(f"load before: {os.getloadavg()}", flush=True)
    results = {}
    versions = []
    tmp = None
    if args.before:
        tmp = Path(tempfile.mkdtemp(prefix="bench-before-")) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tmp), args.before], check=True,
                       capture_output=True)
        versions.append((f"before ({args.before})", tmp))
    versions.append(("after", REPO))
    try:
        for label, path in versions:
            results[label] = run_version(label, path, args)
    finally:
        if tmp is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp)], capture_output=True)
    print(f"load after: {os.getloadavg()}")
    print(f"\n{'version':<16} {'N':>3} {'utts':>5} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'utt/s':>6} "
          f"{'Ray/utt':>8} {'Redis/utt':>9} {'(all Ray':>8} {'Redis)':>7} {'load1':>6}")
    for label, res in results.items():
        for r in res["latency"]:
            print(f"{label:<16} {r['n']:>3} {r['utterances']:>5} {r['p50']:7.0f} {r['p99']:7.0f} {r['max']:7.0f} "
                  f"{r['utt_per_s']:6.2f} {r['ray_per_utt']:8.2f} {r['redis_per_utt']:9.2f} {r['ray_total_per_utt']:8.2f} "
                  f"{r['redis_total_per_utt']:7.2f} {r['load']:6.2f}")
    for label, res in results.items():
        if "per_call" in res:
            print(f"{label}: per call (start+stop, no utterance): Ray {res['per_call']['ray']}, Redis {res['per_call']['redis']}")
        if res["latency"]:
            r = res["latency"][-1]
            print(f"{label}: N={r['n']} Ray calls {r['ray']}\n{' ' * len(label)}  Redis {r['redis']}")
    for label, res in results.items():  # where the cores went: CPU seconds per labelled utterance, by process role
        for r in res["latency"]:
            if r.get("cpu_s"):
                total = sum(r["cpu_s"].values())
                if r.get("stages"):
                    print(f"\n{label} N={r['n']}: service-side means {r['stages']}")
                print(f"\n{label} N={r['n']}: CPU {total:.1f} s over {r['wall_s']:.0f} s wall "
                      f"({total / r['wall_s']:.2f} cores busy), {1000 * total / max(r['utterances'], 1):.0f} ms per utterance:")
                for role, secs in r["cpu_s"].items():
                    print(f"   {role:<32} {secs:8.1f} s  {1000 * secs / max(r['utterances'], 1):6.0f} ms/utt  {100 * secs / total:5.1f}%")
    # With perfect affinity every lookup hits except a conversation's first (a miss) and the window's
    # jumps (a rebuild: the prefix changed); "reusable" counts the others, and hit rate = hits / reusable.
    from tracker.context_window import window_start

    jumps = sum(window_start(i, CACHE_WINDOW[0], CACHE_WINDOW[1]) != window_start(i - 1, *CACHE_WINDOW)
                for i in range(1, args.cache_turns))
    print(f"\ncache: {args.cache_calls} conversations x {args.cache_turns} turns, window M={CACHE_WINDOW[0]} m={CACHE_WINDOW[1]} "
          f"({jumps} window jumps per conversation)")
    print(f"{'version':<16} {'replicas':>8} {'seen':>4} {'utts':>5} {'hits':>5} {'rebuilds':>8} {'misses':>6} {'reusable':>8} "
          f"{'hit rate':>8} {'hits/all':>8}")
    for label, res in results.items():
        for r in res["cache"]:
            lookups = r["hits"] + r["rebuilds"] + r["misses"]
            reusable = lookups - args.cache_calls * (1 + jumps)
            print(f"{label:<16} {r['replicas']:>8} {r['replicas_seen']:>4} {r['utterances']:>5} {r['hits']:>5} {r['rebuilds']:>8} "
                  f"{r['misses']:>6} {reusable:>8} {100 * r['hits'] / max(reusable, 1):7.1f}% {100 * (r['hit'] or 0):7.1f}%")


if __name__ == "__main__":
    main()
