"""CPU per WebSocket message: Ray Serve's proxy vs HAProxy with direct ingress (`--transport haproxy`).

A minimal Serve app (one FastAPI WebSocket route that counts messages) runs under each transport in
its own process (Ray starts once per process); `--conns` clients each send `--messages` binary frames
of 100 ms of 16 kHz PCM16 (3,200 bytes, the bundled client's frame). The CPU seconds of every process
of the service (psutil over the process tree, by role as bench/stream_latency.py counts them: Serve
proxy, the replica, HAProxy and its manager, the controller) divided by the messages sent is the
transport's cost per message; the ratio is against the Serve proxy measured in the same run.

Usage: python bench/transport.py [--conns 16] [--messages 300]
"""


import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fastapi import FastAPI, WebSocket  # real annotations (no __future__ import): the replica resolves them

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from stream_latency import cpu_delta, cpu_seconds, free_port  # noqa: E402  (the same CPU accounting by role)

app = FastAPI()
# the processes that carry the messages; the rest (Ray's GCS, raylet, agents, this driver) are not the transport
TRANSPORT_ROLES = ("Serve proxy", "Counter", "HAProxy (manager + haproxy)", "Serve controller")


def counter_app():
    """One FastAPI WebSocket route that counts the messages of a connection (module level: FastAPI reads
    the route's annotations from this module's globals)."""
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.1})
    @serve.ingress(app)
    class Counter:
        @app.websocket("/ws")
        async def ws(self, ws: WebSocket) -> None:
            await ws.accept()
            n = 0
            while True:
                msg = await ws.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                n += 1
                if msg.get("text") == "stop":
                    await ws.send_text(json.dumps({"n": n}))

    return Counter.bind()


def serve_and_measure(transport: str, conns: int, messages: int) -> dict:
    """Runs in a child process: start Ray + the app under `transport`, drive it, return the CPU figures."""
    from tracker.ray_env import RAY_ENV, TRANSPORT_ENV

    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.update(TRANSPORT_ENV[transport])
    if transport == "haproxy":  # HAProxy's own ports: free ones (their defaults are fixed)
        os.environ.update(RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()), RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()))
    import ray
    import websockets
    from ray import serve

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(counter_app(), route_prefix="/")
        frame = bytes(3200)

        async def one() -> int:
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
                for _ in range(messages):
                    await ws.send(frame)
                    await asyncio.sleep(0.005)
                await ws.send("stop")
                return json.loads(await ws.recv())["n"]

        asyncio.run(one())  # warm-up: routes, connections
        before = cpu_seconds()
        t0 = time.perf_counter()
        counted = asyncio.run(_gather(one, conns))
        wall = time.perf_counter() - t0
        roles = cpu_delta(cpu_seconds(), before)
    finally:
        serve.shutdown()
        ray.shutdown()
    sent = conns * (messages + 1)
    return {"transport": transport, "messages": sent, "counted": sum(counted), "wall_s": wall, "cpu_s": roles,
            "ms_per_message": 1000 * sum(v for k, v in roles.items() if k != "bench driver + senders") / sent,
            "transport_ms_per_message": 1000 * sum(v for k, v in roles.items() if k in TRANSPORT_ROLES) / sent}


async def _gather(one, n: int) -> list[int]:
    return await asyncio.gather(*(one() for _ in range(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--child", choices=["serve", "haproxy"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(serve_and_measure(args.child, args.conns, args.messages)), flush=True)
        return
    results = []
    for transport in ("serve", "haproxy"):
        proc = subprocess.run([sys.executable, __file__, "--child", transport, "--conns", str(args.conns),
                               "--messages", str(args.messages)], capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{transport}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        results.append(json.loads(line[0][7:]))
    base = results[0]["transport_ms_per_message"]
    print(f"{args.conns} WebSockets x {args.messages} frames of 3,200 bytes, 5 ms apart\n")
    print(f"{'transport':<10} {'messages':>8} {'counted':>8} {'CPU ms/msg (all)':>17} {'transport ms/msg':>17} {'vs serve':>9}")
    for r in results:
        print(f"{r['transport']:<10} {r['messages']:>8} {r['counted']:>8} {r['ms_per_message']:>17.3f} "
              f"{r['transport_ms_per_message']:>17.3f} {r['transport_ms_per_message'] / base:>8.2f}x")
    for r in results:
        print(f"  {r['transport']}: " + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(r["cpu_s"].items())))


if __name__ == "__main__":
    main()
